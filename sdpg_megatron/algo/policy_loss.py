"""The clipped outcome term (docs/method.md, step 2): PPO/DAPO clip-higher with dual clip."""

from __future__ import annotations

from typing import NamedTuple

import torch


class OutcomeTerms(NamedTuple):
    loss: torch.Tensor  # [T] ℓ_out per token
    ratio: torch.Tensor  # [T] ρ, detached
    clipped_low: torch.Tensor  # [T] bool: the clip at 1 − ε_low was the active branch
    clipped_high: torch.Tensor  # [T] bool: the clip at 1 + ε_high was the active branch
    dual_clipped: torch.Tensor  # [T] bool: the dual clip −A·c was the active branch


def clipped_outcome_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float = 20.0,
) -> OutcomeTerms:
    """Per-token clipped policy-gradient loss.

    ρ = exp(clamp(log π_θ − log π_old, ±log_ratio_clamp));
    ℓ_clip = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high));
    for A < 0 with a dual clip c: ℓ_out = min(ℓ_clip, −A·c).
    On-policy (π_θ = π_old) the value is −A and the gradient is −A·∇log π_θ.

    Args:
        logprobs: [T] log π_θ(y_t), differentiable.
        old_logprobs: [T] log π_old(y_t) from the rollout policy.
        advantages: [T] per-token advantages (detached here).
    """
    advantages = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    clipped_low = clip_active & (ratio < 1.0 - clip_low)
    clipped_high = clip_active & (ratio > 1.0 + clip_high)
    if dual_clip is None:
        dual_clipped = torch.zeros_like(clip_active)
    else:
        dual_bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(dual_clipped, dual_bound, loss)
    return OutcomeTerms(loss, ratio.detach(), clipped_low, clipped_high, dual_clipped)
