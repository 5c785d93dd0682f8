"""Same-host weight pushes: bucket buffers the trainer writes once and every engine reads in place.

`BucketBuffers` is the trainer's side: bucket `i` of a push lives in buffer `i` of one of
two sets, which stay allocated (and their pages mapped) from one push to the next, so a
push writes each byte once into memory that is already there — no per-push allocation, no
wire. Pushes alternate between the sets: the set of the last committed push is never
written, so a push that fails half-way leaves it whole for an engine that is restarted
afterwards. What a worker needs to find a bucket is `describe(key)`, a small dict that
travels in the bucket's `update_info`; `OpenedBuckets.open(description)` on the worker
side returns the bucket's flat buffer as a view, without copying.

Two kinds:

- "shm": files in /dev/shm (one per bucket slot, in a directory of this push stream), mapped
  shared by the trainer and by every engine worker on this host. Works for CPU and GPU
  engines (a GPU worker copies from the mapping into its parameters).
- "cuda_ipc": CUDA buffers on the driver's GPU, opened by GPU workers on the same host
  through CUDA IPC handles (PyTorch's own tensor sharing, as `torch.multiprocessing` does
  it). Written for GPU hosts; the CPU machines this project is tested on have no CUDA, so
  this kind has not run.

The buffers only stage a push: an engine copies out of them at its commit and keeps no
reference afterwards, so the trainer may overwrite them with the next push.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from pathlib import Path

import torch

SHM_ROOT = Path("/dev/shm")
KINDS = ("shm", "cuda_ipc")


class BucketBuffers:
    """The trainer's reusable bucket buffers (one per bucket index)."""

    def __init__(self, kind: str, *, root: Path = SHM_ROOT, device: torch.device | None = None):
        if kind not in KINDS:
            raise ValueError(f"bucket buffers are one of {KINDS}, got {kind!r}")
        if kind == "cuda_ipc" and not torch.cuda.is_available():
            raise ValueError("rollout.weight_transport=cuda_ipc needs a CUDA device on the trainer; use 'shm' or 'gloo'")
        self.kind = kind
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if kind == "cuda_ipc" else None)
        self.directory = root / f"sdpg-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}" if kind == "shm" else None
        if self.directory is not None:
            if not root.is_dir():
                raise ValueError(f"rollout.weight_transport=shm needs {root} (a tmpfs); use 'gloo' on this host")
            self.directory.mkdir(mode=0o700)
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}  # (set, bucket index) → flat buffer
        self.committed = 1  # the set holding the last committed push
        self.writing: int | None = None  # the set the current (or last failed) push writes
        self.pushing = False  # between start_push and finish_push
        self._next = 0

    def start_push(self) -> None:
        """A push begins: its buckets go into the set the last commit did not use, from buffer 0."""
        self.writing, self._next, self.pushing = 1 - self.committed, 0, True

    def finish_push(self, committed: bool) -> None:
        """The push is over. Uncommitted, its set stays the one written: buckets a failed
        push's producer still hands out (while the trainer ranks finish their gathers)
        never touch the committed set."""
        if committed:
            self.committed = self.writing
        self.pushing = False

    def next_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The buffer for the push's next bucket (an `allocate` for `pack_buckets`)."""
        if self.writing is None:
            raise RuntimeError("bucket buffers: start_push() first")
        flat = self.buffer((self.writing, self._next), numel, dtype)
        self._next += 1
        return flat

    def key_of(self, flat: torch.Tensor) -> tuple[int, int] | None:
        """Which buffer `flat` is (None: not one of these buffers)."""
        return next((key for key, buffer in self._buffers.items() if buffer is flat), None)

    def buffer(self, key: tuple[int, int], numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Buffer `key` (1-D, `numel` elements of `dtype`), reused when the size and dtype
        are those it had before."""
        current = self._buffers.get(key)
        if current is not None and current.numel() == numel and current.dtype == dtype:
            return current
        self._buffers.pop(key, None)
        if self.kind == "shm":
            path = self._path(key)
            path.unlink(missing_ok=True)  # a mapping the engines still hold keeps the old pages alive
            flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        else:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
        self._buffers[key] = flat
        return flat

    def describe(self, key: tuple[int, int]) -> dict:
        """What a worker on this host needs to open buffer `key` (plain data)."""
        flat = self._buffers[key]
        description = {"kind": self.kind, "numel": flat.numel(), "dtype_name": str(flat.dtype).removeprefix("torch.")}
        if self.kind == "shm":
            description["path"] = str(self._path(key))
        else:
            from torch.multiprocessing.reductions import reduce_tensor

            _, args = reduce_tensor(flat)
            # args: (cls, size, stride, offset, storage type, dtype, device index, IPC handle,
            # storage size, storage offset, requires_grad, ref-counter handle and offset,
            # event handle, event sync flag); the device index is the trainer's numbering,
            # so the worker is told the GPU's UUID and maps it to its own numbering.
            description["ipc_args"] = pickle.dumps(args)  # vLLM's RPC carries bytes, not the classes in args
            description["device_uuid"] = str(torch.cuda.get_device_properties(self.device).uuid)
        return description

    def close(self) -> None:
        self._buffers.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, key: tuple[int, int]) -> Path:
        return self.directory / f"set{key[0]}-bucket-{key[1]:05d}"


class OpenedBuckets:
    """A worker's side: maps each bucket once and keeps the mapping for later pushes."""

    def __init__(self):
        self._open: dict[str, tuple[tuple, torch.Tensor]] = {}

    def open(self, description: dict, device: torch.device | None = None) -> torch.Tensor:
        dtype = getattr(torch, description["dtype_name"])
        numel = int(description["numel"])
        if description["kind"] == "shm":
            return self._open_shm(description["path"], numel, dtype)
        if description["kind"] == "cuda_ipc":
            return _open_cuda_ipc(description)
        raise ValueError(f"unknown bucket buffer kind {description['kind']!r}")

    def _open_shm(self, path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise ValueError(
                f"weight bucket {path} does not exist on this host: rollout.weight_transport=shm needs the "
                f"engines on the trainer's host (use 'gloo' or 'nccl' across hosts)"
            ) from None
        key = (stat.st_ino, stat.st_size, numel, dtype)
        known = self._open.get(path)
        if known is not None and known[0] == key:
            return known[1]
        if stat.st_size < numel * dtype.itemsize:
            raise ValueError(f"weight bucket {path} holds {stat.st_size} bytes, the push says {numel} {dtype}")
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        self._open[path] = (key, flat)
        return flat

    def close(self) -> None:
        self._open.clear()


def _open_cuda_ipc(description: dict) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if description["device_uuid"] not in uuids:
        raise ValueError(
            f"weight bucket lives on GPU {description['device_uuid']}, which this worker cannot see: "
            f"rollout.weight_transport=cuda_ipc needs the engines on the trainer's host with its GPU visible "
            f"(use 'nccl' otherwise)"
        )
    args = list(pickle.loads(description["ipc_args"]))
    args[6] = uuids.index(description["device_uuid"])  # the trainer's device index → this process's
    return rebuild_cuda_tensor(*args)
