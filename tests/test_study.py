"""sdpg_megatron.study against naive references."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sdpg_megatron.study import bootstrap_interval, early_auc, paired_differences


def test_early_auc_is_the_mean_height_of_the_linear_interpolation():
    history = {0: 0.1, 2: 0.3, 4: 0.2, 6: 0.5, 8: 0.9}
    fine = np.linspace(0, 4, 400_001)  # the curve sampled densely up to until=4, then averaged
    expected = np.interp(fine, [0, 2, 4], [0.1, 0.3, 0.2]).mean()
    assert early_auc(history, 4) == pytest.approx(expected, abs=1e-6)
    assert early_auc({0: 0.25, 10: 0.25}, 10) == pytest.approx(0.25)
    assert early_auc({"0": 0.0, "5": 1.0}, 5) == pytest.approx(0.5)  # JSON keys are strings


def test_early_auc_refuses_a_window_it_would_extrapolate():
    with pytest.raises(ValueError, match="steps 0 and 5"):
        early_auc({0: 0.1, 4: 0.2, 8: 0.3}, 5)
    with pytest.raises(ValueError, match="steps 0 and 4"):
        early_auc({2: 0.1, 4: 0.2}, 4)


def test_bootstrap_interval_matches_a_plain_resampling_loop():
    values = [0.12, 0.18, 0.15, 0.31, 0.09]
    mean, low, high = bootstrap_interval(values, resamples=20_000, seed=1)
    rng = random.Random(3)
    naive = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(20_000))
    assert mean == pytest.approx(np.mean(values))
    assert low == pytest.approx(naive[int(0.025 * len(naive))], abs=0.006)
    assert high == pytest.approx(naive[int(0.975 * len(naive))], abs=0.006)
    assert low < mean < high
    assert bootstrap_interval([0.4]) == (0.4, 0.4, 0.4)
    with pytest.raises(ValueError, match="finite values"):
        bootstrap_interval([0.1, float("nan")])


def test_paired_differences_pair_by_seed_and_skip_unfinished_seeds():
    a = {"seed0": 0.3, "seed1": 0.5, "seed2": 0.2}
    b = {"seed0": 0.1, "seed2": 0.4, "seed3": 0.9}
    assert paired_differences(a, b) == pytest.approx({"seed0": 0.2, "seed2": -0.2})
