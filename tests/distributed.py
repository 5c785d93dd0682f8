"""Run a function on N spawned gloo ranks and collect what each returns.

Used by the distributed tests: the function must be importable (module level) and
return picklable values (CPU tensors are fine). A failing rank re-raises here with its
traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        # Plain pickle (bytes), not shared memory: this process exits right after.
        queue.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:  # noqa: BLE001 - shipped back to the test process
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0) -> list:
    """Returns [result of rank 0, result of rank 1, ...]."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        # not daemonic: Megatron's checkpoint writer and the verifier pool start child processes
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, value, error = queue.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]


def last_stage_report(reports: list[dict], key: str) -> dict:
    """The one rank's `reports[rank][key]` marked "last" (the rank holding the last pipeline
    stage's per-token results for data-parallel rank 0)."""
    (report,) = [r[key] for r in reports if r[key]["last"]]
    return report
