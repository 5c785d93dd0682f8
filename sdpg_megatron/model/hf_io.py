"""Reading and writing Hugging Face Qwen3 (and Qwen3-MoE) directories, one tensor at a time.

`HFCheckpoint` opens `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json` lazily: only the safetensors headers are parsed up front,
and a tensor is read with plain file reads when asked for (no memory map, whose touched
pages would pile up in the converter's resident memory). Then `validate()` checks names
and shapes against the architecture (for Qwen3-MoE: the router and the per-expert
tensors, `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` ...) before any conversion
writes a byte. `write_hf_checkpoint` streams tensors into size-bounded safetensors shards
inside a temporary sibling directory and renames it into place only when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from safetensors.torch import save_file

from sdpg_megatron.model.hf_mapping import rules_for
from sdpg_megatron.model.qwen3 import Qwen3Arch, from_hf_config, to_hf_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _TensorLocation(NamedTuple):
    file: Path
    offset: int
    num_bytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class HFCheckpoint:
    """A Hugging Face Qwen3 checkpoint directory, read lazily."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.path = Path(hf_dir)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: --hf-dir must be a Hugging Face model directory")
        self.config = json.loads(config_path.read_text())
        self.arch = from_hf_config(self.config, source=str(config_path))
        self._locations = self._index()

    def _index(self) -> dict[str, _TensorLocation]:
        index_path = self.path / SAFETENSORS_INDEX
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            missing_files = [f for f in files if not (self.path / f).is_file()]
            if missing_files:
                raise FileNotFoundError(f"{index_path} names shard files that do not exist: {missing_files}")
        elif (self.path / SAFETENSORS_SINGLE).is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            raise FileNotFoundError(
                f"{self.path} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}; "
                "only safetensors checkpoints are supported"
            )
        locations = {}
        for file_name in files:
            locations.update(_read_header(self.path / file_name))
        return locations

    def names(self) -> list[str]:
        return sorted(self._locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._locations[name].shape

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor (its own storage, safe to free after use)."""
        if name not in self._locations:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        where = self._locations[name]
        buffer = torch.empty(where.num_bytes, dtype=torch.uint8)
        # A ctypes view, not buffer.numpy(): a numpy export would pin the storage, and the
        # streaming checkpoint writer frees tensors with untyped_storage().resize_(0).
        view = memoryview((ctypes.c_char * where.num_bytes).from_address(buffer.data_ptr())).cast("B")
        with open(where.file, "rb", buffering=0) as handle:
            handle.seek(where.offset)
            received = 0
            while received < where.num_bytes:
                count = handle.readinto(view[received:])
                if not count:
                    raise ValueError(f"{where.file}: truncated while reading {name!r}")
                received += count
        del view
        return buffer.view(where.dtype).reshape(where.shape)

    def validate(self) -> None:
        """ValueError listing missing, unexpected and mis-shaped tensors."""
        expected = expected_hf_shapes(self.arch)
        present = set(self._locations)
        missing = sorted(set(expected) - present)
        # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
        tolerated = {"lm_head.weight"} if self.arch.tied_embeddings else set()
        extra = sorted(present - set(expected) - tolerated)
        wrong = [
            f"{name}: {self.shape(name)} (expected {shape})"
            for name, shape in expected.items() if name in present and self.shape(name) != shape
        ]
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            problems.append(f"unexpected tensors ({len(extra)}): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if wrong:
            problems.append(f"wrong shapes: {wrong[:8]}")
        if problems:
            raise ValueError(f"{self.path} does not match its config.json: " + "; ".join(problems))


def _read_header(path: Path) -> dict[str, _TensorLocation]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
        (header_size,) = struct.unpack("<Q", raw)
        if header_size > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {header_size} exceeds the file)")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError as error:
            raise ValueError(f"{path}: unreadable safetensors header ({error})") from None
    data_start = 8 + header_size
    locations = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise ValueError(f"{path}: tensor {name!r} lies past the end of the file (truncated download?)")
        locations[name] = _TensorLocation(path, data_start + begin, end - begin,
                                          _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
    return locations


def expected_hf_shapes(arch: Qwen3Arch) -> dict[str, tuple[int, ...]]:
    hidden, head_dim, ffn = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    q_rows, kv_rows = arch.num_attention_heads * head_dim, arch.num_query_groups * head_dim
    by_suffix = {
        "embed_tokens.weight": (arch.vocab_size, hidden),
        "lm_head.weight": (arch.vocab_size, hidden),
        "q_proj.weight": (q_rows, hidden),
        "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden),
        "o_proj.weight": (hidden, q_rows),
        "q_norm.weight": (head_dim,),
        "k_norm.weight": (head_dim,),
        "gate_proj.weight": (ffn, hidden),
        "up_proj.weight": (ffn, hidden),
        "down_proj.weight": (hidden, ffn),
        "layernorm.weight": (hidden,),
        "norm.weight": (hidden,),
    }
    expert = {  # Qwen3-MoE: the router and one expert's SwiGLU of width moe_ffn_hidden_size
        "mlp.gate.weight": (arch.num_experts, hidden),
        "gate_proj.weight": (arch.moe_ffn_hidden_size, hidden),
        "up_proj.weight": (arch.moe_ffn_hidden_size, hidden),
        "down_proj.weight": (hidden, arch.moe_ffn_hidden_size),
    }
    shapes = {}
    for _, hf_names, _ in rules_for(arch):
        for name in hf_names:
            table = expert if ".mlp.experts." in name or name.endswith(".mlp.gate.weight") else by_suffix
            suffix = next(s for s in table if name.endswith(s))
            shapes[name] = table[suffix]
    return shapes


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    arch: Qwen3Arch,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = 2 * 2**30,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_config: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a Hugging Face directory (config.json, safetensors shards, index) atomically.

    Tensors are buffered only up to `max_shard_bytes`; nothing appears at `out_dir` until
    every shard is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        weight_map, shard, shard_bytes, shard_files = {}, {}, 0, []

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                file_name = f"model-{len(shard_files) + 1:05d}.safetensors"
                save_file(shard, staging / file_name, metadata={"format": "pt"})
                shard_files.append(file_name)
                weight_map.update({name: file_name for name in shard})
                shard, shard_bytes = {}, 0

        for name, tensor in tensors:
            tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[name] = tensor
            shard_bytes += size
        flush()
        total = len(shard_files)
        renamed = {}
        for index, file_name in enumerate(shard_files, start=1):
            final = f"model-{index:05d}-of-{total:05d}.safetensors"
            (staging / file_name).rename(staging / final)
            renamed[file_name] = final
        weight_map = {name: renamed[f] for name, f in weight_map.items()}
        (staging / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        config = to_hf_config(arch, **(extra_config or {}))
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for file_name, data in (extra_files or {}).items():
            (staging / file_name).write_bytes(data)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
