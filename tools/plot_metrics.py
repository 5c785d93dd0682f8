#!/usr/bin/env python
"""Plot training curves of several methods (each one or more seeds) and print a summary.

    python tools/plot_metrics.py --run SDPG-URKL=runs/urkl_s0,runs/urkl_s1 \
        --run GRPO=runs/grpo_s0 --out curves.png --smooth 5

Each --run is LABEL=DIR[,DIR...], one directory (or metrics.jsonl) per seed. Writes a 2×2
PNG (accuracy, reward, entropy, response length: mean over seeds, min–max band) and prints,
per method, the mean of --key over the last --last steps and its best value.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_run(text: str) -> tuple[str, list[Path]]:
    """LABEL=DIR[,DIR...] → (label, dirs); argparse turns the errors into 'argument --run: ...'."""
    label, separator, dirs_text = text.partition("=")
    label = label.strip()
    run_dirs = [Path(part.strip()) for part in dirs_text.split(",") if part.strip()]
    if not separator or not label or not run_dirs:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR[,DIR...], got {text!r}")
    for run_dir in run_dirs:
        metrics_path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
        if not run_dir.exists():
            raise argparse.ArgumentTypeError(f"run directory {str(run_dir)!r} of {label!r} does not exist")
        if not metrics_path.is_file():
            raise argparse.ArgumentTypeError(f"run directory {str(run_dir)!r} of {label!r} has no metrics.jsonl")
    return label, run_dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="LABEL=DIR[,DIR...]",
                        help="a method and its run directories, one per seed; repeat for each method")
    parser.add_argument("--out", required=True, help="output image (PNG)")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window in steps")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--key", default="accuracy", help="metric summarized in the printed table")
    parser.add_argument("--last", type=int, default=5, help="steps averaged at the end of each seed")
    args = parser.parse_args(argv)

    runs = {}
    for label, run_dirs in args.run:
        if label in runs:
            parser.error(f"argument --run: label {label!r} given twice; list all its seeds in one --run")
        runs[label] = run_dirs
    if args.smooth < 1:
        parser.error(f"argument --smooth: must be >= 1, got {args.smooth}")
    if args.last < 1:
        parser.error(f"argument --last: must be >= 1, got {args.last}")

    from sdpg_megatron.cli_paths import output_file

    try:
        output_file(args.out, "--out")
    except OSError as error:
        parser.error(str(error))

    from sdpg_megatron.plotting import plot_runs, summarize_runs

    try:
        out_path = plot_runs(runs, args.out, smooth=args.smooth, title=args.title)
        summary = summarize_runs(runs, key=args.key, last=args.last)
    except (ValueError, FileNotFoundError) as error:
        print(f"plot_metrics: error: {error}", file=sys.stderr)
        return 2

    def number(value: float) -> str:
        return f"{value:.4f}" if math.isfinite(value) else "n/a"

    label_width = max(len("method"), *(len(label) for label in summary))
    mean_header = f"{args.key} (last {args.last})"
    print(f"{'method':<{label_width}}  seeds  {mean_header:>{max(len(mean_header), 8)}}  {'best':>8}  per seed")
    for label, row in summary.items():
        per_seed = ", ".join(number(value) for value in row["per_seed_last"])
        print(f"{label:<{label_width}}  {len(row['per_seed_last']):>5}  "
              f"{number(row['mean_last']):>{max(len(mean_header), 8)}}  {number(row['best']):>8}  {per_seed}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
