"""Hugging Face Qwen3 ↔ Megatron-Core distributed checkpoint conversion (streaming).

Both directions run in one CPU process and hold about one tensor at a time:
HF safetensors are read tensor by tensor, combined through the one mapping table
(`hf_mapping`), and written by `mcore_checkpoint.stream_save`; the way back loads one
parameter at a time and streams size-bounded safetensors shards. The Megatron checkpoint
records the architecture and its vocabulary padding in `sdpg_model.json`, so any layout
can load it (the padding fixes which TP sizes divide it). The way back reads the trainer's
own checkpoints too (`write_hf_from_mcore`; `sdpg_megatron/export.py` finds their
architecture through the run's config).

Qwen3-MoE converts the same way: the meta model is the MoE model at EP1 (every expert
local), whose `sharded_state_dict()` stores each layer's experts as one tensor with a
global expert axis (`decoder.layers.mlp.experts.experts.linear_fc1.weight`, [L, E, 2I, H]),
so the checkpoint loads at any expert-parallel size dividing num_experts, with
Megatron's SequentialMLP or transformer-engine's grouped GEMM alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from sdpg_megatron.model.hf_io import HFCheckpoint, write_hf_checkpoint
from sdpg_megatron.model.hf_mapping import find_rule, global_name, to_hf, to_mcore
from sdpg_megatron.model.mcore_checkpoint import build_meta_model, is_checkpoint, stream_load, stream_save
from sdpg_megatron.model.provider import check_layout, model_provider, transformer_config
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size

MODEL_INFO = "sdpg_model.json"
HF_ASSETS = "hf_assets"  # tokenizer and generation files carried along for the way back
_ASSET_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def _meta_model(arch: Qwen3Arch, padded_vocab: int, dtype: torch.dtype):
    """The TP1/PP1 (and, for MoE, EP1/ETP1: global expert indices) model on the meta device."""
    config = transformer_config(arch, params_dtype=dtype)
    return build_meta_model(lambda: model_provider(arch, config, padded_vocab=padded_vocab))


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int,
    pp: int,
    ep: int = 1,
    etp: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert for a TP × PP (× EP × ETP for Qwen3-MoE) layout, checked before anything is
    written; returns {"tensors", "bytes", "seconds", "peak_rss_bytes"}. The layout is recorded
    in sdpg_model.json; only TP changes the bytes (the vocabulary padding). `etp` None: TP
    at EP 1 (where Megatron splits experts like dense layers), else 1."""
    started = time.perf_counter()
    source = HFCheckpoint(hf_dir)
    arch = source.arch
    if etp is None:
        etp = tp if ep == 1 and arch.is_moe else 1
    check_layout(arch, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, expert_tensor_parallel=etp)
    source.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds files; pass --overwrite to replace it")
    dtype = dtype or _hf_dtype(source.config)
    padded_vocab = padded_vocab_size(arch.vocab_size, tp)
    with _megatron_process_group():
        meta = _meta_model(arch, padded_vocab, dtype)
        names = [name for name, _ in meta.named_parameters()]
        bar = tqdm(total=len(names), desc="hf→mcore", unit="tensor", disable=not progress)

        def produce(name: str) -> torch.Tensor:
            hf_names, kind = find_rule(arch, global_name(name, 0))
            tensor = to_mcore(kind, [source.read(h).to(dtype) for h in hf_names], arch, padded_vocab)
            bar.update(1)
            return tensor

        converted_for = {"tensor_parallel": tp, "pipeline_parallel": pp, "expert_parallel": ep,
                         "expert_tensor_parallel": etp}
        info = {"arch": dataclasses.asdict(arch), "padded_vocab": padded_vocab,
                "dtype": str(dtype).removeprefix("torch."), "converted_for": converted_for,
                "source": str(Path(hf_dir).resolve())}
        extra_files = {MODEL_INFO: json.dumps(info, indent=2).encode(),
                       **{f"{HF_ASSETS}/{name}": data for name, data in hf_asset_files(hf_dir).items()}}
        stats = stream_save(meta, {name: functools.partial(produce, name) for name in names}, out_dir,
                            overwrite=overwrite, extra_files=extra_files)
        bar.close()
    stats["seconds"] = time.perf_counter() - started
    stats["peak_rss_bytes"] = peak_rss_bytes()
    return stats


def mcore_to_hf(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = True,
) -> Path:
    """Write a converted Megatron checkpoint (tools/hf_to_mcore.py's output, any layout it
    was saved at) as a Hugging Face directory. Training checkpoints: `sdpg_megatron.export`."""
    arch, padded_vocab, saved_dtype = read_model_info(mcore_dir)
    assets = Path(mcore_dir) / HF_ASSETS
    extra_files = {p.name: p.read_bytes() for p in sorted(assets.iterdir())} if assets.is_dir() else {}
    return write_hf_from_mcore(mcore_dir, out_dir, arch, padded_vocab, dtype=dtype or saved_dtype,
                               overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                               extra_files=extra_files)


def write_hf_from_mcore(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: Qwen3Arch,
    padded_vocab: int,
    *,
    dtype: torch.dtype,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = True,
    extra_config: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """The model tensors of any torch_dist checkpoint of `arch` (converted, or written by
    the trainer) as a Hugging Face directory in `dtype`, with `extra_files` (tokenizer,
    generation config) beside them and `extra_config` merged into config.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds files; pass --overwrite to replace it")
    with _megatron_process_group():
        meta = _meta_model(arch, padded_vocab, dtype)
        total = sum(1 for _ in meta.named_parameters())

        def hf_tensors():
            for name, tensor in tqdm(stream_load(meta, mcore_dir), total=total, desc="mcore→hf",
                                     unit="tensor", disable=not progress):
                hf_names, kind = find_rule(arch, global_name(name, 0))
                yield from zip(hf_names, to_hf(kind, tensor, arch))

        return write_hf_checkpoint(out_dir, arch, hf_tensors(), dtype=dtype, max_shard_bytes=max_shard_bytes,
                                   overwrite=overwrite, extra_config=extra_config, extra_files=extra_files)


def read_model_info(mcore_dir: str | os.PathLike) -> tuple[Qwen3Arch, int, torch.dtype]:
    path = Path(mcore_dir) / MODEL_INFO
    if not is_checkpoint(mcore_dir):
        raise FileNotFoundError(f"{mcore_dir} is not a Megatron distributed checkpoint (no metadata.json)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {mcore_dir} is not tools/hf_to_mcore.py output (a training "
                                f"checkpoint is exported with tools/mcore_to_hf.py, which reads its run's config)")
    info = json.loads(path.read_text())
    return Qwen3Arch(**info["arch"]), int(info["padded_vocab"]), getattr(torch, info["dtype"])


def check_mcore_source(mcore_dir: str | os.PathLike, arch: Qwen3Arch, padded_vocab: int, *, tp: int) -> None:
    """ValueError unless `mcore_dir` holds `arch` with the vocabulary padding a TP-`tp`
    model uses (checked before any rank reads a tensor). The message names the fields that
    differ: a dense checkpoint for a mixture-of-experts config, or other experts."""
    saved_arch, saved_padded, _ = read_model_info(mcore_dir)
    if saved_arch != arch:
        differences = "; ".join(f"{name}={getattr(saved_arch, name)!r} there, {getattr(arch, name)!r} in model.hf_dir"
                                for name in (f.name for f in dataclasses.fields(arch))
                                if getattr(saved_arch, name) != getattr(arch, name))
        raise ValueError(
            f"model.mcore_dir={mcore_dir} holds {_describe(saved_arch)}, but model.hf_dir describes {_describe(arch)} "
            f"({differences}); convert model.hf_dir into model.mcore_dir again with tools/hf_to_mcore.py "
            f"(--overwrite), or point model.mcore_dir at a conversion of model.hf_dir"
        )
    if saved_padded != padded_vocab:
        raise ValueError(
            f"model.mcore_dir={mcore_dir} pads the vocabulary to {saved_padded} rows; a TP {tp} model pads it to "
            f"{padded_vocab}: convert again with tools/hf_to_mcore.py --tp {tp}"
        )


def _describe(arch: Qwen3Arch) -> str:
    if not arch.is_moe:
        return "a dense Qwen3"
    return (f"a Qwen3-MoE with {arch.num_experts} experts (top-{arch.experts_per_token}, "
            f"width {arch.moe_ffn_hidden_size})")


def load_mcore_weights(module: torch.nn.Module, mcore_dir: str | os.PathLike) -> None:
    """Load a model-only Megatron checkpoint into `module` (collective: every rank reads
    just its own TP/PP/EP shards through dist_checkpointing). A checkpoint of another model
    (a dense one for a mixture-of-experts model, other experts) is a ValueError naming
    model.mcore_dir; `check_mcore_source` says which fields differ before any rank reads."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        state = dist_checkpointing.load(module.sharded_state_dict(), str(mcore_dir))
    except (CheckpointingException, CheckpointException) as error:  # torch's: a BaseException wrapping Megatron's
        raise ValueError(f"model.mcore_dir={mcore_dir} does not hold this model's tensors ({_cause(error)}); "
                         f"convert model.hf_dir into it with tools/hf_to_mcore.py") from None
    with torch.no_grad():
        result = module.load_state_dict(state, strict=False)  # strict=False: TE _extra_state
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise ValueError(f"model.mcore_dir={mcore_dir} has no {missing[:3]} ({len(missing)} missing); "
                         f"is it this model?")


def _cause(error: BaseException, limit: int = 400) -> str:
    """The first line of the first rank's exception inside torch's CheckpointException (or of `error`)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def _megatron_process_group():
    """Megatron's TP1/PP1 state in this process (a one-rank gloo group if none exists)."""
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    created = not dist.is_initialized()
    if created:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
        yield
    finally:
        destroy_parallel()
        if created:
            dist.destroy_process_group()


def _hf_dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, str(name), None), torch.dtype) else torch.float32


def hf_asset_files(hf_dir: str | os.PathLike) -> dict[str, bytes]:
    """Tokenizer and generation files of a Hugging Face directory (file name → bytes):
    what an exported directory needs beside its config.json and weights."""
    return {
        path.name: path.read_bytes()
        for path in sorted(Path(hf_dir).iterdir())
        if path.is_file() and path.suffix in _ASSET_SUFFIXES
        and path.name not in ("config.json", "model.safetensors.index.json")
    }


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
