"""Training checkpoints: model + distributed optimizer + LR schedule + trainer state + RNG.

A checkpoint is one directory, `root/step_{step:08d}`, that is itself a Megatron-Core
distributed checkpoint (torch_dist: `metadata.json`, `common.pt`, `*.distcp`) of the
sharded state dict Megatron-LM writes — {"model", "optimizer", "scheduler"} — plus:

    trainer_state.json   the trainer's JSON-serialisable state (rank 0)
    driver_state.pt      optional, rank 0: what is not JSON (rollout.mode=one_step_off: the
                         next step's batch, generated ahead), torch.save of plain containers
    layout.json          world size, TP/PP/DP/EP/ETP sizes and optimizer kind it was written at
    rng/rank_{r}.pt      python / numpy / torch CPU / torch CUDA / Megatron tracker states
    COMPLETE             written last, by rank 0, once every rank has finished

Atomicity: everything is written to `root/.tmp-step_{step:08d}`; after a barrier rank 0
writes the marker, renames the directory into place and points `root/latest` at it
(temp file + os.replace). A crash leaves either the previous checkpoint as latest or the
new one complete; `.tmp-*` leftovers and directories without the marker are never chosen
and the next save deletes the leftovers. `root` must be one filesystem seen by all ranks.

What reshards: the distributed optimizer is saved in Megatron-LM's default format,
`dp_reshardable` (one tensor per gradient bucket), so a checkpoint resumes at any
data-parallel size but only at the TP and PP sizes it was written at. The TP-reshardable
formats (`fully_reshardable`, `fully_sharded_model_space`) do not load in megatron-core
0.16.1 with torch's Adam (no TE/apex, i.e. the CPU path): their loaders skip the
per-parameter `step` that torch Adam keeps and then fail on it (KeyError 'step'). TP
changes would also change the model's padded vocabulary (`padded_vocab_size` pads to
128·tp). Layout changes that cannot load are refused with a ValueError before anything is
touched. RNG states are per rank: restored only at the exact layout they were written at.

The LR schedule's shape (lr, warm-up) comes from the running config; the checkpoint
restores where in it training stands (the scheduler's step count).

Saving needs ranks that may start child processes (torchrun's do; daemonic
multiprocessing workers do not): Megatron's torch_dist writer forks writer processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sdpg_megatron.fsio import fsync_dir, write_text_atomic
from sdpg_megatron.model.training import TrainableModel
from sdpg_megatron.parallel.groups import ParallelGroups

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
DRIVER_STATE_FILE = "driver_state.pt"
LAYOUT_FILE = "layout.json"
RNG_DIR = "rng"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
OPTIMIZER_SHARDING = "dp_reshardable"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


# --------------------------------------------------------------------------- save


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    policy: TrainableModel,
    groups: ParallelGroups,
    trainer_state: dict,
    *,
    keep_last: int = 2,
    driver_state: dict | None = None,
) -> Path:
    """Write `root/step_{step:08d}` atomically (collective over all ranks); returns it.

    Keeps the newest `keep_last` complete checkpoints (always the one just written) and
    removes `.tmp-*` leftovers of crashed saves. `driver_state` (rank 0's; dicts, lists,
    numbers, strings) is written as driver_state.pt and comes back from `load_checkpoint`
    on rank 0 under trainer_state["driver_state"].
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    try:
        trainer_json = json.dumps(trainer_state, indent=2, sort_keys=True)  # fails on every rank alike
    except TypeError as error:
        raise ValueError(f"trainer_state must be JSON-serialisable: {error}") from error
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "save_checkpoint runs in a daemonic process, and Megatron's torch_dist writer forks "
            "writer processes; run ranks under torchrun or in non-daemonic processes"
        )
    root = Path(root).resolve()
    rank = dist.get_rank()
    final = root / step_dir_name(step)
    staging = root / f"{TMP_PREFIX}{final.name}"

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a crashed save of the same step
        staging.mkdir()
    dist.barrier()

    # As Megatron-LM's default (--ckpt-fully-parallel-save): replicated tensors are split
    # among the data-parallel ranks instead of all written by DP rank 0.
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), groups.dp_group)
    dist_checkpointing.save(_sharded_state_dict(policy, is_loading=False), str(staging), strategy)
    rng_path = staging / RNG_DIR / f"rank_{rank}.pt"
    rng_path.parent.mkdir(exist_ok=True)
    torch.save(_rng_states(), rng_path)
    _fsync_file(rng_path)
    if rank == 0:
        if driver_state is not None:
            torch.save(driver_state, staging / DRIVER_STATE_FILE)
            _fsync_file(staging / DRIVER_STATE_FILE)
        _write_synced(staging / TRAINER_STATE_FILE, trainer_json)
        _write_synced(staging / LAYOUT_FILE, json.dumps(_layout(policy, groups), sort_keys=True))
    dist.barrier()  # every rank's files are on disk

    if rank == 0:
        _write_synced(staging / COMPLETE_MARKER, json.dumps({"step": step}))
        fsync_dir(staging / RNG_DIR)
        fsync_dir(staging)
        if final.exists():  # the same step saved again (a resumed run): set the old one aside;
            # a crash before the next rename leaves `latest` naming nothing, and
            # latest_checkpoint falls back to the newest complete one.
            replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        staging.rename(final)
        fsync_dir(root)
        write_text_atomic(root / LATEST_FILE, final.name)
        _prune(root, keep=final, keep_last=keep_last)
    dist.barrier()
    return final


def _prune(root: Path, *, keep: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never `keep`) and `.tmp-*`
    leftovers. Step directories without the marker are not ours to judge: left alone."""
    others = [path for _, path in _complete_steps(root) if path != keep]
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- find


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete `step_*` directories, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint `root/latest` names, else the newest complete `step_*`
    directory, else None."""
    root = Path(root)
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        name = ""
    if STEP_DIR.match(name) and is_complete(root / name):
        return root / name
    complete = _complete_steps(root)
    return complete[-1][1] if complete else None


def _resolve(path: Path) -> Path | None:
    """The checkpoint directory `path` means: itself if it is one, else its latest."""
    if is_complete(path):
        return path
    names_one = STEP_DIR.match(path.name) or path.name.startswith(TMP_PREFIX)
    if names_one and not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if names_one or (path / "metadata.json").exists() or (path / TRAINER_STATE_FILE).exists():
        raise ValueError(
            f"{path} is not a complete training checkpoint (no {COMPLETE_MARKER} marker: its save did not "
            f"finish, or it holds a model only); pass the checkpoint root to resume from its latest complete one"
        )
    return latest_checkpoint(path)


# --------------------------------------------------------------------------- load


def load_checkpoint(root_or_dir: str | os.PathLike, policy: TrainableModel, groups: ParallelGroups) -> dict | None:
    """Restore model, optimizer, LR schedule and this rank's RNG states (collective).

    `root_or_dir` is a checkpoint root (its latest complete checkpoint is loaded) or one
    checkpoint directory. Returns the saved trainer_state (on rank 0 with the saved
    driver_state, if any, under "driver_state"), or None when there is no checkpoint yet.
    A checkpoint that cannot load at this layout raises ValueError before `policy` is
    touched.
    """
    from megatron.core import dist_checkpointing

    path = _resolve_on_rank0(Path(root_or_dir))
    if path is None:
        return None
    saved_layout = {"ep": 1, "etp": 1, **json.loads((path / LAYOUT_FILE).read_text())}  # EP/ETP: 1 before MoE
    layout = _layout(policy, groups)
    _check_layout(path, saved_layout, layout)
    _check_shapes(path, policy.module.sharded_state_dict(metadata=_sharded_metadata()), saved_layout, layout)

    _allocate_optimizer_state(policy.optimizer)
    state = dist_checkpointing.load(_sharded_state_dict(policy, is_loading=True), str(path))
    # no_grad: with fp32 parameters the optimizer's main-parameter shards are views of the
    # (grad-requiring) parameters, and Megatron copies into them in place.
    with torch.no_grad():
        policy.module.load_state_dict(state["model"], strict=False)  # strict=False: TE _extra_state
        policy.optimizer.load_state_dict(state["optimizer"])
    _set_adam_steps(policy.optimizer, int(state["adam_step"]))
    # Megatron's scheduler.load_state_dict would add the saved count to the fresh
    # scheduler's and assert that lr and warm-up are unchanged: set the position only.
    policy.scheduler.num_steps = 0
    policy.scheduler.step(increment=state["scheduler"]["num_steps"])

    rng_path = path / RNG_DIR / f"rank_{dist.get_rank()}.pt"
    if saved_layout == layout and rng_path.is_file():
        _set_rng_states(torch.load(rng_path, weights_only=False))
    elif dist.get_rank() == 0:
        logger.warning("%s was written at %s, loading at %s: RNG states are not restored", path, saved_layout, layout)
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    if dist.get_rank() == 0 and (path / DRIVER_STATE_FILE).is_file():
        state["driver_state"] = torch.load(path / DRIVER_STATE_FILE, weights_only=True)
    return state


def _resolve_on_rank0(root_or_dir: Path) -> Path | None:
    """Rank 0 picks the directory (or the error), so every rank loads the same one."""
    decision: list = [None]
    if dist.get_rank() == 0:
        try:
            path = _resolve(root_or_dir.resolve())
            decision = [("path", None if path is None else str(path))]
        except (ValueError, FileNotFoundError) as error:
            decision = [(type(error).__name__, str(error))]
    dist.broadcast_object_list(decision, src=0)
    kind, value = decision[0]
    if kind == "ValueError":
        raise ValueError(value)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    return None if value is None else Path(value)


def _check_layout(path: Path, saved: dict, current: dict) -> None:
    if saved["distributed_optimizer"] != current["distributed_optimizer"]:
        raise ValueError(
            f"{path} was written with use_distributed_optimizer={saved['distributed_optimizer']}; "
            f"set optimizer.use_distributed_optimizer to match to resume from it"
        )

    def sizes(layout: dict) -> str:
        return f"TP {layout['tp']} × PP {layout['pp']} × EP {layout['ep']} × ETP {layout['etp']}"

    if sizes(saved) != sizes(current):
        raise ValueError(
            f"{path} was written at {sizes(saved)} and this run is {sizes(current)}; its optimizer state "
            f"({OPTIMIZER_SHARDING}) reshards across data-parallel ranks only: resume at {sizes(saved)} "
            "(any data-parallel size)"
        )


def _check_shapes(path: Path, model_sharded: dict, saved_layout: dict, layout: dict) -> None:
    """ValueError naming the first model tensor the checkpoint lacks or holds in another shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    for value in nested_values(model_sharded):
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in stored:
            raise ValueError(f"{path}: the checkpoint has no tensor {value.key!r}; is it for another model?")
        if tuple(stored[value.key].global_shape) != tuple(value.global_shape):
            raise ValueError(
                f"{path}: {value.key} is {tuple(stored[value.key].global_shape)} in the checkpoint (written at "
                f"{saved_layout}) and {tuple(value.global_shape)} in this model (at {layout}); is it for "
                f"another model?"
            )


# --------------------------------------------------------------------------- pieces


def _sharded_state_dict(policy: TrainableModel, *, is_loading: bool) -> dict:
    """{"model", "optimizer", "scheduler"} as Megatron-LM's `generate_state_dict` builds it
    (the scheduler's plain dict lands in the checkpoint's common.pt)."""
    metadata = _sharded_metadata()
    model = policy.module.sharded_state_dict(metadata=metadata)
    optimizer = policy.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)
    return {"model": model, "optimizer": optimizer, "scheduler": policy.scheduler.state_dict(),
            "adam_step": _adam_step(policy.optimizer)}


def _sharded_metadata() -> dict:
    """What Megatron-LM's `_build_sharded_state_dict_metadata` passes to both
    sharded_state_dicts; fresh each time, since Megatron caches the current data-parallel
    group in it (`dp_cp_group`)."""
    return {"distrib_optim_sharding_type": OPTIMIZER_SHARDING, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def _allocate_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its Adam state before loading into it.

    Without TE/apex, `DistributedOptimizer.state_dict()` reads the step count from torch
    Adam's per-parameter state, which a fresh optimizer lacks, and
    `sharded_state_dict(is_loading=True)` starts with that call. Megatron's own remedy (for
    its FSDP format) is one zero-gradient step; the load overwrites all it touches."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and len(inner.optimizer.state) == 0:
            inner._init_optimizer_states_with_dummy_values()


def _torch_optimizers(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is not None:
            yield torch_optimizer


def _adam_step(optimizer) -> int:
    """torch Adam's step count (the same for every parameter); 0 before the first step."""
    steps = {int(state["step"]) for opt in _torch_optimizers(optimizer) for state in opt.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"Adam step counts differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else 0


def _set_adam_steps(optimizer, step: int) -> None:
    """Give every parameter its own Adam step counter, set to the saved count.

    Without TE/apex, Megatron 0.16's distributed-optimizer load does not restore the count
    (the dp_reshardable parameter state skips "step"; what survives is the dummy value of a
    fresh optimizer), and it hands one shared tensor to every parameter, which torch would
    then advance once per parameter per step. Either breaks Adam's bias correction after a
    resume, so the count travels in the checkpoint's common state and is set here."""
    for opt in _torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                old = state["step"]
                state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device) if isinstance(old, torch.Tensor) else step


def _layout(policy: TrainableModel, groups: ParallelGroups) -> dict:
    return {"world_size": dist.get_world_size(), "tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size,
            "ep": groups.ep_size, "etp": groups.etp_size,
            "distributed_optimizer": bool(policy.model.ddp_config.use_distributed_optimizer)}


def _rng_states() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["megatron_tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
