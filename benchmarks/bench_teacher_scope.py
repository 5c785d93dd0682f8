"""The teacher pass on the needed samples only, against every sample, in the same run (CPU).

With SDPG's positive-advantage gate, a response with A ≤ 0 contributes β·0·KL: the teacher's
hidden states for it are never used. `algorithm.teacher_scope="needed"` (the default) runs
the teacher pass on the samples with A > 0 only, and the fused loss computes the teacher's
logits only for their tokens; "all" runs it on every sample (the previous behaviour).

A randomly initialised small Qwen3 (8 layers, hidden 512, local spec, fp32, TP1) runs the
trainer's own passes (`ModelPasses`, SDPG-URKL with a constant β) on a synthetic step of 4
groups × 4 responses whose binary rewards give group-relative advantages as in training:
groups [1,0,0,0], [1,1,0,0], [1,1,1,0] and [0,0,0,0], so 6 of 16 responses have A > 0
(all-equal groups get A = 0). Each scope times the teacher pass and the training pass
(forward, backward, one Adam step); the scopes take turns over two rounds, and the median
over both rounds' timed steps is reported.
The first step's loss and gradient norm must be the same under both.

    .venv/bin/python benchmarks/bench_teacher_scope.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_teacher_scope.py --quick    # tiny shape, seconds

Writes benchmarks/results/teacher_scope_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

from bench_recompute import bench_arch  # noqa: E402  (the same model as the recomputation benchmark)

from sdpg_megatron.algo import group_relative_advantages, teacher_sample_mask  # noqa: E402
from sdpg_megatron.config import Config  # noqa: E402
from sdpg_megatron.presets import sdpg_urkl  # noqa: E402
from sdpg_megatron.experience import Sample, make_step_batch, micro_batches  # noqa: E402
from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel  # noqa: E402
from sdpg_megatron.passes import ModelPasses  # noqa: E402

REWARDS = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
SCOPES = ("all", "needed")


def step_batch(vocab: int, prompt: int, hint: int, response: int):
    generator = torch.Generator().manual_seed(0)
    samples = []
    for group, rewards in enumerate(REWARDS):
        student_prompt = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        teacher_prompt = student_prompt + torch.randint(0, vocab, (hint,), generator=generator).tolist()
        for reward in rewards:
            tokens = torch.randint(0, vocab, (response,), generator=generator).tolist()
            samples.append(Sample(group=group, student_prompt=student_prompt, teacher_prompt=teacher_prompt,
                                  response=tokens, rollout_logprobs=[-8.0] * response,
                                  reward=float(reward), correct=bool(reward)))
    batch = make_step_batch(1, samples, len(REWARDS[0]))
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    return batch, group_relative_advantages(rewards, batch.group_size, 1e-6).float()


def build(scope: str, arch) -> ModelPasses:
    # Megatron's parallel state and RNG tracker afresh: the same random initialisation each time
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    config = Config()
    config.algorithm = sdpg_urkl()
    config.algorithm.anchor, config.algorithm.alpha = "none", 0.0  # π_ref is the same for both scopes
    config.algorithm.beta_schedule = "constant"
    config.algorithm.teacher_scope = scope
    config.model.loss_backend = "torch"
    config.schedule.micro_batch_size = 4
    return ModelPasses(config, groups, None, arch=arch)


def one_step(passes: ModelPasses, batch, mbs, advantages, step: int) -> dict:
    needed = teacher_sample_mask(passes.config.algorithm, advantages, step, 10)
    start = time.perf_counter()
    teacher = passes.teacher_states(batch, mbs, needed)
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    result = passes.train(batch, mbs, step, teacher, None, first_minibatch=True)
    train_s = time.perf_counter() - start
    if not result.update_successful:
        raise RuntimeError(f"step {step} was skipped (non-finite gradients)")
    return {"teacher_s": teacher_s, "train_s": train_s, "grad_norm": float(result.grad_norm),
            "loss": sum(float(r["loss"]) for r in result.losses), "teacher_samples": int(needed.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per scope and round (after the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_scope_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    arch = bench_arch(args.quick)
    batch, advantages = step_batch(arch.vocab_size, *((16, 8, 24) if args.quick else (128, 64, 384)))
    mbs = micro_batches(batch, list(range(len(batch.samples))), 4, advantages, 0)

    # Per scope and round: a fresh model from the same initialisation, whose first step is
    # the one compared, then the timed steps; the scopes take turns over two rounds.
    first, runs = {}, {scope: [] for scope in SCOPES}
    for _ in range(2):
        for scope in SCOPES:
            passes = build(scope, arch)
            first[scope] = one_step(passes, batch, mbs, advantages, 1)
            runs[scope] += [one_step(passes, batch, mbs, advantages, 2 + k) for k in range(args.repeats)]
            destroy_parallel()

    report = {
        "date": datetime.date.today().isoformat(), "device": f"cpu, {torch.get_num_threads()} threads",
        "model": {"layers": arch.num_layers, "hidden": arch.hidden_size, "vocab": arch.vocab_size,
                  "spec": "local (unfused attention)", "dtype": "float32"},
        "batch": {"samples": len(batch.samples), "rewards": REWARDS, "micro_batch_size": 4,
                  "student_length": batch.student_length, "teacher_length": batch.teacher_length,
                  "response_tokens": sum(mb.num_tokens for mb in mbs),
                  "samples_with_positive_advantage": int((advantages > 0).sum())},
        "first_step": first, "scopes": {},
    }
    for scope in SCOPES:
        teacher = statistics.median(r["teacher_s"] for r in runs[scope])
        train = statistics.median(r["train_s"] for r in runs[scope])
        report["scopes"][scope] = {"teacher_s": teacher, "train_s": train, "teacher_plus_train_s": teacher + train,
                                   "teacher_samples": runs[scope][0]["teacher_samples"], "runs": runs[scope]}
    base, new = report["scopes"]["all"], report["scopes"]["needed"]
    report["ratios"] = {key: new[key] / base[key] for key in ("teacher_s", "train_s", "teacher_plus_train_s")}
    print("| teacher_scope | teacher samples | teacher pass s | train pass s | teacher + train s |")
    print("|---|---|---|---|---|")
    for scope, r in report["scopes"].items():
        print(f"| {scope} | {r['teacher_samples']} / {len(batch.samples)} | {r['teacher_s']:.3f} | "
              f"{r['train_s']:.3f} | {r['teacher_plus_train_s']:.3f} |")
    print("needed / all: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()
    a, b = first["all"], first["needed"]
    if abs(a["loss"] - b["loss"]) > 1e-6 * abs(a["loss"]) or abs(a["grad_norm"] / b["grad_norm"] - 1) > 1e-5:
        raise SystemExit(f"teacher_scope changed the step: all {a}, needed {b}")


if __name__ == "__main__":
    main()
