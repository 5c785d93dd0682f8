"""The dry-run launch planner: every divisibility rule by the field it names, a dense
model's memory estimate checked item by item against hand arithmetic, and the launch
layouts we recommend for Qwen3 1.7B–32B, 30B-A3B and 235B-A22B on 80 GiB GPUs, the
scripts' dry runs included. Mixture-of-experts layouts and memory: tests/test_layout_moe.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_megatron.experience import Sample, make_step_batch, minibatch_sample_ids
from sdpg_megatron.layout import plan_layout
from sdpg_megatron.memory_model import CUDA_OVERHEAD_BYTES, GIB, activation_bytes_per_layer, stage_parameters
from sdpg_megatron.model.qwen3 import QWEN3_PRESETS, qwen3_preset, qwen3_tiny, replace
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size
from tests.helpers import RECOMMENDED, make_config, tiny_config

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- divisibility


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    with pytest.raises(ValueError, match=r"--world-size 6 is not divisible by parallel\.tensor_parallel × "
                                         r"parallel\.pipeline_parallel = 4 × 1"):
        plan_layout(make_config("parallel.tensor_parallel=4"), qwen3_preset("qwen3-4b"), world_size=6)


def test_tp_must_divide_attention_heads():
    with pytest.raises(ValueError, match=r"tensor parallel size 3 \(parallel\.tensor_parallel, --tp\) does not divide "
                                         r"num_attention_heads=32.*\[1, 2, 4, 8\]"):
        plan_layout(make_config("parallel.tensor_parallel=3"), qwen3_preset("qwen3-4b"), world_size=3)


def test_tp_must_divide_query_groups():
    with pytest.raises(ValueError, match=r"tensor parallel size 4 \(parallel\.tensor_parallel, --tp\) does not divide "
                                         r"num_query_groups=2"):
        plan_layout(tiny_config("parallel.tensor_parallel=4"), qwen3_tiny(), world_size=4)


def test_tp_must_divide_ffn_width():
    arch = replace(qwen3_tiny(), ffn_hidden_size=385)
    with pytest.raises(ValueError, match=r"tensor parallel size 2 .* does not divide ffn_hidden_size=385"):
        plan_layout(tiny_config("parallel.tensor_parallel=2"), arch, world_size=2)


def test_pp_must_divide_layers_evenly():
    with pytest.raises(ValueError, match=r"pipeline parallel size 5 \(parallel\.pipeline_parallel, --pp\) does not "
                                         r"divide num_layers=36; "
                                         r"Megatron can split layers unevenly but this recipe does not"):
        plan_layout(make_config("parallel.pipeline_parallel=5"), qwen3_preset("qwen3-4b"), world_size=5)


def test_checkpoint_padded_vocab_must_suit_tp():
    arch = qwen3_preset("qwen3-4b")
    config = make_config("parallel.tensor_parallel=2")
    with pytest.raises(ValueError, match=r"the checkpoint's padded vocabulary 151937 must be >= vocab_size=151936 and "
                                         r"divisible by the tensor parallel size 2 \(parallel\.tensor_parallel\); "
                                         r"convert"):
        plan_layout(config, arch, world_size=2, padded_vocab=151_937, allow_overflow=True)
    with pytest.raises(ValueError, match=r"padded vocabulary 151808 must be >= vocab_size=151936"):
        plan_layout(config, arch, world_size=2, padded_vocab=151_808, allow_overflow=True)
    # a checkpoint converted at TP 4 (padded to 512) also serves TP 2
    layout = plan_layout(config, arch, world_size=2, padded_vocab=padded_vocab_size(151_936, 4), allow_overflow=True)
    assert (layout.padded_vocab, layout.vocab_shard) == (152_064, 76_032)


def test_tp_must_stay_inside_a_node():
    arch = qwen3_preset("qwen3-4b")
    with pytest.raises(ValueError, match=r"parallel\.tensor_parallel: 8 exceeds --gpus-per-node 4.*inside a node"):
        plan_layout(make_config("parallel.tensor_parallel=8"), arch, world_size=8, gpus_per_node=4)
    # nodes of 6 GPUs: a TP-4 group would straddle two of them
    with pytest.raises(ValueError, match=r"--gpus-per-node 6.*divides 6 \(got 4\)"):
        plan_layout(make_config("parallel.tensor_parallel=4"), arch, world_size=12, gpus_per_node=6)


def test_minibatch_must_split_over_data_parallel_ranks():
    # 128 prompts / 8 mini-batches × G 8 = 128 responses per mini-batch; DP = 6 / 2 = 3
    with pytest.raises(ValueError, match=r"schedule\.prompts_per_step / schedule\.minibatches_per_step × "
                                         r"algorithm\.group_size.*128 / 8 × 8 = 128 responses cannot be split "
                                         r"over 3 data-parallel ranks"):
        plan_layout(make_config("parallel.tensor_parallel=2"), qwen3_preset("qwen3-4b"), world_size=6)


@pytest.mark.parametrize("prompts, minibatches, group_size, dp", [
    (16, 2, 4, 3), (16, 2, 4, 4), (12, 3, 2, 8), (12, 3, 2, 4), (8, 8, 3, 3), (8, 8, 3, 2), (6, 4, 2, 1),
])
def test_batch_rule_is_exactly_minibatch_sample_ids_rule(prompts, minibatches, group_size, dp):
    config = tiny_config(f"schedule.prompts_per_step={prompts}", f"schedule.minibatches_per_step={minibatches}",
                         f"algorithm.group_size={group_size}")
    samples = [Sample(group=i // group_size, student_prompt=[1], teacher_prompt=[1], response=[2],
                      rollout_logprobs=[0.0], reward=0.0, correct=False) for i in range(prompts * group_size)]
    batch = make_step_batch(1, samples, group_size)
    try:
        minibatch_sample_ids(batch, minibatches, dp, 0)
        trainer_accepts = True
    except ValueError:
        trainer_accepts = False
    try:
        plan_layout(config, qwen3_tiny(), world_size=dp)
        planner_accepts = True
    except ValueError:
        planner_accepts = False
    assert planner_accepts == trainer_accepts


def test_micro_batches_must_have_one_shape_with_pipeline_parallelism():
    # 8 prompts / 2 mini-batches × G 4 = 16 responses per mini-batch, 8 per DP rank;
    # without PP a micro-batch larger than the slice is the whole slice
    assert plan_layout(tiny_config("schedule.micro_batch_size=16"), qwen3_tiny(),
                       world_size=2).micro_batches_per_minibatch == 1
    # with PP every micro-batch must have the same shape (Megatron's P2P buffers)
    with pytest.raises(ValueError, match=r"schedule\.micro_batch_size: 3 does not divide the 8 samples"
                                         r".*\[1, 2, 4, 8\]"):
        plan_layout(tiny_config("schedule.micro_batch_size=3", "parallel.pipeline_parallel=2"), qwen3_tiny(),
                    world_size=4)
    # without PP a shorter last micro-batch is fine
    assert plan_layout(tiny_config("schedule.micro_batch_size=3"), qwen3_tiny(),
                       world_size=2).micro_batches_per_minibatch == 3


def test_sequence_must_fit_the_position_embeddings():
    with pytest.raises(ValueError, match=r"data\.max_prompt_tokens \+ rollout\.max_response_tokens: 6144 tokens exceed "
                                         r"the model's max_position_embeddings=2048"):
        plan_layout(tiny_config("data.max_prompt_tokens=2048", "rollout.max_response_tokens=4096"), qwen3_tiny(),
                    world_size=1)


# --------------------------------------------------------------------------- rollout


def test_engines_must_fit_the_rollout_gpus():
    config = make_config("rollout.num_engines=4", "rollout.engine_tensor_parallel=2", "rollout.gpus_per_engine=2")
    with pytest.raises(ValueError, match=r"rollout\.num_engines × rollout\.engine_tensor_parallel = 4 × 2 GPUs "
                                         r"exceed "
                                         r"--rollout-gpus 4"):
        plan_layout(config, qwen3_preset("qwen3-8b"), world_size=8, rollout_gpus=4, allow_overflow=True)


def test_engine_tp_follows_vllm_head_rules():
    with pytest.raises(ValueError, match=r"rollout\.engine_tensor_parallel: 3 does not divide the model's "
                                         r"num_attention_heads=32"):
        plan_layout(make_config("rollout.engine_tensor_parallel=3"), qwen3_preset("qwen3-4b"), world_size=8,
                    allow_overflow=True)
    arch = replace(qwen3_tiny(), num_attention_heads=24, num_query_groups=8)
    with pytest.raises(ValueError, match=r"rollout\.engine_tensor_parallel: 12 and the model's num_query_groups=8"):
        plan_layout(tiny_config("rollout.engine_tensor_parallel=12"), arch, world_size=1)
    # more engine ranks than KV heads: vLLM replicates the KV heads, so 16 over 8 is fine
    layout = plan_layout(make_config("rollout.engine_tensor_parallel=16", "schedule.micro_batch_size=1"),
                         qwen3_preset("qwen3-1.7b"), world_size=4)
    assert layout.rollout.engine_tensor_parallel == 16
    with pytest.raises(ValueError, match=r"rollout\.engine_tensor_parallel: 16 exceeds --gpus-per-node 8"):
        plan_layout(make_config("rollout.engine_tensor_parallel=16"), qwen3_preset("qwen3-1.7b"), world_size=4,
                    gpus_per_node=8, allow_overflow=True)


def test_gpu_engines_need_gpus_in_their_bundle():
    with pytest.raises(ValueError, match=r"rollout\.gpus_per_engine: 0\.0 "
                                         r".*set it to rollout\.engine_tensor_parallel=1"):
        plan_layout(make_config("rollout.gpus_per_engine=0"), qwen3_preset("qwen3-4b"), world_size=8, rollout_gpus=4,
                    allow_overflow=True)


def test_cpu_sized_kv_cache_cannot_hold_a_sequence_on_gpu():
    # the config's default KV cache (256 MiB, sized for CPU engines) holds 1.8k Qwen3-4B tokens
    config = make_config("parallel.tensor_parallel=2", "schedule.micro_batch_size=2", "rollout.num_engines=4",
                         "rollout.gpus_per_engine=1", "rollout.kv_cache_bytes=268435456")
    with pytest.raises(ValueError, match=r"rollout\.kv_cache_bytes.*holds no sequence of max_model_len=6144"):
        plan_layout(config, qwen3_preset("qwen3-4b"), world_size=4, rollout_gpus=4)


# --------------------------------------------------------------------------- memory


def test_stage_parameters_add_up_to_the_model():
    for name in QWEN3_PRESETS:
        arch = qwen3_preset(name)
        padded = padded_vocab_size(arch.vocab_size, 1)
        padding = (padded - arch.vocab_size) * arch.hidden_size * (1 if arch.tied_embeddings else 2)
        assert stage_parameters(arch, tp=1, pp=1, padded_vocab=padded) == (arch.num_parameters() + padding,)
        # PP 2: the same layers, and a tied model's last stage holds its own output copy
        split = stage_parameters(arch, tp=1, pp=2, padded_vocab=padded)
        copy = padded * arch.hidden_size if arch.tied_embeddings else 0
        assert sum(split) == arch.num_parameters() + padding + copy


def test_memory_items_by_hand():
    """Tiny Qwen3 (4 layers, h 128, f 384, 4 heads / 2 KV heads of 64, vocab 512, tied) at
    TP 2 × PP 2 × DP 2, bf16, micro-batch 2 of 24 + 40 = 64 tokens, 8 prompts × G 4 in 2
    mini-batches: 16 samples per mini-batch, 8 per DP rank, 4 micro-batches."""
    config = tiny_config("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "schedule.micro_batch_size=2")
    layout = plan_layout(config, qwen3_tiny(), world_size=8)
    assert (layout.tp, layout.pp, layout.dp, layout.layers_per_stage) == (2, 2, 2, 2)
    assert (layout.heads_per_rank, layout.query_groups_per_rank) == (2, 1)
    assert (layout.padded_vocab, layout.vocab_shard, layout.sequence_length) == (512, 256, 64)
    assert (layout.samples_per_minibatch, layout.samples_per_rank, layout.micro_batches_per_minibatch) == (16, 8, 4)

    # per layer and TP rank: (QKV 128·(256 + 2·128) + proj 256·128 + MLP 3·128·384) / 2 + norms 2·128 + 2·64
    per_layer = (65_536 + 32_768 + 147_456) // 2 + 256 + 128
    assert per_layer == 123_264
    first = 2 * per_layer + 256 * 128  # + embedding shard
    last = 2 * per_layer + 128 + 256 * 128  # + final norm + output copy of the tied embedding
    assert layout.params_per_stage == (first, last) == (279_296, 279_424)

    # per layer, micro-batch of 2 × 64 tokens, bf16: 2·64·2·(4·128 + (4·256 + 4·128 + 5·384) / 2) = 256 · 2_240
    activation = 2 * 64 * 2 * (4 * 128 + (4 * 256 + 4 * 128 + 5 * 384) // 2)
    assert activation == 573_440
    stage0, stage1 = layout.memory_per_stage
    assert stage0.weights == first * 2
    assert stage0.gradients == first * 4
    assert stage0.optimizer_state == first * 12 // 2  # fp32 main params + Adam m, v over DP 2
    assert stage0.reference_weights == first * 2  # SDPG-URKL anchors on π_ref
    assert stage0.activations == 2 * 2 * activation  # 2 layers × 2 micro-batches in flight (1F1B, first stage)
    assert stage0.teacher_states == 0 and stage0.loss_buffers == 0
    assert stage0.overhead == CUDA_OVERHEAD_BYTES
    assert stage1.weights == last * 2 and stage1.optimizer_state == last * 6
    assert stage1.activations == 2 * 1 * activation  # the last stage holds one micro-batch
    assert stage1.teacher_states == 8 * 40 * 128 * 2  # 8 samples × 40 response tokens × h × bf16
    # three [min(chunk, 2 · 40), 256] fp32 buffers (chunk = 512 MiB / (4 · 256) ≫ 80) + saved [80, 128] bf16 states
    assert stage1.loss_buffers == 3 * 80 * 256 * 4 + 80 * 128 * 2
    assert stage0.total == sum(value for _, value in stage0.items())
    assert layout.memory is max(layout.memory_per_stage, key=lambda e: e.total)


def test_memory_switches():
    base = ("parallel.tensor_parallel=2", "schedule.micro_batch_size=2")
    # GRPO keeps π_ref (k1 KL in the reward) but has no teacher; OPCD has neither
    grpo = plan_layout(tiny_config(*base, "algorithm.beta_base=0", "algorithm.anchor=none", "algorithm.alpha=0",
                                   "algorithm.kl_in_reward_coef=0.001"), qwen3_tiny(), world_size=2).memory
    assert grpo.reference_weights > 0 and grpo.teacher_states == 0
    opcd = plan_layout(tiny_config(*base, "algorithm.use_outcome=false", "algorithm.anchor=none", "algorithm.alpha=0"),
                       qwen3_tiny(), world_size=2).memory
    assert opcd.reference_weights == 0 and opcd.teacher_states > 0
    # without the distributed optimizer every rank holds all of Adam's state
    whole = plan_layout(tiny_config(*base, "optimizer.use_distributed_optimizer=false"), qwen3_tiny(), world_size=4)
    sharded = plan_layout(tiny_config(*base), qwen3_tiny(), world_size=4)
    assert whole.memory.optimizer_state == 2 * sharded.memory.optimizer_state
    # fp32 params: 4 B weights, Adam m and v only (the params are the main params), and no
    # flash attention: the s² term of the unfused path appears
    fp32 = plan_layout(tiny_config(*base, "model.params_dtype=float32"), qwen3_tiny(), world_size=2)
    params = fp32.params_per_rank
    assert (fp32.memory.weights, fp32.memory.optimizer_state) == (params * 4, params * 8 // 1)
    flash_free = activation_bytes_per_layer(qwen3_tiny(), tp=2, sequence_length=64, micro_batch_size=2,
                                            bytes_per_value=4, flash_attention=False)
    assert flash_free == 4 * 64 * 2 * 2_240 + 5 * 4 * 64 * 64 * 2 // 2 * 4 // 2


def test_recomputation_memory_by_hand():
    """test_memory_items_by_hand's launch (2 layers per stage, 2 micro-batches in flight on
    stage 0, one layer's count 573,440 B, a unit's input 2·64·2·128 = 32,768 B) with each
    kind of recomputation."""
    base = ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "schedule.micro_batch_size=2")
    layer, unit_input = 573_440, 2 * 64 * 2 * 128

    def stage0(*overrides, dtype="bfloat16"):
        config = tiny_config(*base, f"model.params_dtype={dtype}", *overrides)
        return plan_layout(config, qwen3_tiny(), world_size=8, allow_overflow=True)

    plain = stage0().memory_per_stage[0].activations
    assert plain == 2 * 2 * layer
    full = stage0("parallel.recompute_granularity=full", "parallel.recompute_num_layers=1")
    # 2 in flight × 2 units' inputs, plus one unit (1 layer) re-materialised in its backward
    assert full.memory_per_stage[0].activations == 2 * 2 * unit_input + layer
    assert "activation recomputation: full, uniform units of 1 layer" in full.describe()
    two = stage0("parallel.recompute_granularity=full", "parallel.recompute_num_layers=2")
    assert two.memory_per_stage[0].activations == 2 * 1 * unit_input + 2 * layer
    block = stage0("parallel.recompute_granularity=full", "parallel.recompute_method=block",
                   "parallel.recompute_num_layers=1")
    assert block.memory_per_stage[0].activations == 2 * (unit_input + layer) + layer
    assert "the first 1 layer of each stage" in block.describe()
    # selective recomputes core attention: with flash attention (bf16) there is nothing to drop
    assert stage0("parallel.recompute_granularity=selective").memory_per_stage[0].activations == plain
    # fp32 (unfused attention): every layer loses the s² term, one layer has it back while recomputed
    attention = 5 * 4 * 64 * 64 * 2 // 2 * 4 // 2
    fp32_layer = 4 * 64 * 2 * 2_240
    fp32 = stage0("parallel.recompute_granularity=selective", dtype="float32")
    assert fp32.memory_per_stage[0].activations == 2 * 2 * fp32_layer + attention
    assert stage0(dtype="float32").memory_per_stage[0].activations == 2 * 2 * (fp32_layer + attention)


def test_sequence_parallel_memory_by_hand():
    """test_memory_items_by_hand's launch with sequence parallelism: the 4h replicated
    term of every layer and each recomputed unit's input are split over TP 2 too."""
    base = ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "schedule.micro_batch_size=2",
            "parallel.sequence_parallel=true")
    layer = 2 * 64 * 2 * (4 * 128 // 2 + (4 * 256 + 4 * 128 + 5 * 384) // 2)
    assert layer == 507_904  # 573,440 without sequence parallelism
    layout = plan_layout(tiny_config(*base), qwen3_tiny(), world_size=8)
    assert layout.memory_per_stage[0].activations == 2 * 2 * layer
    assert "TP 2 × PP 2 × DP 2, sequence parallel" in layout.describe()
    full = plan_layout(tiny_config(*base, "parallel.recompute_granularity=full"), qwen3_tiny(), world_size=8)
    assert full.memory_per_stage[0].activations == 2 * 2 * (2 * 64 * 2 * 128 // 2) + layer


def test_sequence_parallel_needs_tp_that_splits_the_sequences():
    from sdpg_megatron.model.provider import check_sequence_parallel

    with pytest.raises(ValueError, match=r"config field parallel\.sequence_parallel: needs tensor parallelism"):
        plan_layout(tiny_config("parallel.sequence_parallel=true"), qwen3_tiny(), world_size=1)
    with pytest.raises(ValueError, match=r"sequences are padded to multiples of 8: use a tensor parallel size that "
                                         r"divides 8"):
        check_sequence_parallel(tensor_parallel=3, sequence_parallel=True)
    check_sequence_parallel(tensor_parallel=8, sequence_parallel=True)
    check_sequence_parallel(tensor_parallel=3, sequence_parallel=False)


def test_recomputation_units_must_fit_the_stages():
    base = ("parallel.pipeline_parallel=2", "parallel.recompute_granularity=full")
    with pytest.raises(ValueError, match=r"parallel\.recompute_num_layers=3 must divide the 2 layers of each pipeline "
                                         r"stage with recompute_method=uniform .* choose one of \[1, 2\]"):
        plan_layout(tiny_config(*base, "parallel.recompute_num_layers=3"), qwen3_tiny(), world_size=2)
    with pytest.raises(ValueError, match=r"parallel\.recompute_num_layers=3 must be in \[1, 2\]"):
        plan_layout(tiny_config(*base, "parallel.recompute_method=block", "parallel.recompute_num_layers=3"),
                    qwen3_tiny(), world_size=2)
    with pytest.raises(ValueError, match=r"config field parallel\.recompute_granularity: must be one of"):
        plan_layout(tiny_config("parallel.recompute_granularity=layers"), qwen3_tiny(), world_size=1)
    with pytest.raises(ValueError, match=r"config field parallel\.recompute_num_layers: must be >= 1"):
        plan_layout(tiny_config("parallel.recompute_num_layers=0"), qwen3_tiny(), world_size=1)


def test_activations_advice_names_recomputation():
    with pytest.raises(ValueError, match=r"largest item is activations .*set parallel\.recompute_granularity=full"):
        plan_layout(make_config("parallel.tensor_parallel=2", "schedule.micro_batch_size=16"), qwen3_preset("qwen3-4b"),
                    world_size=4)
    # ... and full recomputation is what lets that micro-batch fit
    layout = plan_layout(make_config("parallel.tensor_parallel=2", "schedule.micro_batch_size=16",
                                     "parallel.recompute_granularity=full"), qwen3_preset("qwen3-4b"), world_size=4)
    assert layout.fits


# --------------------------------------------------------------------------- recommended launches

# RECOMMENDED (tests/helpers.py): the layouts the sbatch scripts use on nodes of 8 × 80 GiB GPUs


@pytest.mark.parametrize("name", sorted(RECOMMENDED))
def test_recommended_layouts_fit_80_gib(name):
    overrides, world_size, rollout_gpus = RECOMMENDED[name]
    if not any(o.startswith("rollout.gpus_per_engine=") for o in overrides):
        overrides = [*overrides, "rollout.gpus_per_engine=1"]
    layout = plan_layout(make_config(*overrides), qwen3_preset(name), world_size=world_size, gpus_per_node=8,
                         rollout_gpus=rollout_gpus)
    assert layout.fits and layout.memory.total <= 0.9 * 80 * GIB
    assert layout.rollout.full_length_sequences >= 16
    text = layout.describe()
    assert f"TP {layout.tp} × PP {layout.pp} × DP {layout.dp}" in text and "fits" in text


SCRIPTS = {"sdpg_qwen3_32b.sh": "qwen3-32b", "sdpg_qwen3_30b_a3b.sh": "qwen3-30b-a3b",
           "sdpg_qwen3_235b_a22b.sh": "qwen3-235b-a22b"}


def _pasted_plan(script: Path) -> list[str]:
    """The dry-run lines a script's header quotes (trainer, memory table, rollout), with
    wrapped lines joined."""
    lines = []
    for line in script.read_text().splitlines():
        if line.startswith("#   ") and line[4:].split(" ")[0] in ("trainer", "memory", "rollout"):
            lines.append(line[4:])
        elif lines and line.startswith("#              "):  # a wrapped line
            lines[-1] += " " + line.strip("# ")
        elif lines and line.startswith("#     "):  # a memory row
            lines.append(line[4:])
        elif lines:
            break
    return lines


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_dry_run_passes_and_matches_its_header(script, tmp_path):
    """`bash examples/<script> --dry-run` plans the script's layout with its ARCH preset
    (no checkpoint here) and prints the table its header quotes."""
    env = {**os.environ, "HOME": str(tmp_path), "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    env.pop("SDPG_VENV", None)
    result = subprocess.run(["bash", str(ROOT / "examples" / script), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    assert out[-1] == "dry run: OK" and f"planned with the {SCRIPTS[script]} preset" in result.stdout
    printed = [line for line in out if line.split(" ")[0] in ("trainer", "rollout") or line.startswith("memory")]
    start, end = out.index(printed[1]), out.index(printed[2])  # the memory table, header to total
    assert _pasted_plan(ROOT / "examples" / script) == [printed[0], *out[start:end], printed[2]]


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"])
def test_recommended_micro_batch_is_the_largest_that_fits(name):
    # (Qwen3-1.7B keeps the default 4 with room to spare: its responses are half as long)
    overrides, world_size, _ = RECOMMENDED[name]
    mbs = int(next(o for o in overrides if o.startswith("schedule.micro_batch_size=")).split("=")[1])
    larger = make_config(*overrides, f"schedule.micro_batch_size={2 * mbs}")
    assert not plan_layout(larger, qwen3_preset(name), world_size=world_size, allow_overflow=True).fits


def test_32b_on_one_node_without_tp_does_not_fit():
    config = make_config("parallel.tensor_parallel=1")
    with pytest.raises(ValueError, match=r"the trainer does not fit: stage 0 needs .* at TP 1 × PP 1 × DP 8 "
                                         r"\(budget 72\.0 GiB = 90% of 80\); the largest item is activations"):
        plan_layout(config, qwen3_preset("qwen3-32b"), world_size=8, gpus_per_node=8)
    layout = plan_layout(config, qwen3_preset("qwen3-32b"), world_size=8, gpus_per_node=8, allow_overflow=True)
    assert not layout.fits and "DOES NOT FIT" in layout.describe()
    # even at micro-batch 1 the unsharded weights, gradients and π_ref alone exceed the GPU
    small = plan_layout(make_config("parallel.tensor_parallel=1", "schedule.micro_batch_size=1"),
                        qwen3_preset("qwen3-32b"), world_size=8, allow_overflow=True).memory
    assert small.weights + small.gradients + small.reference_weights > 80 * GIB


def test_optimizer_heavy_layout_names_the_optimizer_and_dp():
    # Qwen3-8B at TP 4 × PP 2 on 8 GPUs of 24 GiB: DP 1, so Adam's 12 B/param stay whole on
    # each GPU (short sequences keep the activations below them)
    config = make_config("parallel.tensor_parallel=4", "parallel.pipeline_parallel=2", "schedule.micro_batch_size=1",
                         "data.max_prompt_tokens=512", "rollout.max_response_tokens=1024")
    layout = plan_layout(config, qwen3_preset("qwen3-8b"), world_size=8, allow_overflow=True, gpu_memory_gib=24)
    assert layout.dp == 1 and layout.memory.largest[0] == "optimizer_state" and not layout.fits
    with pytest.raises(ValueError, match=r"largest item is optimizer_state .*add data-parallel ranks"):
        plan_layout(config, qwen3_preset("qwen3-8b"), world_size=8, gpu_memory_gib=24)
    # DP 4 over 32 GPUs shards Adam's state four ways
    assert plan_layout(config, qwen3_preset("qwen3-8b"), world_size=32, gpu_memory_gib=24).fits


def test_float32_params_are_told_to_use_bfloat16():
    with pytest.raises(ValueError, match=r"set model\.params_dtype=bfloat16 first"):
        plan_layout(make_config("parallel.tensor_parallel=2", "model.params_dtype=float32"), qwen3_preset("qwen3-4b"),
                    world_size=4)


def test_describe_shows_the_launch():
    overrides, world_size, rollout_gpus = RECOMMENDED["qwen3-32b"]
    layout = plan_layout(make_config(*overrides), qwen3_preset("qwen3-32b"), world_size=world_size, gpus_per_node=8,
                         rollout_gpus=rollout_gpus)
    text = layout.describe()
    for expected in ("Qwen3 32.762B", "32 GPUs (4 nodes × 8): TP 8 × PP 2 × DP 2", "32 layers per stage",
                     "8 heads, 1 KV heads", "151,936 padded to 152,576; 19,072 rows per TP rank",
                     "6,144 tokens = 2,048 prompt + 4,096 response", "128 prompts × G 8", "8 mini-batches of 128",
                     "64 samples per mini-batch = 64 micro-batches of 1", "stage 0   stage 1", "activations",
                     "4 engine(s) × TP 2 = 8 GPUs (of 8), bfloat16"):
        assert expected in text, expected


def test_planner_agrees_with_the_model_provider():
    from sdpg_megatron.model.provider import check_layout

    arch = qwen3_preset("qwen3-4b")
    for tp in range(1, 9):
        for pp in (1, 2, 3, 4, 5, 6):
            try:
                check_layout(arch, tensor_parallel=tp, pipeline_parallel=pp)
                provider_accepts = True
            except ValueError:
                provider_accepts = False
            config = make_config(f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
                                 "schedule.micro_batch_size=1")
            try:
                plan_layout(config, arch, world_size=tp * pp, allow_overflow=True)
                planner_accepts = True
            except ValueError:
                planner_accepts = False
            assert planner_accepts == provider_accepts, (tp, pp)


# --------------------------------------------------------------------------- the command line


def test_train_dry_run_prints_the_plan_or_the_fix(tmp_path, capsys):
    from sdpg_megatron.cli import parse_args

    common = ["--dry-run", "--arch", "qwen3-4b", "--hf-dir", str(tmp_path / "not-downloaded"),
              "--train-data", str(tmp_path / "dapo.parquet"), "--world-size", "16", "--gpus-per-node", "16",
              "--set", "model.params_dtype=bfloat16", "--set", "schedule.micro_batch_size=1"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--tp", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "TP 2 × PP 1 × DP 8" in out and "dry run: OK" in out and "planned with the qwen3-4b preset" in out
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--tp", "16"])
    assert exit_info.value.code == 2
    assert "tensor parallel size 16 (parallel.tensor_parallel, --tp) does not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, "--tp", "3"])
    assert exit_info.value.code == 2 and "--world-size 16 is not divisible" in capsys.readouterr().err
