"""Dynamic batching against today's padding, in the same run (CPU).

A reasoning model's response lengths are long-tailed: most responses well under the limit,
a tail at it. Padded micro-batches (`schedule.micro_batch_size` rows, each padded to the
step's longest sequence) then compute mostly padding; dynamic batching
(`schedule.max_tokens_per_micro_batch`) cuts micro-batches from length-sorted samples by
a token budget, each padded only to its own longest row.

A randomly initialised small Qwen3 (the recomputation benchmark's model, local spec,
fp32, TP1) runs the trainer's training pass (`ModelPasses.train`: forward, backward, one
Adam step; SDPG-URKL without the teacher and π_ref, whose passes scale the same way) on
one mini-batch whose response lengths are drawn as: 80 % log-normal around a tenth of
the limit, 20 % at the limit. Reported per mode: computed tokens (rows × padded length of
each micro-batch) over real tokens, and the median time of the timed steps; the modes take
turns. Both modes' first steps must give the same loss and gradient norm.

Then the same two modes' first step at pipeline parallelism 2 (two spawned gloo ranks, one
thread each, so its times compare only with each other): the micro-batches are the same,
now run through the pipeline schedule with shapes exchanged between the stages; again both
modes must give the same loss and gradient norm.

    .venv/bin/python benchmarks/bench_dynamic_batching.py            # 12 minutes on 2 cores, plus the PP2 case (not timed yet)
    .venv/bin/python benchmarks/bench_dynamic_batching.py --quick    # tiny shape, seconds

Writes benchmarks/results/dynamic_batching_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_recompute import bench_arch  # noqa: E402  (the same model as the recomputation benchmark)

from sdpg_megatron.algo import group_relative_advantages  # noqa: E402
from sdpg_megatron.config import Config  # noqa: E402
from sdpg_megatron.presets import sdpg_urkl  # noqa: E402
from sdpg_megatron.experience import Sample, make_step_batch, micro_batches, sequence_lengths  # noqa: E402
from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel  # noqa: E402
from sdpg_megatron.passes import ModelPasses  # noqa: E402


def long_tailed_lengths(count: int, limit: int, seed: int = 0) -> list[int]:
    """80 % log-normal around limit/10 (capped at the limit), 20 % at the limit."""
    rng = random.Random(seed)
    return [limit if rng.random() < 0.2 else max(1, min(limit, round(rng.lognormvariate(0.0, 0.6) * limit / 10)))
            for _ in range(count)]


def step_batch(vocab: int, samples: int, prompt: int, limit: int):
    generator = torch.Generator().manual_seed(0)
    lengths = long_tailed_lengths(samples, limit)
    rows = []
    for index, length in enumerate(lengths):
        student_prompt = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        rows.append(Sample(group=index // 8, student_prompt=student_prompt, teacher_prompt=student_prompt,
                           response=torch.randint(0, vocab, (length,), generator=generator).tolist(),
                           rollout_logprobs=[-8.0] * length, reward=float(index % 3 == 0), correct=index % 3 == 0))
    batch = make_step_batch(1, rows, 8)
    rewards = torch.tensor([s.reward for s in rows], dtype=torch.float64)
    return batch, group_relative_advantages(rewards, 8, 1e-6).float()


def shapes(quick: bool) -> tuple[int, int, int, int]:
    """(samples, prompt tokens, response limit, padded micro-batch rows)."""
    return (16, 8, 96, 4) if quick else (64, 32, 768, 4)


def modes_of(batch, advantages, quick: bool) -> tuple[dict, int]:
    """{"padded": micro-batches, "dynamic": micro-batches}, and the token budget."""
    samples, prompt, limit, rows = shapes(quick)
    budget = rows * (prompt + limit)  # the padded mode's micro-batch, in tokens
    ids = list(range(samples))
    return {"padded": micro_batches(batch, ids, rows, advantages, 0),
            "dynamic": micro_batches(batch, ids, rows, advantages, 0, max_tokens=budget)}, budget


def build(arch, max_tokens: int | None, pipeline_parallel: int = 1) -> ModelPasses:
    # Megatron's parallel state and RNG tracker afresh: the same random initialisation each time
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=pipeline_parallel, seed=0)
    config = Config()
    config.algorithm = sdpg_urkl()
    config.algorithm.beta_base, config.algorithm.anchor, config.algorithm.alpha = 0.0, "none", 0.0
    config.model.loss_backend = "torch"
    config.schedule.max_tokens_per_micro_batch = max_tokens  # the pipeline stages then exchange shapes
    return ModelPasses(config, groups, None, arch=arch)


def one_step(passes: ModelPasses, batch, mbs, step: int) -> dict:
    start = time.perf_counter()
    result = passes.train(batch, mbs, step, None, None, first_minibatch=True)
    seconds = time.perf_counter() - start
    if not result.update_successful:
        raise RuntimeError(f"step {step} was skipped (non-finite gradients)")
    return {"train_s": seconds, "grad_norm": float(result.grad_norm), "loss": sum(float(r["loss"]) for r in result.losses)}


def pipeline_worker(rank: int, port: int, quick: bool, queue) -> None:
    """One of the PP2 case's two ranks: each mode's first step; the last stage reports."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    arch = bench_arch(quick)
    samples, prompt, limit, _ = shapes(quick)
    batch, advantages = step_batch(arch.vocab_size, samples, prompt, limit)
    modes, budget = modes_of(batch, advantages, quick)
    results = {}
    for mode, mbs in modes.items():
        passes = build(arch, budget if mode == "dynamic" else None, pipeline_parallel=2)
        results[mode] = one_step(passes, batch, mbs, 1)
        destroy_parallel()
    if rank == 1:
        queue.put(results)
    dist.destroy_process_group()


def pipeline_case(quick: bool) -> dict:
    with socket.socket() as sock:  # a free port for the two ranks' own process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(pipeline_worker, args=(port, quick, queue), nprocs=2, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per mode and round (after the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dynamic_batching_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29537")
    dist.init_process_group("gloo", rank=0, world_size=1)
    arch = bench_arch(args.quick)
    samples, prompt, limit, rows = shapes(args.quick)
    batch, advantages = step_batch(arch.vocab_size, samples, prompt, limit)
    modes, budget = modes_of(batch, advantages, args.quick)
    real = sum(sequence_lengths(batch, i)[0] for i in range(samples))

    first, runs = {}, {mode: [] for mode in modes}
    for _ in range(2):
        for mode, mbs in modes.items():
            passes = build(arch, budget if mode == "dynamic" else None)
            first[mode] = one_step(passes, batch, mbs, 1)
            runs[mode] += [one_step(passes, batch, mbs, 2 + k) for k in range(args.repeats)]
            destroy_parallel()

    report = {
        "date": datetime.date.today().isoformat(), "device": f"cpu, {torch.get_num_threads()} threads",
        "model": {"layers": arch.num_layers, "hidden": arch.hidden_size, "vocab": arch.vocab_size,
                  "spec": "local (unfused attention)", "dtype": "float32"},
        "batch": {"samples": samples, "prompt_tokens": prompt, "response_limit": limit,
                  "response_lengths": [len(s.response) for s in batch.samples], "real_tokens": real,
                  "padded_micro_batch_rows": rows, "token_budget": budget},
        "first_step": first, "modes": {},
    }
    for mode, mbs in modes.items():
        computed = sum(mb.tokens.numel() for mb in mbs)
        report["modes"][mode] = {"micro_batches": len(mbs), "computed_tokens": computed,
                                 "padded_over_real": computed / real,
                                 "train_s": statistics.median(r["train_s"] for r in runs[mode]), "runs": runs[mode]}
    padded, dynamic = report["modes"]["padded"], report["modes"]["dynamic"]
    report["dynamic_over_padded_time"] = dynamic["train_s"] / padded["train_s"]
    print("| mode | micro-batches | computed / real tokens | train pass s |")
    print("|---|---|---|---|")
    for mode, r in report["modes"].items():
        print(f"| {mode} | {r['micro_batches']} | {r['padded_over_real']:.2f} | {r['train_s']:.3f} |")
    print(f"dynamic / padded time: {report['dynamic_over_padded_time']:.2f}")
    dist.destroy_process_group()

    pipeline = pipeline_case(args.quick)
    report["pipeline_parallel_2"] = {mode: {**pipeline[mode], **{k: report["modes"][mode][k] for k in (
        "micro_batches", "computed_tokens", "padded_over_real")}} for mode in modes}
    print("\nPP2 (2 ranks, 1 thread each), first step:")
    print("| mode | micro-batches | computed / real tokens | train pass s |")
    print("|---|---|---|---|")
    for mode, r in report["pipeline_parallel_2"].items():
        print(f"| {mode} | {r['micro_batches']} | {r['padded_over_real']:.2f} | {r['train_s']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for layout, steps in (("PP1", first), ("PP2", pipeline)):
        a, b = steps["padded"], steps["dynamic"]
        if abs(a["loss"] - b["loss"]) > 1e-5 * abs(a["loss"]) or abs(a["grad_norm"] / b["grad_norm"] - 1) > 1e-5:
            raise SystemExit(f"dynamic batching changed the step at {layout}: padded {a}, dynamic {b}")


if __name__ == "__main__":
    main()
