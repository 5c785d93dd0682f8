"""The warmup–decay distillation weight β(k) (docs/method.md, step 5)."""

from __future__ import annotations


def distill_weight(
    step: int, total_steps: int, beta_base: float, warmup_steps: int, decay_steps: int
) -> float:
    """β(k) = β_base · min(1, k / T_warm) · min(1, (T − k) / T_decay).

    A factor whose T_warm or T_decay is 0 is taken as 1. Steps are 1-based (k = 1..T);
    past T the weight is 0, never negative.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(
            f"warmup_steps and decay_steps must be >= 0, got {warmup_steps}, {decay_steps}"
        )
    warm = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    decay = 1.0 if decay_steps == 0 else min(1.0, (total_steps - step) / decay_steps)
    return beta_base * max(0.0, warm) * max(0.0, decay)
