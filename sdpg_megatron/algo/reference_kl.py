"""The reference-policy anchor f_K (docs/method.md, step 6) and GRPO's k1 KL in the reward."""

from __future__ import annotations

import torch

ANCHORS = ("urkl", "ufkl", "fkl", "rkl")


def anchor_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token f_K(log w), log w = log π_θ(y_t) − log π_ref(y_t).

    - urkl: ½ (log w)²        — E∇ = ∇ unnormalised KL(π‖π_ref)   (k2)
    - ufkl: 1/w + log w       — E∇ = ∇ unnormalised KL(π_ref‖π)   (k3 + 1)
    - fkl:  1/w               — normalised forward KL
    - rkl:  ½ (log w + 1)²    — normalised reverse KL

    Args:
        logprobs: [T] differentiable log π_θ of the sampled tokens.
        ref_logprobs: [T] frozen reference log-probs (detached here).
    """
    log_w = logprobs - ref_logprobs.detach()
    if kind == "urkl":
        return 0.5 * log_w.square()
    if kind == "ufkl":
        return torch.exp(-log_w) + log_w
    if kind == "fkl":
        return torch.exp(-log_w)
    if kind == "rkl":
        return 0.5 * (log_w + 1.0).square()
    raise ValueError(f"anchor kind {kind!r} is unknown; choose one of {ANCHORS}")


def kl_penalized_rewards(
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
) -> torch.Tensor:
    """GRPO's k1 KL in the reward: R_i − coef · Σ_t (log π_old(y_t) − log π_ref(y_t)).

    Applied before the group-relative advantage, as verl's `use_kl_in_reward` does.

    Args:
        rewards: [B] verifier rewards.
        old_logprobs, ref_logprobs: [B, L] sampled-token log-probs, padded.
        mask: [B, L] 1 on response tokens.
    """
    k1 = (old_logprobs - ref_logprobs) * mask
    return rewards - coef * k1.sum(dim=-1).to(rewards.dtype)
