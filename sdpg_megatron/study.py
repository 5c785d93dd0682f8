"""Numbers for a study over seeds: early area under a held-out curve, bootstrap intervals.

`early_auc` is the mean height of a piecewise-linear accuracy curve over its first
steps (the trapezoid rule over the evaluations up to `until`, divided by the span), so it
reads as an accuracy. `bootstrap_interval` is the percentile bootstrap of a mean over
seeds; `paired_differences` pairs two arms' values by seed (both arms ran from the same
start with the same seed) before the same interval is taken of the differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def early_auc(history: Mapping[int, float], until: int) -> float:
    """Mean accuracy over steps [0, until] of the curve through (step, accuracy) points.

    Needs evaluations at step 0 and at `until` (so the window is covered, not
    extrapolated); raises ValueError naming what is missing otherwise.
    """
    points = sorted((int(step), float(value)) for step, value in history.items() if int(step) <= until)
    steps = [step for step, _ in points]
    if until <= 0 or not steps or steps[0] != 0 or steps[-1] != until:
        raise ValueError(f"early_auc: needs evaluations at steps 0 and {until} (until > 0); got steps "
                         f"{sorted(int(step) for step in history)}; set evaluation.interval to a divisor of {until}")
    area = sum((b_step - a_step) * (a + b) / 2 for (a_step, a), (b_step, b) in zip(points, points[1:]))
    return area / until


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval
    (resampling the values with replacement). One value gives (v, v, v)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or not len(data) or not np.isfinite(data).all():
        raise ValueError(f"bootstrap_interval: needs one or more finite values, got {list(values)}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(data.mean()), float(low), float(high)


def paired_differences(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """a − b for every seed both arms finished (keys are seed names)."""
    return {seed: a[seed] - b[seed] for seed in a if seed in b and math.isfinite(a[seed] - b[seed])}
