"""tools/hf_to_mcore.py and tools/mcore_to_hf.py on tiny random Qwen3 checkpoints.

- HF → mcore (for TP2×PP2) → HF is bit-exact, and transformers loads the result;
- the Megatron checkpoint loads through dist_checkpointing at TP2×PP2, TP2 and TP1 and the
  model's logits match transformers';
- bad input fails with a clear message and leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, pipeline_forward, run_tool, run_tool_in_process, tiny_hf_model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny HF checkpoints, sharded over several safetensors files (index.json)."""
    dirs = {}
    for tied in (True, False):
        _, model = tiny_hf_model(tied)
        path = tmp_path_factory.mktemp(f"hf_{'tied' if tied else 'untied'}")
        model.save_pretrained(path, max_shard_size="300KB")
        assert (path / "model.safetensors.index.json").is_file()
        dirs[tied] = path
    return dirs


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    out = {}
    for tied, hf_dir in hf_dirs.items():
        mcore_dir = tmp_path_factory.mktemp("mcore") / "ckpt"
        result = run_tool("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(mcore_dir), "--tp", "2", "--pp", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "peak RSS" in result.stdout
        out[tied] = mcore_dir
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_is_bit_exact(hf_dirs, converted, tied, tmp_path):
    from transformers import Qwen3ForCausalLM

    back = tmp_path / "hf_back"
    result = run_tool("mcore_to_hf.py", "--mcore-dir", str(converted[tied]), "--out", str(back))
    assert result.returncode == 0, result.stderr[-3000:]
    original = Qwen3ForCausalLM.from_pretrained(hf_dirs[tied]).state_dict()
    restored = Qwen3ForCausalLM.from_pretrained(back).state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert (back / "generation_config.json").is_file()  # carried through the Megatron checkpoint
    assert json.loads((converted[tied] / "sdpg_model.json").read_text())["padded_vocab"] == 512


def _load_at_layouts(rank: int, world_size: int, mcore_dirs: dict, hf_dirs: dict, layouts: list) -> dict:
    from transformers import Qwen3ForCausalLM

    from sdpg_megatron.model.convert import load_mcore_weights, read_model_info
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    results = {}
    for tp, pp in layouts:
        groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
        try:
            for tied, mcore_dir in mcore_dirs.items():
                arch, padded_vocab, dtype = read_model_info(mcore_dir)
                config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype)
                model = model_provider(arch, config, pre_process=groups.is_first_stage,
                                       post_process=groups.is_last_stage, padded_vocab=padded_vocab).eval()
                with torch.no_grad():
                    for param in model.parameters():
                        param.fill_(-123.0)  # anything not loaded shows
                load_mcore_weights(model, mcore_dir)  # what the trainer does with model.mcore_dir
                input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
                logits = pipeline_forward(model, config, input_ids, return_hidden=False)
                if groups.is_last_stage:
                    parts = [torch.empty_like(logits) for _ in range(tp)]
                    dist.all_gather(parts, logits.contiguous(), group=groups.tp_group)
                    with torch.no_grad():
                        expected = Qwen3ForCausalLM.from_pretrained(hf_dirs[tied]).eval()(input_ids).logits
                    results[(tp, pp, tied)] = (torch.cat(parts, -1)[..., :VOCAB] - expected).abs().max().item()
        finally:
            destroy_parallel()
    return results


def test_checkpoint_loads_at_other_layouts(hf_dirs, converted):
    layouts = [(2, 2), (2, 1), (1, 1)]  # on 4 ranks: TP2×PP2, TP2×DP2, DP4
    per_rank = run_distributed(_load_at_layouts, 4, converted, hf_dirs, layouts)
    seen = {}
    for results in per_rank:
        for key, diff in results.items():
            seen.setdefault(key, []).append(diff)
    assert {(tp, pp) for tp, pp, _ in seen} == set(layouts)
    for key, diffs in seen.items():
        assert max(diffs) <= 1e-4, key


# --------------------------------------------------------------------------- bad input


def _copy_hf(hf_dir: Path, target: Path) -> Path:
    target.mkdir()
    for path in hf_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _rewrite_tensors(hf_dir: Path, change) -> None:
    """Apply `change` to each safetensors shard's tensor dict and rewrite shards + index."""
    from safetensors.torch import load_file, save_file

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    weight_map = {}
    for file_name in sorted(set(index["weight_map"].values())):
        tensors = load_file(hf_dir / file_name)
        change(tensors)
        save_file(tensors, hf_dir / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
    index["weight_map"] = weight_map
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize(
    "mutate, args, message",
    [
        (lambda d: _edit_config(d, model_type="llama"), [], "only Qwen3 .'qwen3'. and Qwen3-MoE"),
        (lambda d: _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight", None)), [],
         "missing tensors.*model.layers.1.mlp.up_proj.weight"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({"model.extra.weight": torch.zeros(2)})
                                    if "model.norm.weight" in t else None), [], "unexpected tensors.*model.extra.weight"),
        (lambda d: _rewrite_tensors(d, lambda t: t.update({"model.norm.weight": torch.zeros(7)})
                                    if "model.norm.weight" in t else None), [], r"wrong shapes.*model.norm.weight: \(7,\)"),
        (None, ["--tp", "8"], "does not divide num_attention_heads=4"),
        (None, ["--pp", "3"], "does not divide num_layers=4"),
        (lambda d: (d / "config.json").unlink(), [], "config.json not found"),
    ],
    ids=["not-qwen3", "missing-tensor", "extra-tensor", "wrong-shape", "tp-heads", "pp-layers", "no-config"],
)
def test_bad_input_is_reported_and_leaves_nothing(hf_dirs, tmp_path, mutate, args, message, capsys):
    hf_dir = _copy_hf(hf_dirs[True], tmp_path / "hf")
    if mutate is not None:
        mutate(hf_dir)
    out = tmp_path / "out"
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(out), *args,
                                       capsys=capsys)
    assert code == 2
    assert "hf_to_mcore: error:" in stderr
    assert re.search(message, stderr), stderr[-2000:]
    _assert_nothing_left(out)


def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_existing_checkpoint_needs_overwrite(hf_dirs, converted, capsys):
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(hf_dirs[True]), "--out",
                                       str(converted[True]), capsys=capsys)
    assert code == 2 and "--overwrite" in stderr
    assert (converted[True] / "metadata.json").is_file()  # untouched


def test_failure_mid_write_leaves_no_checkpoint(hf_dirs, tmp_path, monkeypatch):
    from sdpg_megatron.model import convert, hf_io

    calls = {"n": 0}
    original = hf_io.HFCheckpoint.read

    def failing_read(self, name):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk went away")
        return original(self, name)

    monkeypatch.setattr(hf_io.HFCheckpoint, "read", failing_read)
    out = tmp_path / "out"
    with pytest.raises(BaseException, match="disk went away"):
        convert.hf_to_mcore(hf_dirs[True], out, tp=1, pp=1, progress=False)
    assert calls["n"] == 12
    _assert_nothing_left(out)
