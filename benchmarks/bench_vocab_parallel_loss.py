"""The fused vocab-parallel loss against the naive full-logits computation, on CPU.

A CPU proxy of the Qwen3-4B shape: N = 4096 tokens, H = 256, V = 15104 (V/H as Qwen3-4B's
151,936 / 2560), student + detached teacher, forward + backward of log-prob, entropy and
reverse KL. Every figure is a ratio against naive measured in the same run:

- extra saved-for-backward bytes (saved tensors that are not the inputs themselves);
- peak RSS increase over the inputs, each implementation in a fresh subprocess (peak
  reset through /proc/self/clear_refs, read from VmHWM);
- matmul FLOPs (torch.utils.flop_counter), wall time (median), fixed threads;
- forward collectives on 2 gloo ranks (calls and bytes per token; naive gathers logits).

    .venv/bin/python benchmarks/bench_vocab_parallel_loss.py            # full size
    .venv/bin/python benchmarks/bench_vocab_parallel_loss.py --quick    # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdpg_megatron.parallel import split_vocab_shard, vocab_parallel_token_stats  # noqa: E402
from sdpg_megatron.parallel.reference import naive_token_stats  # noqa: E402

TARGETS = {"saved_bytes": 0.02, "peak_rss": 0.10, "flops": 1.5, "wall": 1.5}


def make_inputs(num_tokens: int, hidden: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(num_tokens, hidden, generator=generator).requires_grad_(True)
    teacher = student.detach() + 0.3 * torch.randn(num_tokens, hidden, generator=generator)
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).requires_grad_(True)
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    return student, teacher, weight, targets


def forward_backward(impl: str, student, teacher, weight, targets, chunk_size: int | None, group=None):
    if impl == "fused":
        stats = vocab_parallel_token_stats(student, weight, targets, teacher, group=group, chunk_size=chunk_size)
    else:
        stats = naive_token_stats(student, weight, targets, teacher, dtype=torch.float32)
    loss = stats.logprobs.sum() + stats.entropy.sum() + stats.reverse_kl.sum()
    loss.backward()
    return stats


# --------------------------------------------------------------------------- one process each


def measure_in_process(impl: str, num_tokens: int, hidden: int, vocab: int, chunk_size: int, repeats: int) -> dict:
    """Runs in a fresh subprocess: peak RSS first (a clean heap), then saved bytes, FLOPs, time."""
    from torch.utils.flop_counter import FlopCounterMode

    chunk_size = chunk_size or None
    student, teacher, weight, targets = make_inputs(num_tokens, hidden, vocab)
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    base_kib = _status_kib("VmRSS")
    forward_backward(impl, student, teacher, weight, targets, chunk_size)
    peak_increase = (_status_kib("VmHWM") - base_kib) * 1024

    input_storages = {t.untyped_storage().data_ptr() for t in (student, teacher, weight, targets)}
    saved = {"bytes": 0}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in input_storages:
            saved["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if impl == "fused":
            stats = vocab_parallel_token_stats(student, weight, targets, teacher, chunk_size=chunk_size)
        else:
            stats = naive_token_stats(student, weight, targets, teacher, dtype=torch.float32)
    del stats

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(impl, student, teacher, weight, targets, chunk_size)
    times = []
    for _ in range(repeats):
        student.grad = weight.grad = None
        start = time.perf_counter()
        forward_backward(impl, student, teacher, weight, targets, chunk_size)
        times.append(time.perf_counter() - start)
    return {
        "saved_bytes": saved["bytes"],
        "peak_rss_bytes": peak_increase,
        "flops": counter.get_total_flops(),
        "wall_s": statistics.median(times),
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_subprocess(impl: str, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", impl, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
        "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------- collectives (2 ranks)


class _GatherVocab(torch.autograd.Function):
    """All-gather logits shards along the vocabulary; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, shard, group):
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


def _naive_tp_forward_backward(student, teacher, weight_shard, targets, group):
    """What a naive TP implementation does: gather the full [N, V] logits of both views."""
    student_logits = _GatherVocab.apply(student @ weight_shard.t(), group)
    with torch.no_grad():
        teacher_logits = _GatherVocab.apply(teacher @ weight_shard.t(), group)
    logp = torch.log_softmax(student_logits, -1)
    logq = torch.log_softmax(teacher_logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    (logp.gather(1, targets[:, None]).sum() + kl.sum() + entropy.sum()).backward()


def collective_worker(rank: int, world_size: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    counts = {}
    for impl in ("naive", "fused"):
        student, teacher, weight, targets = make_inputs(args.collective_tokens, args.hidden, args.vocab)
        shard = split_vocab_shard(weight.detach(), world_size, rank).clone().requires_grad_(True)
        calls = []
        originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

        def counting(name):
            def wrapper(tensor_or_list, *rest, **kwargs):
                if isinstance(tensor_or_list, list):  # all_gather(output_list, input): bytes received
                    nbytes = sum(t.numel() * t.element_size() for t in tensor_or_list)
                else:
                    nbytes = tensor_or_list.numel() * tensor_or_list.element_size()
                calls.append(nbytes)
                return originals[name](tensor_or_list, *rest, **kwargs)
            return wrapper

        for name in originals:
            setattr(dist, name, counting(name))
        try:
            if impl == "fused":
                stats = vocab_parallel_token_stats(student, shard, targets, teacher, group=dist.group.WORLD,
                                                   chunk_size=args.chunk_size or None)
                forward = list(calls)
                (stats.logprobs.sum() + stats.entropy.sum() + stats.reverse_kl.sum()).backward()
            else:
                _naive_tp_forward_backward(student, teacher, shard, targets, dist.group.WORLD)
                forward = calls[:2]  # the two logits gathers
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        counts[impl] = {
            "forward_calls": len(forward),
            "forward_bytes_per_token": sum(forward) / args.collective_tokens,
            "total_bytes_per_token": sum(calls) / args.collective_tokens,
        }
    if rank == 0:
        queue.put(counts)
    dist.destroy_process_group()


def measure_collectives(args) -> dict:
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    from tests.distributed import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=collective_worker, args=(r, 2, port, args, queue)) for r in range(2)]
    for worker in workers:
        worker.start()
    result = queue.get(timeout=600)
    for worker in workers:
        worker.join(timeout=60)
    return result


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=15104)
    parser.add_argument("--chunk-size", type=int, default=0, help="0: the function's default")
    parser.add_argument("--collective-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small shapes, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vocab_parallel_loss_cpu.json")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_in_process(args.worker, args.tokens, args.hidden, args.vocab, args.chunk_size, args.repeats)))
        return
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.chunk_size, args.collective_tokens, args.repeats = 512, 64, 3776, 64, 64, 1

    print(f"N={args.tokens} H={args.hidden} V={args.vocab} chunk={args.chunk_size or 'auto'} threads={args.threads} "
          f"torch={torch.__version__}", flush=True)
    results = {impl: run_subprocess(impl, args) for impl in ("naive", "fused")}
    collectives = measure_collectives(args)
    naive, fused = results["naive"], results["fused"]
    rows = [
        ("extra saved-for-backward", _mib(naive["saved_bytes"]), _mib(fused["saved_bytes"]),
         fused["saved_bytes"] / naive["saved_bytes"], f"<= {TARGETS['saved_bytes']}"),
        ("peak RSS increase", _mib(naive["peak_rss_bytes"]), _mib(fused["peak_rss_bytes"]),
         fused["peak_rss_bytes"] / naive["peak_rss_bytes"], f"<= {TARGETS['peak_rss']}"),
        ("matmul FLOPs (fwd+bwd)", f"{naive['flops'] / 1e9:.1f} G", f"{fused['flops'] / 1e9:.1f} G",
         fused["flops"] / naive["flops"], f"<= {TARGETS['flops']}"),
        ("wall time (fwd+bwd)", f"{naive['wall_s']:.3f} s", f"{fused['wall_s']:.3f} s",
         fused["wall_s"] / naive["wall_s"], f"<= {TARGETS['wall']}"),
        ("forward collectives (TP2)", str(collectives["naive"]["forward_calls"]),
         str(collectives["fused"]["forward_calls"]), None, "== 2"),
        ("forward collective bytes/token", f"{collectives['naive']['forward_bytes_per_token']:.0f} B",
         f"{collectives['fused']['forward_bytes_per_token']:.0f} B",
         collectives["fused"]["forward_bytes_per_token"] / collectives["naive"]["forward_bytes_per_token"], ""),
    ]
    print(f"\n{'metric':34s} {'naive':>14s} {'fused':>14s} {'ratio':>8s}  target")
    for name, a, b, ratio, target in rows:
        print(f"{name:34s} {a:>14s} {b:>14s} {'' if ratio is None else f'{ratio:.4f}':>8s}  {target}")
    passed = {
        "saved_bytes": rows[0][3] <= TARGETS["saved_bytes"],
        "peak_rss": rows[1][3] <= TARGETS["peak_rss"],
        "flops": rows[2][3] <= TARGETS["flops"],
        "wall": rows[3][3] <= TARGETS["wall"],
        "forward_collectives": collectives["fused"]["forward_calls"] == 2,
    }
    print("targets met:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in passed.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "chunk_size": args.chunk_size},
        "threads": args.threads, "torch": torch.__version__, "cpu": _cpu_name(), "quick": args.quick,
        "results": results, "collectives_tp2": collectives, "targets": TARGETS, "targets_met": passed,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
