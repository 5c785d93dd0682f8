"""Group-relative advantages (docs/method.md, step 1) and RLSD's per-token reweighting."""

from __future__ import annotations

import torch


def group_relative_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (R_i − mean_G R) / (std_G R + eps), one advantage per response.

    Args:
        rewards: [B·G] rewards ordered group by group (the G responses of prompt 0, then
            of prompt 1, ...).
        group_size: G.
        eps: ε_std.

    Returns:
        [B·G] advantages in the rewards' dtype. std is the sample standard deviation
        (Bessel-corrected, as verl and slime compute it). A group whose rewards are all
        equal — including any group of size 1 — gets exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}"
        )
    grouped = rewards.reshape(-1, group_size).to(torch.float64)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    advantages = centered / (std + eps)
    # All-equal group: centered is exactly 0 already, this also keeps it free of 0/0.
    advantages = torch.where(std > 0, advantages, torch.zeros_like(advantages))
    return advantages.reshape(-1).to(rewards.dtype)


def rlsd_lambda(step: int, *, lambda_base: float = 0.5, decay_steps: int = 50) -> float:
    """λ_k = λ_base · max(0, 1 − k / decay_steps) (RLSD's mixing weight at step k)."""
    return lambda_base * max(0.0, 1.0 - step / decay_steps)


def rlsd_token_advantages(
    advantages: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    *,
    mix: float,
    clip: float = 0.2,
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """RLSD: Â = A · [(1 − λ) + λ · clip(u, 1 − clip, 1 + clip)].

    u = exp(sign(A) · clamp(log q(y_t) − log π_old(y_t), ±log_ratio_clamp)).

    Args:
        advantages: [T] per-token advantages (A_i broadcast over response i).
        teacher_logprobs: [T] log q(y_t), the privileged-context view of the sampled token.
        old_logprobs: [T] log π_old(y_t).
        mix: λ_k (see `rlsd_lambda`).

    Returns:
        [T] reweighted advantages, detached (advantages carry no gradient).
    """
    log_ratio = (teacher_logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    u = torch.exp(torch.sign(advantages) * log_ratio)
    weight = (1.0 - mix) + mix * u.clamp(1.0 - clip, 1.0 + clip)
    return (advantages * weight).detach()


def opsd_token_advantages(
    advantages: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    *,
    max_weight: float = 20.0,
) -> torch.Tensor:
    """The authors' OPSD script: Â_t = 1[A > 0] · clamp(log q(y_t) − log π_old(y_t), 0, max_weight).

    q is the frozen π_ref reading the privileged view. The lower clamp at 0 keeps a
    student that overtakes its frozen teacher from pushing sampled tokens down; the gate
    distils only responses the verifier preferred.

    Args:
        advantages: [T] group-relative advantages (A_i broadcast over response i).
        teacher_logprobs: [T] log q(y_t).
        old_logprobs: [T] log π_old(y_t).

    Returns:
        [T] non-negative per-token advantages, detached.
    """
    weight = (teacher_logprobs - old_logprobs).detach().nan_to_num(0.0).clamp(0.0, max_weight)
    return (weight * (advantages.detach() > 0).to(weight.dtype)).detach()


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """[T] min(π_old(y_t) / π_engine(y_t), cap), detached: the token-level truncated
    importance-sampling correction for sampling from the engine rather than from the
    trainer's π_old (the two differ by numerics, or by a weight version off-policy)."""
    return torch.exp(old_logprobs.detach() - rollout_logprobs.detach()).clamp(max=cap)
