"""The wire between the trainer and the engines' vLLM workers, for weight pushes.

Each engine gets its own process group: rank 0 is the trainer's driver, ranks 1..k the
engine's k tensor-parallel workers. A bucket travels as one flat buffer broadcast from
rank 0; the metadata that describes it (names, shapes, dtype, length) goes ahead of it as
the `update_info` of vLLM's `update_weights` call, so the receiver sizes its buffer from
the metadata alone and always completes the broadcast, even for a bucket it then rejects.
`WeightBucket` is that unit on both ends.

The groups are built from a TCPStore of their own and never touch `torch.distributed`'s
default group, which on the trainer is Megatron's and in a worker is vLLM's. Backend
"gloo" moves CPU (and CUDA) tensors over TCP; "nccl" is the GPU path. One group per engine
means a restarted engine rejoins without disturbing the others. Each end's gloo device
binds the address from which this host reaches the store (`local_address`), not whatever
the hostname resolves to (often 127.0.1.1, which a peer on another host cannot reach).

The worker end is `SdpgWeightTransferEngine` in `worker_extension.py`, registered with
vLLM's `WeightTransferEngineFactory`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKEND_NAME = "sdpg"  # the key under which the worker engine is registered with vLLM
TRANSPORTS = ("gloo", "nccl")  # the wires that are a process group (the others are same-node buffers)


@dataclass
class GroupAddress:
    """Where one engine's weight group meets; sent to the workers as their init info."""

    host: str
    port: int
    world_size: int  # 1 trainer rank + the engine's workers
    transport: str = "gloo"  # one of TRANSPORTS
    timeout_s: float = 300.0
    rank_offset: int = 1  # a worker's rank is rank_offset + its rank inside the engine


@dataclass
class WeightBucket:
    """Several HF tensors of one dtype, packed into one contiguous buffer."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    flat: torch.Tensor  # 1-D, numel = Σ prod(shape)

    @staticmethod
    def pack(tensors: list[tuple[str, torch.Tensor]], allocate=None) -> "WeightBucket":
        """One buffer holding `tensors` back to back: a new CPU tensor, or the one that
        `allocate(numel, dtype)` returns (each tensor is then copied once, into place)."""
        dtypes = {tensor.dtype for _, tensor in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"a bucket holds one dtype, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        if allocate is None:
            flat = torch.cat([tensor.detach().reshape(-1).cpu() for _, tensor in tensors])
        else:
            flat = allocate(sum(tensor.numel() for _, tensor in tensors), dtype)
            offset = 0
            for _, tensor in tensors:
                flat[offset:offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
                offset += tensor.numel()
        return WeightBucket([n for n, _ in tensors], [tuple(t.shape) for _, t in tensors], dtype, flat)

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors, as views of `flat`; ValueError if the buffer is not their size."""
        sizes = [int(torch.Size(shape).numel()) for shape in self.shapes]
        if len(self.names) != len(self.shapes):
            raise ValueError(f"bucket has {len(self.names)} names but {len(self.shapes)} shapes")
        if self.flat.dim() != 1 or self.flat.numel() != sum(sizes) or self.flat.dtype != self.dtype:
            raise ValueError(
                f"bucket buffer has {self.flat.numel()} {self.flat.dtype} elements, its "
                f"{len(self.names)} tensors need {sum(sizes)} {self.dtype} (truncated or corrupted push)"
            )
        parts = self.flat.split(sizes)
        return [(name, part.view(shape)) for name, part, shape in zip(self.names, parts, self.shapes)]

    @property
    def num_bytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def open_group(address: GroupAddress, rank: int, store: dist.Store | None = None) -> dist.ProcessGroup:
    """Join the group at `address` as `rank` (blocks until every rank has joined)."""
    if address.transport not in TRANSPORTS:
        raise ValueError(f"weight transport {address.transport!r} is not one of {TRANSPORTS}")
    timeout = timedelta(seconds=address.timeout_s)
    if store is None:
        store = dist.TCPStore(address.host, address.port, address.world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore("sdpg-weights", store)
    if address.transport == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(address.host, address.port))]
        return dist.ProcessGroupGloo(store, rank, address.world_size, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, address.world_size, options)


def listen(world_size: int, transport: str, timeout_s: float) -> tuple[GroupAddress, dist.TCPStore]:
    """The trainer's end: a store on a free port of this host, and the address to hand out."""
    host = _host_address()
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    return GroupAddress(host, store.port, world_size, transport, timeout_s), store


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> dist.Work:
    """Asynchronous broadcast from rank 0 of `group` (wait() on the result)."""
    return group.broadcast([tensor], dist.BroadcastOptions())


def update_info(bucket: WeightBucket) -> dict:
    """The metadata of one bucket, as vLLM's `update_weights` carries it (plain data)."""
    return {
        "names": list(bucket.names),
        "shapes": [list(shape) for shape in bucket.shapes],
        "dtype_name": str(bucket.flat.dtype).removeprefix("torch."),
        "numel": int(bucket.flat.numel()),
    }


def local_address(host: str, port: int) -> str:
    """The address of this host from which `host` is reached (the source address of the route
    to it; no packet is sent): the host itself when it is one of ours, loopback included."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), port))
        return probe.getsockname()[0]


def _host_address() -> str:
    """This node's address as the engines (possibly on other nodes) can reach it."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())
