"""A trained model out of the trainer: any Megatron checkpoint of this recipe → a Hugging
Face directory (config.json, safetensors, tokenizer) that transformers and vLLM load.

`find_export_source` accepts three kinds of directory:
- a training checkpoint, `<out_dir>/checkpoints/step_XXXXXXXX` (checkpoint.py's format):
  only the model's tensors are read, never the optimizer state. Those tensors do not say
  everything about the model (RoPE base, norm epsilon, token ids), so the architecture comes
  from the run's `model.hf_dir` config.json and the tokenizer from `model.tokenizer_dir`
  (default: hf_dir), both recorded in the checkpoint's trainer_state.json; `hf_dir=` and
  `tokenizer_dir=` replace them when the run's paths are not reachable from here;
- a checkpoint root, `<out_dir>/checkpoints`: its latest complete step, said in `description`;
- tools/hf_to_mcore.py's output, which records its architecture in sdpg_model.json and
  carries its tokenizer.

Qwen3-MoE exports the same way, from any expert-parallel layout: experts are stored under
their global indices and come out as the per-expert Hugging Face tensors.

Every stored tensor's shape is checked against the architecture before anything is
written (`mcore_checkpoint.stream_load`), and the output appears atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpg_megatron.checkpoint import (
    COMPLETE_MARKER, LAYOUT_FILE, STEP_DIR, TRAINER_STATE_FILE, is_complete, latest_checkpoint,
)
from sdpg_megatron.cli_paths import HF_MODEL_FILES, TOKENIZER_FILES
from sdpg_megatron.model.convert import HF_ASSETS, MODEL_INFO, hf_asset_files, read_model_info, write_hf_from_mcore
from sdpg_megatron.model.mcore_checkpoint import CHECKPOINT_MARKER
from sdpg_megatron.model.qwen3 import Qwen3Arch, from_hf_config
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # kept from the run's config.json


@dataclass(frozen=True)
class ExportSource:
    weights_dir: Path  # the torch_dist directory whose model tensors are read
    arch: Qwen3Arch
    padded_vocab: int
    dtype: torch.dtype  # the stored weights' dtype (the export's default)
    description: str  # what was chosen and why, for the command line to print
    extra_files: dict[str, bytes] = field(default_factory=dict)  # tokenizer, generation config
    extra_config: dict = field(default_factory=dict)  # merged into config.json
    notes: tuple[str, ...] = ()  # what the export lacks and how to add it


def find_export_source(path: str | os.PathLike, *, hf_dir: str | os.PathLike | None = None,
                       tokenizer_dir: str | os.PathLike | None = None) -> ExportSource:
    """The model a checkpoint directory holds (see the module docstring); ValueError or
    FileNotFoundError naming the path and what to pass instead."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; pass a training checkpoint (step_XXXXXXXX), a "
                                f"checkpoint root (<out_dir>/checkpoints) or tools/hf_to_mcore.py output")
    if (path / MODEL_INFO).is_file():
        if hf_dir is not None or tokenizer_dir is not None:
            raise ValueError(f"{path} is tools/hf_to_mcore.py output, which carries its own config and tokenizer; "
                             f"--hf-dir and --tokenizer-dir apply to training checkpoints only")
        return _converted_source(path)
    if is_complete(path):
        return _training_source(path, hf_dir=hf_dir, tokenizer_dir=tokenizer_dir, chosen_because="")
    if STEP_DIR.match(path.name) or (path / CHECKPOINT_MARKER).is_file():
        raise ValueError(f"{path} is not a complete training checkpoint (no {COMPLETE_MARKER} marker: its save did not "
                         f"finish, or another program wrote it); pass its parent {path.parent} to export the latest "
                         f"complete one")
    latest = latest_checkpoint(path)
    if latest is None:
        hint = f"; {path / 'checkpoints'} is the run's checkpoint root" if (path / "checkpoints").is_dir() else ""
        raise FileNotFoundError(
            f"{path} holds no model: neither a complete training checkpoint (step_XXXXXXXX with {COMPLETE_MARKER}) "
            f"nor {MODEL_INFO} (tools/hf_to_mcore.py output){hint}")
    steps = sorted(int(match.group(1)) for p in path.iterdir()
                   if (match := STEP_DIR.match(p.name)) and is_complete(p))
    return _training_source(latest, hf_dir=hf_dir, tokenizer_dir=tokenizer_dir,
                            chosen_because=f", the latest complete checkpoint in {path} (steps {steps})")


def export_to_hf(source: ExportSource, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False, max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> Path:
    """Write `source` as a Hugging Face directory at `out_dir` (in `dtype`, default the stored one)."""
    return write_hf_from_mcore(source.weights_dir, out_dir, source.arch, source.padded_vocab,
                               dtype=dtype or source.dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                               progress=progress, extra_config=source.extra_config, extra_files=source.extra_files)


def _converted_source(path: Path) -> ExportSource:
    arch, padded_vocab, dtype = read_model_info(path)
    assets = path / HF_ASSETS
    files = {p.name: p.read_bytes() for p in sorted(assets.iterdir())} if assets.is_dir() else {}
    notes = () if any(name in files for name in TOKENIZER_FILES) else (
        f"{path} carries no tokenizer (its source had none): add one to the export before serving it",)
    return ExportSource(path, arch, padded_vocab, dtype, f"{path}: tools/hf_to_mcore.py output", files, {}, notes)


def _training_source(step_dir: Path, *, hf_dir, tokenizer_dir, chosen_because: str) -> ExportSource:
    state = json.loads((step_dir / TRAINER_STATE_FILE).read_text())
    layout = json.loads((step_dir / LAYOUT_FILE).read_text())
    model = (state.get("config") or {}).get("model") or {}
    if hf_dir is None and not model.get("hf_dir"):
        raise ValueError(f"{step_dir / TRAINER_STATE_FILE} records no model.hf_dir (the run's architecture and "
                         f"tokenizer); pass --hf-dir with the Hugging Face directory the run started from")
    model_dir = _run_dir(step_dir, "--hf-dir", hf_dir, "model.hf_dir", model.get("hf_dir"), HF_MODEL_FILES,
                         "the Hugging Face directory the run started from")
    config_path = model_dir / "config.json"
    hf_config = json.loads(config_path.read_text())
    arch = from_hf_config(hf_config, source=str(config_path))
    if tokenizer_dir is not None or model.get("tokenizer_dir"):
        token_dir = _run_dir(step_dir, "--tokenizer-dir", tokenizer_dir, "model.tokenizer_dir",
                             model.get("tokenizer_dir"), TOKENIZER_FILES, "the run's tokenizer directory")
    else:
        token_dir = model_dir
    notes = []
    files = {}
    if any((token_dir / name).is_file() for name in TOKENIZER_FILES):
        files = {name: data for name, data in hf_asset_files(token_dir).items() if name != "generation_config.json"}
    else:
        notes.append(f"{token_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the export has weights and "
                     f"config only; pass --tokenizer-dir to add one")
    if (model_dir / "generation_config.json").is_file():
        files["generation_config.json"] = (model_dir / "generation_config.json").read_bytes()
    experts = f" × EP {layout['ep']} × ETP {layout.get('etp', 1)}" if arch.is_moe and "ep" in layout else ""
    description = (f"{step_dir}: training checkpoint of step {state.get('step')}{chosen_because}; architecture "
                   f"from {config_path}, tokenizer from {token_dir}; written at TP {layout['tp']} × PP {layout['pp']}"
                   f"{experts}")
    return ExportSource(step_dir, arch, padded_vocab_size(arch.vocab_size, int(layout["tp"])),
                        getattr(torch, model.get("params_dtype") or "float32"), description, files,
                        {key: hf_config[key] for key in TOKEN_ID_KEYS if key in hf_config}, tuple(notes))


def _run_dir(step_dir: Path, option: str, given, field_name: str, recorded, holds: tuple[str, ...], what: str) -> Path:
    """The directory `option` names, else the one the run's config recorded (a relative
    path is relative to where the run was started, and is tried from here)."""
    path = Path(given if given is not None else recorded)
    if path.is_dir() and any((path / name).is_file() for name in holds):
        return path
    needs = " or ".join(holds)
    if given is not None:
        raise FileNotFoundError(f"{option} {path}: not a directory with {needs}; pass {what}")
    relative = "" if path.is_absolute() else " (relative to where the run was started)"
    raise FileNotFoundError(f"{step_dir}: the run's {field_name}={recorded}{relative} is not a directory with {needs} "
                            f"here; pass {option} with {what}")
