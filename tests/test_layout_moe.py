"""The dry-run launch planner on mixture-of-experts models: EP and ETP against the experts
and each pipeline stage's TP × DP ranks, expert and non-expert parameters and memory per
GPU checked against hand arithmetic, an MoE layer's activations against the tensors
Megatron saves, the rollout engines' weights, and the dry run's expert rows and flags."""

import json

import pytest

from sdpg_megatron.config import Config
from sdpg_megatron.layout import plan_layout
from sdpg_megatron.memory_model import expert_stage_parameters, moe_activation_bytes, stage_parameters
from sdpg_megatron.model.qwen3 import qwen3_moe_tiny, qwen3_preset, qwen3_tiny
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size
from tests.distributed import run_distributed
from tests.helpers import RECOMMENDED, make_config, tiny_config


def moe_config(*overrides: str) -> Config:
    """tiny_config for qwen3_moe_tiny (2 layers, h 128, 4 heads / 2 KV heads of 64, 8 experts
    of FFN 64, top-2, vocab 512, untied)."""
    return tiny_config("schedule.micro_batch_size=2", *overrides)


def test_expert_parallel_must_divide_the_experts():
    with pytest.raises(ValueError, match=r"expert parallel size 3 \(parallel\.expert_parallel, --ep\) does not divide "
                                         r"num_experts=8; choose one of \[1, 2, 4, 8\]"):
        plan_layout(moe_config("parallel.expert_parallel=3"), qwen3_moe_tiny(), world_size=3)
    with pytest.raises(ValueError, match=r"expert tensor parallel size 3 \(parallel\.expert_tensor_parallel, --etp\) "
                                         r"does not divide moe_ffn_hidden_size=64"):
        plan_layout(moe_config("parallel.expert_parallel=2", "parallel.expert_tensor_parallel=3"), qwen3_moe_tiny(),
                    world_size=6)


def test_expert_layout_must_divide_each_stages_ranks():
    # TP 1 × PP 1 on 2 GPUs: DP 2, and EP 4 cannot regroup 2 ranks
    with pytest.raises(ValueError, match=r"parallel\.expert_parallel × parallel\.expert_tensor_parallel = 4 × 1 must "
                                         r"divide the TP × DP = 1 × 2 = 2 ranks of each pipeline stage.*at "
                                         r"--world-size 2 choose parallel\.expert_parallel \(--ep\) from \[1, 2\] or "
                                         r"use a world size that is a multiple of 4"):
        plan_layout(moe_config("parallel.expert_parallel=4"), qwen3_moe_tiny(), world_size=2)
    # PP 2 on 4 GPUs: 2 ranks per stage; EP 2 × ETP 2 needs 4 of them, and no EP fits beside ETP 2
    # (EP 1 would need ETP = TP = 1)
    with pytest.raises(ValueError, match=r"= 2 × 2 must divide the TP × DP = 1 × 2 = 2 ranks of each pipeline stage "
                                         r"\(Megatron regroups them as expert TP × EP × expert DP\): at "
                                         r"--world-size 4 use a world size that is a multiple of 8$"):
        plan_layout(moe_config("parallel.pipeline_parallel=2", "parallel.expert_parallel=2",
                               "parallel.expert_tensor_parallel=2"), qwen3_moe_tiny(), world_size=4)
    # TP 2 × DP 2 = 4 ranks hold EP 2 × ETP 2 (expert DP 1) and EP 4 (expert DP 1)
    for ep, etp in ((2, 2), (4, 1), (2, 1)):
        layout = plan_layout(moe_config("parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                        f"parallel.expert_parallel={ep}", f"parallel.expert_tensor_parallel={etp}"),
                             qwen3_moe_tiny(), world_size=4)
        assert (layout.ep, layout.etp, layout.expert_dp, layout.experts_per_rank) == (ep, etp, 4 // (ep * etp), 8 // ep)


def test_dense_model_refuses_expert_parallelism():
    for field in ("parallel.expert_parallel=2", "parallel.expert_tensor_parallel=2"):
        with pytest.raises(ValueError, match=r"expert parallel sizes \(parallel\.expert_parallel=\d, "
                                             r"parallel\.expert_tensor_parallel=\d, --ep\) apply to mixture-of-experts "
                                             r"models only; this model is dense: set them to 1"):
            plan_layout(tiny_config(field), qwen3_tiny(), world_size=2)


def test_moe_at_tp2_needs_sequence_parallelism():
    with pytest.raises(ValueError, match=r"config field parallel\.sequence_parallel: a mixture-of-experts model trains "
                                         r"at tensor parallel size 2 only with sequence parallelism.*set "
                                         r"parallel\.sequence_parallel=true"):
        plan_layout(moe_config("parallel.tensor_parallel=2", "parallel.expert_parallel=2"), qwen3_moe_tiny(),
                    world_size=2)


def test_expert_parameters_split_over_ep_etp_and_pp():
    for name in ("qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-moe-tiny"):
        arch = qwen3_preset(name)
        pp = 2
        for ep, etp in ((1, 1), (8, 1), (4, 2)):
            per_rank = expert_stage_parameters(arch, pp=pp, ep=ep, etp=etp)
            assert per_rank * pp * ep * etp == arch.expert_parameters()
            # the rest is split by TP as a dense model's is, the router [E, h] whole on every TP rank
            padded = padded_vocab_size(arch.vocab_size, 2)
            stages = stage_parameters(arch, tp=2, pp=pp, padded_vocab=padded, ep=ep, etp=etp)
            h, d = arch.hidden_size, arch.kv_channels
            attention = h * d * (2 * arch.num_attention_heads + 2 * arch.num_query_groups)
            replicated = arch.num_experts * h + 2 * h + 2 * d
            per_layer = attention // 2 + replicated
            layers = arch.num_layers // pp
            assert stages[0] == layers * per_layer + per_rank + padded // 2 * h
            assert stages[1] == layers * per_layer + per_rank + padded // 2 * h + h
    assert expert_stage_parameters(qwen3_preset("qwen3-32b"), pp=2) == 0


def test_moe_memory_items_by_hand():
    """qwen3_moe_tiny at TP 2 (sequence parallel) × DP 2, EP 2 × ETP 1 (4 experts per rank,
    expert DP 2), bf16, micro-batch 2 of 24 + 40 = 64 tokens, 8 samples per DP rank."""
    config = moe_config("parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.expert_parallel=2")
    layout = plan_layout(config, qwen3_moe_tiny(), world_size=4)
    assert (layout.tp, layout.dp, layout.ep, layout.etp) == (2, 2, 2, 1)
    assert (layout.expert_dp, layout.experts_per_rank) == (2, 4)
    # per layer and TP rank: (QKV 128·(256 + 2·128) + proj 256·128) / 2 + router 8·128 + norms 2·128 + 2·64
    per_layer = (65_536 + 32_768) // 2 + 1_024 + 384
    non_expert = 2 * per_layer + 2 * 256 * 128 + 128  # + embedding and output shards (untied) + final norm
    experts = 2 * 4 * 3 * 128 * 64  # 2 layers × 4 experts × fc1 (gate + up) and fc2
    assert (non_expert, experts) == (166_784, 196_608)
    assert layout.params_per_stage == (non_expert + experts,) and layout.expert_params_per_rank == experts
    (m,) = layout.memory_per_stage
    assert (m.weights, m.gradients, m.reference_weights) == (non_expert * 2, non_expert * 4, non_expert * 2)
    assert m.optimizer_state == non_expert * 12 // 2  # over DP 2
    assert (m.expert_weights, m.expert_gradients, m.expert_reference_weights) == (experts * 2, experts * 4, experts * 2)
    assert m.expert_optimizer_state == experts * 12 // 2  # over expert DP 2
    # attention terms 2·64·2·(4·128/2 + (4·256 + 4·128)/2) plus, per token of this rank (128 / 2),
    # 2 routed copies × (h + 6·64) bf16 values, their fp32 probabilities, router 9·8 + 28·2 B
    attention = 2 * 64 * 2 * (4 * 128 // 2 + (4 * 256 + 4 * 128) // 2)
    routed = 64 * (2 * 2 * (128 + 6 * 64) + 4 * 2 + 9 * 8 + 28 * 2)
    assert (attention, routed) == (262_144, 139_776)
    assert m.activations == 2 * (attention + routed)  # 2 layers, 1 micro-batch in flight
    assert m.total == sum(value for _, value in m.items())


def test_expert_memory_per_rank_shrinks_with_ep():
    """Qwen3-30B-A3B on 16 GPUs at TP 2: EP doubles, each GPU's experts halve; Adam's state
    for them stays spread over all 16 GPUs (expert DP halves as EP doubles)."""
    arch = qwen3_preset("qwen3-30b-a3b")
    base = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.recompute_granularity=full",
            "schedule.micro_batch_size=1")
    layouts = {ep: plan_layout(make_config(*base, f"parallel.expert_parallel={ep}"), arch, world_size=16,
                               allow_overflow=True) for ep in (2, 4, 8, 16)}
    for ep in (4, 8, 16):
        small, large = layouts[ep].memory, layouts[ep // 2].memory
        for item in ("expert_weights", "expert_gradients", "expert_reference_weights"):
            assert getattr(small, item) * 2 == getattr(large, item), (ep, item)
        assert small.expert_optimizer_state == large.expert_optimizer_state
        assert (small.weights, small.optimizer_state, small.activations) == \
            (large.weights, large.optimizer_state, large.activations)
        assert layouts[ep].expert_dp * ep == 16
    assert layouts[2].memory.expert_weights == arch.expert_parameters() * 2 // 2
    assert not layouts[2].fits and layouts[8].fits
    with pytest.raises(ValueError, match=r"largest item is expert_gradients .*raise parallel\.expert_parallel"):
        plan_layout(make_config(*base, "parallel.expert_parallel=2"), arch, world_size=16)


def test_moe_rollout_engines_hold_every_expert():
    layout = plan_layout(make_config(*RECOMMENDED["qwen3-30b-a3b"][0]), qwen3_preset("qwen3-30b-a3b"), world_size=16,
                         rollout_gpus=8)
    arch = qwen3_preset("qwen3-30b-a3b")
    assert layout.rollout.weights_per_gpu == arch.num_parameters() * 2 // 2 > 9 * arch.active_parameters() * 2 // 2


def test_describe_shows_the_expert_layout():
    overrides, world_size, rollout_gpus = RECOMMENDED["qwen3-235b-a22b"]
    text = plan_layout(make_config(*overrides), qwen3_preset("qwen3-235b-a22b"), world_size=world_size, gpus_per_node=8,
                       rollout_gpus=rollout_gpus).describe()
    for expected in ("Qwen3-MoE 235.094B (22.191B active): 94 layers", "128 experts of FFN 1536, top-8",
                     "128 GPUs (16 nodes × 8): TP 4 × PP 2 × DP 16, EP 32 × ETP 1 (4 experts per rank, "
                     "expert DP 2), sequence parallel", "= 1.019B non-expert + 3.548B expert", "expert_optimizer_state",
                     "expert_reference_weights", "4 engine(s) × TP 8 = 32 GPUs (of 32)"):
        assert expected in text, expected
    dense = plan_layout(make_config(*RECOMMENDED["qwen3-32b"][0]), qwen3_preset("qwen3-32b"), world_size=32).describe()
    assert "expert" not in dense and "EP" not in dense


def _moe_saved_bytes(rank: int, world_size: int, layouts: list[tuple[int, int, int]]) -> dict:
    """Bytes of the distinct storages one MoE layer's MLP (router, dispatcher, experts)
    saves for backward on this rank, its input excluded (the pre-MLP norm's output, counted
    with the attention), for sequences of 64 × 2 fp32 tokens at each (TP, EP, ETP): this
    rank's 64/TP of each (sequence parallel)."""
    import torch

    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    saved = {}
    for tp, ep, etp in layouts:
        initialize_parallel(tensor_parallel=tp, pipeline_parallel=1, expert_parallel=ep, expert_tensor_parallel=etp,
                            seed=0)
        try:
            arch = qwen3_moe_tiny(num_layers=1)
            config = transformer_config(arch, tensor_parallel=tp, expert_parallel=ep, expert_tensor_parallel=etp,
                                        sequence_parallel=tp > 1)
            model = model_provider(arch, config, pre_process=True, post_process=True).train()
            tokens = torch.randn(64 // tp, 2, arch.hidden_size, generator=torch.Generator().manual_seed(rank),
                                 requires_grad=True)
            storages = {}

            def pack(tensor):
                if not isinstance(tensor, torch.nn.Parameter):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model.decoder.layers[0].mlp(tokens)
            storages.pop(tokens.untyped_storage().data_ptr())
            saved[(tp, ep, etp)] = sum(storages.values())
        finally:
            destroy_parallel()
    return saved


def test_moe_activation_count_matches_megatrons_saved_tensors():
    """The planner's count of an MoE layer's router, dispatcher and experts against what
    Megatron saves on 2 gloo ranks: as DP 2, at EP 2 (the two ranks' routed copies add up
    to 2 × the balanced share) and at TP 2 = ETP 2 with sequence parallelism (each rank
    routes half of every sequence and computes half of every expert for the copies of
    both)."""
    layouts = [(1, 1, 1), (1, 2, 1), (2, 1, 2)]
    per_rank = run_distributed(_moe_saved_bytes, 2, layouts)
    for tp, ep, etp in layouts:
        expected = moe_activation_bytes(qwen3_moe_tiny(num_layers=1), local_tokens=128 // tp, bytes_per_value=4,
                                        expert_tensor_parallel=etp)
        measured = sum(rank[(tp, ep, etp)] for rank in per_rank)
        assert abs(measured - 2 * expected) <= 0.01 * 2 * expected, (tp, ep, etp, measured, 2 * expected)


# --------------------------------------------------------------------------- the command line


def test_train_dry_run_takes_the_expert_flags(tmp_path, capsys):
    from sdpg_megatron.cli import parse_args

    common = ["--arch", "qwen3-moe-tiny", "--hf-dir", str(tmp_path / "not-downloaded"),
              "--train-data", str(tmp_path / "dapo.parquet"), "--set", "model.params_dtype=bfloat16",
              "--set", "schedule.prompts_per_step=8", "--set", "schedule.minibatches_per_step=2",
              "--set", "algorithm.group_size=4", "--set", "data.max_prompt_tokens=24",
              "--set", "rollout.max_response_tokens=40", "--set", "reward.overlong_buffer=8"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--print-config", "--ep", "4", "--etp", "2"])
    assert exit_info.value.code == 0
    parallel = json.loads(capsys.readouterr().out)["parallel"]
    assert (parallel["expert_parallel"], parallel["expert_tensor_parallel"]) == (4, 2)
    # without --world-size: the fewest GPUs whose TP × DP holds EP 4, i.e. TP 2 × DP 2
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--dry-run", "--tp", "2", "--ep", "4", "--set", "parallel.sequence_parallel=true"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "dry run: OK" in out
    assert "4 GPUs: TP 2 × PP 1 × DP 2, EP 4 × ETP 1 (2 experts per rank, expert DP 1), sequence parallel" in out
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--dry-run", "--ep", "3"])
    assert exit_info.value.code == 2
    assert "expert parallel size 3 (parallel.expert_parallel, --ep) does not divide num_experts=8" in \
        capsys.readouterr().err
