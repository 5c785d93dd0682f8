"""Megatron-Core distributed checkpoints (torch_dist) written and read one tensor at a time.

`stream_save` writes, from a single process, a checkpoint that
`megatron.core.dist_checkpointing.load` accepts at any TP/PP layout, producing each global
tensor only when torch.distributed.checkpoint asks for it and freeing it once written:
peak memory is about the largest tensor, not the model. It works like this:

1. the TP1/PP1 model is built on the meta device (no parameter memory) and its
   `sharded_state_dict()` gives Megatron's exact keys, global shapes, chunk offsets
   (layers stacked along a leading axis, the gated fc1's gate/up factory) and objects;
2. every chunk becomes a `_LazyShardedTensor` (Megatron's CheckpointableShardedTensor whose
   `__get_tensor_shard__` calls a producer), grouped per key as Megatron's own torch_dist
   strategy groups them;
3. torch DCP writes them with Megatron's save planner, then `common.pt` and, last,
   `metadata.json` (a directory without it is not a checkpoint) — into a temporary sibling
   directory that is renamed into place only when complete.

`stream_load` reads a checkpoint back one parameter at a time, as full TP1 tensors.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.strategies.checkpointable import (
    CheckpointableShardedTensor,
    LocalShardsContainer,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from sdpg_megatron.fsio import fsync_dir

CHECKPOINT_MARKER = "metadata.json"  # written last by Megatron and by stream_save
Producer = Callable[[], torch.Tensor]


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_MARKER).is_file()


def build_meta_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model's structure without parameter memory."""
    with torch.device("meta"):
        return build()


# --------------------------------------------------------------------------- streaming save


class _WrittenTensors:
    """Frees each produced tensor once DCP has written it (its serial loader would keep the
    previous one alive while the next is produced) and returns heap memory to the OS."""

    def __init__(self):
        self.local = threading.local()
        self.count = 0
        self.bytes = 0
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc
            self._trim = None

    def release_previous(self) -> None:
        previous = getattr(self.local, "previous", None)
        self.local.previous = None
        if previous is not None:
            try:
                previous.untyped_storage().resize_(0)
            except RuntimeError:
                pass  # a non-resizable storage is simply dropped
        del previous
        if self._trim is not None:
            self._trim(0)

    def track(self, tensor: torch.Tensor) -> None:
        self.local.previous = tensor
        self.count += 1
        self.bytes += tensor.numel() * tensor.element_size()


class _LazyShardedTensor(CheckpointableShardedTensor):
    """One chunk of a Megatron ShardedTensor whose data comes from a producer on demand."""

    def __new__(cls, sharded: ShardedTensor, produce: Producer, written: _WrittenTensors):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(sharded.global_shape))

    def __init__(self, sharded: ShardedTensor, produce: Producer, written: _WrittenTensors):
        super().__init__(sharded.data, sharded)
        self._produce = produce
        self._written = written
        # Megatron stores stacked-layer chunks with the prepended axes of size 1.
        self._chunk = torch.Size((1,) * sharded.prepend_axis_num + tuple(sharded.local_shape))
        self._offsets = torch.Size(sharded.global_offset)

    def __create_write_items__(self, fqn, obj, index=None):
        return [WriteItem(
            index=MetadataIndex(fqn, self._offsets, index),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=self._offsets, sizes=self._chunk),
                properties=TensorProperties.create_from_tensor(self._sh_ten.data),
                size=torch.Size(self._sh_ten.global_shape),
            ),
        )]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=self._offsets, sizes=self._chunk)]

    def __get_tensor_shard__(self, index):
        sharded = self._sh_ten
        self._written.release_previous()
        tensor = self._produce()
        if tuple(tensor.shape) != tuple(sharded.local_shape):
            raise ValueError(
                f"{sharded.key} at offset {sharded.global_offset}: produced shape {tuple(tensor.shape)}, "
                f"the checkpoint layout needs {tuple(sharded.local_shape)}"
            )
        tensor = tensor.to(dtype=sharded.data.dtype).contiguous().view(self._chunk)
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # own a minimal storage so freeing it frees only this
        self._written.track(tensor)
        return tensor


class _LastBuilt:
    """The most recent full tensor, so a factory's chunks (gate, up) share one production."""

    def __init__(self):
        self.name, self.value = None, None

    def get(self, name: str, produce: Producer) -> torch.Tensor:
        if self.name != name:
            self.name, self.value = None, None
            self.value, self.name = produce(), name
        return self.value


def stream_save(
    meta_model: torch.nn.Module,
    producers: dict[str, Producer],
    checkpoint_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> dict:
    """Write `meta_model`'s checkpoint layout with tensors from `producers`.

    Args:
        meta_model: the TP1/PP1 model on the meta device (`build_meta_model`).
        producers: the model's state-dict name → zero-argument callable returning the full
            tensor; called once each, and the tensor is freed after writing (return a fresh
            tensor, not a view of data kept elsewhere).
        checkpoint_dir: written atomically: nothing appears there unless the save completes.
        overwrite: replace an existing checkpoint at checkpoint_dir.
        extra_files: relative path → bytes, written into the checkpoint directory.

    Returns:
        {"tensors": chunks written, "bytes": bytes written}.
    """
    final = Path(checkpoint_dir).resolve()
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already holds files; pass --overwrite to replace it")
    sharded_state = meta_model.sharded_state_dict()
    written, last_built = _WrittenTensors(), _LastBuilt()
    chunks: dict[str, list[_LazyShardedTensor]] = {}
    objects: dict[str, io.BytesIO] = {}
    common: dict = {}
    needed = set()

    def add(sharded: ShardedTensor, produce: Producer) -> None:
        if is_main_replica(sharded.replica_id):  # e.g. skips a tied output-layer replica
            chunks.setdefault(sharded.key, []).append(_LazyShardedTensor(sharded, produce, written))

    for name, value in sharded_state.items():
        if isinstance(value, ShardedTensorFactory):
            needed.add(name)
            for i, sharded in enumerate(_as_list(value.build())):
                def produce(name=name, factory=value, i=i):
                    full = last_built.get(name, producers[name])
                    return _as_list(factory.build_fn(factory.key, full, factory.replica_id, None))[i].data
                add(sharded, produce)
        elif isinstance(value, ShardedTensor):
            if is_main_replica(value.replica_id):
                needed.add(name)
                add(value, lambda name=name: producers[name]())
        elif isinstance(value, ShardedObject):
            if is_main_replica(value.replica_id):
                buffer = io.BytesIO()
                torch.save([value.data], buffer)  # the encoding Megatron's torch strategy uses
                objects[value.unique_key] = buffer
        else:
            common[name] = value
    if needed - set(producers) or set(producers) - needed:
        raise KeyError(
            f"producers do not match the checkpoint layout: missing {sorted(needed - set(producers))}, "
            f"unused {sorted(set(producers) - needed)}"
        )
    state = {key: parts[0] if len(parts) == 1 else LocalShardsContainer(parts) for key, parts in chunks.items()}
    state.update(objects)

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        writer = FileSystemWriter(staging, thread_count=1, single_file_per_rank=True, sync_files=True)
        # torch's CheckpointException derives from BaseException: the cleanup below must see it.
        dcp_save(state, storage_writer=writer, planner=MCoreSavePlanner(flatten_state_dict=False), no_dist=True)
        torch.save(common, staging / COMMON_STATE_FNAME)
        for relative, data in (extra_files or {}).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(data)
        save_config(CheckpointingConfig("torch_dist", 1), str(staging))
        written.release_previous()
        fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        written.release_previous()
    return {"tensors": written.count, "bytes": written.bytes}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# --------------------------------------------------------------------------- streaming load


def stream_load(meta_model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, full tensor) for every parameter of the TP1/PP1 `meta_model`.

    Reads one parameter at a time straight from the torch_dist files: each region (one
    layer of a stacked key, or a whole unstacked tensor) is assembled from whatever chunks
    the checkpoint holds, so a checkpoint saved at any TP/PP layout reads the same.
    Megatron's own `load` cannot do this: it insists on every layer of a key at once.
    Any checkpoint of the model's tensors reads: a converted one, or a training checkpoint
    (whose optimizer state is simply not read). Every tensor's global shape is checked
    against the model's before the first one is read.
    """
    reader = _ChunkReader(checkpoint_dir)
    entries = []
    for name, value in meta_model.sharded_state_dict().items():
        if isinstance(value, ShardedTensorFactory):
            parts = _as_list(value.build())  # TP1: gate and up halves of the fused fc1
        elif isinstance(value, ShardedTensor) and is_main_replica(value.replica_id):
            parts = [value]
        else:
            continue
        entries.append((name, parts))
    reader.check_shapes([part for _, parts in entries for part in parts])
    for name, parts in entries:
        regions = [reader.region(part.key, part.global_offset, part.prepend_axis_num, part.local_shape)
                   for part in parts]
        yield name, torch.cat(regions, dim=0) if len(regions) > 1 else regions[0]


class _ChunkReader:
    def __init__(self, checkpoint_dir: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader

        if not is_checkpoint(checkpoint_dir):
            raise FileNotFoundError(
                f"{checkpoint_dir} is not a Megatron distributed checkpoint (no {CHECKPOINT_MARKER})"
            )
        self.path = Path(checkpoint_dir)
        self.metadata = FileSystemReader(str(self.path)).read_metadata()

    def check_shapes(self, parts: list[ShardedTensor]) -> None:
        """ValueError naming the tensors the checkpoint lacks or holds in another global
        shape (a larger stored tensor would otherwise read as a slice of itself)."""
        stored = self.metadata.state_dict_metadata
        missing = sorted({part.key for part in parts if part.key not in stored})
        wrong = sorted({f"{part.key}: {tuple(stored[part.key].size)} in the checkpoint, {tuple(part.global_shape)} "
                        f"in the model" for part in parts
                        if part.key in stored and tuple(stored[part.key].size) != tuple(part.global_shape)})
        if missing or wrong:
            problems = [f"no tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []
            problems += wrong[:3]
            raise ValueError(f"{self.path} does not hold this model's tensors ({'; '.join(problems)}); is the "
                             f"architecture (config.json) the one it was trained or converted with?")

    def region(self, key: str, offsets, prepend_axes: int, local_shape) -> torch.Tensor:
        """The tensor at `offsets` of shape (1,)*prepend_axes + local_shape, without the
        prepended axes."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if key not in self.metadata.state_dict_metadata:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {key!r}")
        stored = self.metadata.state_dict_metadata[key]
        sizes = (1,) * prepend_axes + tuple(local_shape)
        out = torch.empty(sizes, dtype=stored.properties.dtype)
        covered = 0
        for chunk in stored.chunks:
            low = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            high = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(low, high)):
                continue
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{self.path}: {key} uses storage transforms {info.transform_descriptors}, unsupported")
            with open(self.path / info.relative_path, "rb") as handle:
                handle.seek(info.offset)
                data = torch.load(io.BytesIO(handle.read(info.length)), weights_only=True)
            source = tuple(slice(l - c, h - c) for l, h, c in zip(low, high, chunk.offsets))
            target = tuple(slice(l - o, h - o) for l, h, o in zip(low, high, offsets))
            out[target] = data[source]
            covered += int(torch.tensor([h - l for l, h in zip(low, high)]).prod())
        if covered != out.numel():
            raise ValueError(f"{self.path}: chunks of {key} cover {covered} of {out.numel()} elements at {tuple(offsets)}")
        return out.reshape(tuple(local_shape))
