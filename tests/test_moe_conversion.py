"""tools/hf_to_mcore.py --ep and tools/mcore_to_hf.py on a tiny random Qwen3-MoE (8 experts, top-2).

- HF (transformers' `save_pretrained`: per-expert safetensors, `num_local_experts` in
  config.json) → mcore for TP2×EP2 and for PP2×EP4 → HF is bit-exact: every safetensors
  tensor `torch.equal`, config.json the same model for transformers, which loads it;
- the checkpoints load through `load_mcore_weights` (dist_checkpointing) on 2 gloo ranks at
  TP2×EP2, TP2 with experts over TP (ETP2) and EP2: every parameter equals the one
  `load_hf_weights` gives at that layout, the logits are identical, and they match
  transformers' (≤ 1e-4, fp32);
- the model tensors Megatron itself saves at TP2×EP2 (what a training checkpoint holds) export
  bit-exact through tools/mcore_to_hf.py, as a training checkpoint;
- a dense checkpoint for a MoE config, or other experts, fails naming model.mcore_dir and
  the fix; an --ep that does not divide num_experts exits 2 naming --ep, leaving nothing;
  --etp defaults to --tp at EP 1, and a dense model refuses --ep.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, pipeline_forward, run_tool, run_tool_in_process, tiny_hf_model, tiny_moe_hf_model

CONVERSIONS = {"tp2ep2": ["--tp", "2", "--ep", "2"], "pp2ep4": ["--pp", "2", "--ep", "4"]}
# (tp, ep, pp, etp, checkpoint) on 2 ranks (TP × DP, regrouped as ETP × EP × expert-DP): the
# layout tp2ep2 was converted for, experts split over TP instead (EP1, ETP2), and EP2 for the
# TP1 conversion (whose vocabulary padding a TP1 model uses)
WORLD = 2
LOAD_LAYOUTS = [(2, 2, 1, 1, "tp2ep2"), (2, 1, 1, 2, "tp2ep2"), (1, 2, 1, 1, "pp2ep4")]
SAVED_AT = (2, 2, 1, 1)  # the layout whose Megatron save stands in for a training checkpoint
INPUT_IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    _, model = tiny_moe_hf_model()
    path = tmp_path_factory.mktemp("hf_moe")
    model.save_pretrained(path, max_shard_size="300KB")  # several shards, experts spread over them
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """tp2ep2 by the command line; pp2ep4 by the function it calls (in this process: faster)."""
    from sdpg_megatron.model.convert import hf_to_mcore

    out = {name: tmp_path_factory.mktemp("mcore") / name for name in CONVERSIONS}
    result = run_tool("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(out["tp2ep2"]), *CONVERSIONS["tp2ep2"])
    assert result.returncode == 0, result.stderr[-3000:]
    hf_to_mcore(hf_dir, out["pp2ep4"], tp=1, pp=2, ep=4, progress=False)
    return out


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file_name in weight_map.items():
        with safe_open(directory / file_name, "pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


def _assert_same_hf_model(original: Path, back: Path) -> int:
    """Every safetensors tensor bit-identical (names, dtypes, values), the same config for
    transformers, which loads the result; returns the number of tensors compared."""
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    from sdpg_megatron.model.qwen3 import from_hf_config

    expected, restored = _safetensors(original), _safetensors(back)
    assert sorted(expected) == sorted(restored)
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    configs = [json.loads((d / "config.json").read_text()) for d in (original, back)]
    assert from_hf_config(configs[0]) == from_hf_config(configs[1])
    loaded = [AutoConfig.from_pretrained(d).to_dict() for d in (original, back)]
    for config in loaded:
        config.pop("_name_or_path")
    assert loaded[0] == loaded[1]
    model = Qwen3MoeForCausalLM.from_pretrained(back)
    assert model.config.num_experts == 8
    return len(expected)


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_round_trip_is_bit_exact(hf_dir, converted, name, tmp_path, capsys):
    back = tmp_path / "hf_back"
    code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(converted[name]), "--out", str(back),
                                       capsys=capsys)
    assert code == 0, stderr[-3000:]
    # embedding, output layer, final norm; per layer 9 (norms, q, k, v, o, q/k norms, router) + 8 experts × 3
    assert _assert_same_hf_model(hf_dir, back) == 3 + 2 * (9 + 8 * 3)
    assert (back / "generation_config.json").is_file()
    info = json.loads((converted[name] / "sdpg_model.json").read_text())
    tp, pp, ep = (int(CONVERSIONS[name][CONVERSIONS[name].index(flag) + 1]) if flag in CONVERSIONS[name] else 1
                  for flag in ("--tp", "--pp", "--ep"))
    assert info["converted_for"] == {"tensor_parallel": tp, "pipeline_parallel": pp, "expert_parallel": ep,
                                     "expert_tensor_parallel": 1}
    assert info["arch"]["num_experts"] == 8 and info["padded_vocab"] == (512 if tp == 2 else 384)


def _load_at_layouts(rank: int, world_size: int, mcore_dirs: dict, hf_dir: str, saved_dir: str,
                     expected: torch.Tensor) -> dict:
    """Per layout: parameters loaded from the checkpoint vs from HF, and their logits on
    INPUT_IDS (vs each other and vs transformers' `expected`)."""
    from megatron.core import dist_checkpointing

    from sdpg_megatron.model.convert import check_mcore_source, load_mcore_weights, read_model_info
    from sdpg_megatron.model.hf_io import HFCheckpoint
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    source = HFCheckpoint(hf_dir)
    results = {}
    for tp, ep, pp, etp, name in LOAD_LAYOUTS:
        groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                     expert_tensor_parallel=etp, seed=0)
        try:
            arch, padded_vocab, dtype = read_model_info(mcore_dirs[name])
            # what the trainer checks before loading model.mcore_dir
            check_mcore_source(mcore_dirs[name], source.arch, padded_vocab_size(arch.vocab_size, tp), tp=tp)
            config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                        expert_tensor_parallel=etp, params_dtype=dtype)
            models = [model_provider(arch, config, pre_process=groups.is_first_stage,
                                     post_process=groups.is_last_stage, padded_vocab=padded_vocab).eval()
                      for _ in range(2)]
            with torch.no_grad():
                for param in models[0].parameters():
                    param.fill_(-123.0)  # anything not loaded shows
            load_mcore_weights(models[0], mcore_dirs[name])
            load_hf_weights(models[1], arch, source.read, padded_vocab=padded_vocab, tp_size=tp, tp_rank=groups.tp_rank,
                            pp_size=pp, pp_rank=groups.pp_rank, ep_size=ep, ep_rank=groups.ep_rank, etp_size=etp,
                            etp_rank=groups.etp_rank)
            params = [dict(model.named_parameters()) for model in models]
            unequal = [key for key in params[1] if not torch.equal(params[0][key], params[1][key])]
            local_experts = sum(1 for key in params[0] if ".layers.0.mlp.experts.local_experts." in key
                                and key.endswith("linear_fc2.weight"))
            logits = [pipeline_forward(model, config, INPUT_IDS, return_hidden=False) for model in models]
            result = {"unequal": unequal, "local_experts": local_experts, "etp_size": groups.etp_size}
            if groups.is_last_stage:
                full = []
                for shard in logits:
                    parts = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(parts, shard.contiguous(), group=groups.tp_group)
                    full.append(torch.cat(parts, -1)[..., :VOCAB])
                result["mcore_vs_hf_loaded"] = (full[0] - full[1]).abs().max().item()
                result["vs_transformers"] = (full[0] - expected).abs().max().item()
            if (tp, ep, pp, etp) == SAVED_AT:  # Megatron's own save of the model, as a training checkpoint's
                if rank == 0:
                    Path(saved_dir).mkdir(parents=True)
                dist.barrier()
                dist_checkpointing.save(models[0].sharded_state_dict(metadata={"singleton_local_shards": False}),
                                        saved_dir)
            results[(tp, ep, pp, etp, name)] = result
        finally:
            destroy_parallel()
    return results


@pytest.fixture(scope="module")
def loaded(hf_dir, converted, tmp_path_factory):
    from transformers import Qwen3MoeForCausalLM

    with torch.no_grad():  # here, not on the ranks: they then never import transformers
        expected = Qwen3MoeForCausalLM.from_pretrained(hf_dir).eval()(INPUT_IDS).logits
    saved = tmp_path_factory.mktemp("training") / "checkpoints" / "step_00000003"
    per_rank = run_distributed(_load_at_layouts, WORLD, {k: str(v) for k, v in converted.items()}, str(hf_dir),
                               str(saved), expected)
    return per_rank, saved


@pytest.mark.parametrize("layout", LOAD_LAYOUTS, ids=lambda l: f"tp{l[0]}ep{l[1]}pp{l[2]}etp{l[3]}-{l[4]}")
def test_converted_checkpoint_loads_at_expert_layouts(loaded, layout):
    per_rank, _ = loaded
    tp, ep, pp, etp, _ = layout
    results = [r[layout] for r in per_rank]
    for result in results:
        assert result["unequal"] == []  # every parameter as load_hf_weights gives it
        assert result["local_experts"] == 8 // ep and result["etp_size"] == etp
    last_stage = [r for r in results if "mcore_vs_hf_loaded" in r]
    assert len(last_stage) == WORLD // pp
    for result in last_stage:
        assert result["mcore_vs_hf_loaded"] == 0.0, result
        assert result["vs_transformers"] <= 1e-4, result


def test_megatron_saved_expert_checkpoint_exports_bit_exact(hf_dir, loaded, tmp_path, capsys):
    """tools/mcore_to_hf.py on a training checkpoint of a MoE run: the model tensors as Megatron
    saves them at TP2×EP2, with the files sdpg_megatron/checkpoint.py writes beside them."""
    from sdpg_megatron.export import find_export_source

    _, step_dir = loaded
    state = {"step": 3, "config": {"model": {"hf_dir": str(hf_dir), "params_dtype": "float32"}}}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))
    (step_dir / "layout.json").write_text(json.dumps({"tp": SAVED_AT[0], "pp": SAVED_AT[2], "ep": SAVED_AT[1],
                                                      "etp": SAVED_AT[3]}))
    (step_dir / "COMPLETE").write_text("")
    back = tmp_path / "hf_back"
    description = find_export_source(step_dir.parent).description
    assert "training checkpoint of step 3" in description and "TP 2 × PP 1 × EP 2 × ETP 1" in description
    code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(step_dir.parent), "--out", str(back),
                                       capsys=capsys)
    assert code == 0, stderr[-3000:]
    _assert_same_hf_model(hf_dir, back)


# --------------------------------------------------------------------------- wrong model, wrong layout


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    from sdpg_megatron.model.convert import hf_to_mcore

    _, model = tiny_hf_model(tied=False)
    hf = tmp_path_factory.mktemp("hf_dense")
    model.save_pretrained(hf)
    out = tmp_path_factory.mktemp("mcore_dense") / "ckpt"
    hf_to_mcore(hf, out, tp=1, pp=1, progress=False)
    return out


def test_checkpoint_of_another_model_is_refused_naming_the_fix(hf_dir, converted, dense_checkpoint):
    from sdpg_megatron.model.convert import check_mcore_source, read_model_info
    from sdpg_megatron.model.hf_io import HFCheckpoint
    from sdpg_megatron.model.qwen3 import replace

    moe = HFCheckpoint(hf_dir).arch
    with pytest.raises(ValueError, match=r"model\.mcore_dir=.*ckpt holds a dense Qwen3, but model\.hf_dir describes "
                                         r"a Qwen3-MoE with 8 experts.*num_experts=0 there, 8 in model\.hf_dir.*"
                                         r"tools/hf_to_mcore\.py"):
        check_mcore_source(dense_checkpoint, moe, 384, tp=1)
    dense, _, _ = read_model_info(dense_checkpoint)
    with pytest.raises(ValueError, match=r"holds a Qwen3-MoE with 8 experts.*describes a dense Qwen3"):
        check_mcore_source(converted["pp2ep4"], dense, 384, tp=1)
    with pytest.raises(ValueError, match=r"num_experts=8 there, 16 in model\.hf_dir.*tools/hf_to_mcore\.py"):
        check_mcore_source(converted["pp2ep4"], replace(moe, num_experts=16), 384, tp=1)
    with pytest.raises(ValueError, match=r"pads the vocabulary to 384 rows.*--tp 2"):
        check_mcore_source(converted["pp2ep4"], moe, 512, tp=2)


def test_dense_checkpoint_loaded_into_moe_model_is_a_value_error(hf_dir, dense_checkpoint):
    from sdpg_megatron.model.convert import _megatron_process_group, load_mcore_weights
    from sdpg_megatron.model.hf_io import HFCheckpoint
    from sdpg_megatron.model.provider import model_provider, transformer_config

    arch = HFCheckpoint(hf_dir).arch
    with _megatron_process_group():
        model = model_provider(arch, transformer_config(arch))
        with pytest.raises(ValueError, match=r"model\.mcore_dir=.* does not hold this model's tensors.*hf_to_mcore"):
            load_mcore_weights(model, dense_checkpoint)


@pytest.mark.parametrize("args, message", [
    (["--ep", "3"], r"expert parallel size 3 \(parallel.expert_parallel, --ep\) does not divide num_experts=8; "
                    r"choose one of \[1, 2, 4, 8\]"),
    (["--ep", "16"], r"--ep\) does not divide num_experts=8"),
    (["--ep", "2", "--etp", "3"], r"--etp\) does not divide moe_ffn_hidden_size=64"),
], ids=["ep3", "ep16", "ep2etp3"])
def test_expert_layout_that_does_not_divide_exits_2(hf_dir, tmp_path, args, message, capsys):
    import re

    out = tmp_path / "out"
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(out), *args,
                                       capsys=capsys)
    assert code == 2 and "hf_to_mcore: error:" in stderr
    assert re.search(message, stderr), stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def _edit_tensor(hf_dir: Path, target: Path, name: str, value: torch.Tensor | None) -> Path:
    """A copy of hf_dir with tensor `name` replaced by `value` (None: removed)."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for path in hf_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    index = json.loads((target / "model.safetensors.index.json").read_text())
    file_name = index["weight_map"][name]
    tensors = load_file(target / file_name)
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
    save_file(tensors, target / file_name, metadata={"format": "pt"})
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


@pytest.mark.parametrize("name, value, message", [
    ("model.layers.1.mlp.experts.5.up_proj.weight", None,
     r"missing tensors.*model\.layers\.1\.mlp\.experts\.5\.up_proj"),
    ("model.layers.0.mlp.experts.2.down_proj.weight", torch.zeros(128, 32),
     r"wrong shapes.*experts\.2\.down_proj\.weight: \(128, 32\) \(expected \(128, 64\)\)"),
    ("model.layers.0.mlp.gate.weight", torch.zeros(4, 128),
     r"mlp\.gate\.weight: \(4, 128\) \(expected \(8, 128\)\)"),
], ids=["missing-expert", "expert-shape", "router-shape"])
def test_bad_expert_tensors_are_reported_before_writing(hf_dir, tmp_path, name, value, message, capsys):
    import re

    source = _edit_tensor(hf_dir, tmp_path / "hf", name, value)
    out = tmp_path / "out"
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(source), "--out", str(out), "--ep", "2",
                                       capsys=capsys)
    assert code == 2 and re.search(message, stderr), stderr[-2000:]
    assert not out.exists()


def test_tp_without_ep_splits_experts_like_dense_layers(hf_dir, tmp_path, capsys):
    """At EP 1 Megatron splits experts over the TP ranks: --etp defaults to --tp there."""
    out = tmp_path / "out"
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(out), "--tp", "2",
                                       capsys=capsys)
    assert code == 0, stderr[-2000:]
    assert json.loads((out / "sdpg_model.json").read_text())["converted_for"] == {
        "tensor_parallel": 2, "pipeline_parallel": 1, "expert_parallel": 1, "expert_tensor_parallel": 2}


def test_dense_model_refuses_ep(tmp_path, capsys):
    _, model = tiny_hf_model(tied=True)
    model.save_pretrained(tmp_path / "hf")
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(tmp_path / "hf"), "--out",
                                       str(tmp_path / "out"), "--ep", "2", capsys=capsys)
    assert code == 2 and "mixture-of-experts models only" in stderr and "--ep" in stderr
    assert not (tmp_path / "out").exists()
