"""Training curves of several methods × seeds, read from their metrics.jsonl files.

`plot_runs` draws one panel per metric: for each method the mean over its seeds against the
rollout step, with the seeds' min–max range as a band when there is more than one seed.
At a step, the mean is over the seeds that logged it, so a seed that stopped early
shortens nothing. Smoothing is a trailing moving average applied to each seed before the
mean (the first points average what precedes them), which keeps the curve causal.
`summarize_runs` gives the numbers a results table needs.

Nothing here imports pyplot: figures are built on matplotlib's Agg canvas directly, so
plotting from a training process never touches a display or global backend state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sdpg_megatron.metrics import read_metrics

DEFAULT_PANELS = (("accuracy", "accuracy"), ("reward_mean", "reward"),
                  ("entropy", "entropy"), ("response_length", "response length"))

Runs = Mapping[str, Sequence[str | os.PathLike]]


def plot_runs(runs: Runs, out_path: str | os.PathLike, *,
              panels: Sequence[tuple[str, str]] = DEFAULT_PANELS, smooth: int = 1,
              title: str | None = None) -> Path:
    """Write a PNG of `panels` (metric key, axis label) for every method in `runs`.

    `runs` maps a method label to its run directories (one per seed). A metric no run
    logged shows "no data" in its panel. Returns `out_path`, written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if smooth < 1:
        raise ValueError(f"smooth must be a window of >= 1 steps, got {smooth}")
    if not panels:
        raise ValueError("panels must name at least one (metric key, label) pair")
    records = _load_runs(runs)
    out_path = Path(out_path)

    num_cols = 1 if len(panels) == 1 else 2
    num_rows = math.ceil(len(panels) / num_cols)
    figure = Figure(figsize=(6.0 * num_cols, 4.0 * num_rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, num_cols, squeeze=False).ravel()
    colors = {label: f"C{index % 10}" for index, label in enumerate(records)}
    legend_handles = {}

    for axis, (key, axis_label) in zip(axes, panels):
        axis.set_title(axis_label)
        axis.set_xlabel("rollout step")
        axis.set_ylabel(axis_label)
        axis.grid(alpha=0.3)
        has_data = False
        for label, seed_records in records.items():
            curve = _mean_curve([_series(one_seed, key, smooth=smooth) for one_seed in seed_records])
            if curve is None:
                continue
            has_data = True
            steps, mean, low, high = curve
            (line,) = axis.plot(steps, mean, color=colors[label], linewidth=1.6)
            if len(seed_records) > 1:
                axis.fill_between(steps, low, high, color=colors[label], alpha=0.2, linewidth=0)
            legend_handles.setdefault(label, line)
        if not has_data:
            axis.text(0.5, 0.5, f"no data\n({key})", transform=axis.transAxes,
                      ha="center", va="center", color="gray")
            axis.set_xticks([])
            axis.set_yticks([])
    for axis in axes[len(panels):]:
        axis.set_visible(False)

    if legend_handles:
        figure.legend([legend_handles[label] for label in legend_handles],
                      [f"{label} ({len(records[label])} seed{'s' if len(records[label]) > 1 else ''})"
                       for label in legend_handles],
                      loc="outside lower center", ncols=min(len(legend_handles), 4), frameon=False)
    figure.suptitle(title or f"training curves{f' (smoothed over {smooth} steps)' if smooth > 1 else ''}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = out_path.with_name(f".{out_path.name}.tmp")
    try:
        figure.savefig(temp_path, format=out_path.suffix.lstrip(".").lower() or "png", dpi=120)
        os.replace(temp_path, out_path)
    finally:
        temp_path.unlink(missing_ok=True)
    return out_path


def summarize_runs(runs: Runs, key: str = "accuracy", last: int = 5) -> dict[str, dict]:
    """Per method: `per_seed_last` (each seed's mean of its last `last` logged values of
    `key`), `mean_last` (their mean over seeds) and `best` (the highest point of the
    unsmoothed mean-over-seeds curve). A seed without the key counts as NaN and is left
    out of `mean_last`; a method with no data at all gets NaN everywhere.
    """
    if last < 1:
        raise ValueError(f"last must be >= 1 step, got {last}")
    summary = {}
    for label, seed_records in _load_runs(runs).items():
        seed_series = [_series(one_seed, key, smooth=1) for one_seed in seed_records]
        per_seed_last = [float(values[-last:].mean()) if len(values) else math.nan
                         for _, values in seed_series]
        finite = [value for value in per_seed_last if math.isfinite(value)]
        curve = _mean_curve(seed_series)
        summary[label] = {
            "mean_last": float(np.mean(finite)) if finite else math.nan,
            "per_seed_last": per_seed_last,
            "best": float(curve[1].max()) if curve is not None else math.nan,
        }
    return summary


def _load_runs(runs: Runs) -> dict[str, list[list[dict]]]:
    if not runs:
        raise ValueError("runs is empty: map at least one method label to its run directories")
    loaded = {}
    for label, run_dirs in runs.items():
        if isinstance(run_dirs, (str, os.PathLike)):
            raise ValueError(f"runs[{label!r}] must be a list of run directories, got a single path; "
                             f"wrap it in a list")
        if not run_dirs:
            raise ValueError(f"runs[{label!r}] lists no run directories")
        loaded[label] = [read_metrics(run_dir) for run_dir in run_dirs]
    return loaded


def _series(records: list[dict], key: str, *, smooth: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` where it is finite, smoothed by a trailing moving average."""
    points = [(record["step"], record[key]) for record in records
              if key in record and math.isfinite(record[key])]
    steps = np.array([step for step, _ in points], dtype=np.int64)
    values = np.array([value for _, value in points], dtype=np.float64)
    if smooth > 1 and len(values):
        cumulative = np.concatenate([[0.0], np.cumsum(values)])
        ends = np.arange(1, len(values) + 1)
        starts = np.maximum(0, ends - smooth)
        values = (cumulative[ends] - cumulative[starts]) / (ends - starts)
    return steps, values


def _mean_curve(seed_series: list[tuple[np.ndarray, np.ndarray]]):
    """(steps, mean, min, max) over the seeds that logged each step; None without data."""
    all_steps = np.unique(np.concatenate([steps for steps, _ in seed_series]))
    if not len(all_steps):
        return None
    grid = np.full((len(seed_series), len(all_steps)), np.nan)
    for row, (steps, values) in enumerate(seed_series):
        grid[row, np.searchsorted(all_steps, steps)] = values
    return all_steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)
