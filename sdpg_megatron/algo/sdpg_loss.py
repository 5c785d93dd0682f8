"""The SDPG objective for one mini-batch (docs/method.md, "Loss for rollout step k").

    L = (1 / Σ_i |y_i|) · Σ_{i,t} [ ℓ_out + β(k) · m_i · ℓ_OPD + α · f_K ]

Every baseline of docs/method.md's table is an `AlgorithmConfig` setting of this one function:
GRPO turns OPD and the anchor off (its KL lives in the reward, see
`kl_penalized_rewards`), RLSD reweights the per-token advantage with the teacher's view of
the sampled token, OPCD turns the outcome term off and the gate off.

All per-token tensors are flat [T] over the local micro-batch's token slots; the mask
zeroes prompt and padding slots. `num_tokens` is the normaliser Σ_i |y_i| over the whole
mini-batch (every data-parallel rank and micro-batch), passed in so the sum of the
returned losses over micro-batches and ranks is the token-mean of the paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sdpg_megatron.algo.advantages import (
    opsd_token_advantages, rlsd_lambda, rlsd_token_advantages, truncated_importance_weights,
)
from sdpg_megatron.algo.policy_loss import OutcomeTerms, clipped_outcome_loss
from sdpg_megatron.algo.reference_kl import anchor_penalty
from sdpg_megatron.algo.schedules import distill_weight
from sdpg_megatron.config import AlgorithmConfig


def current_beta(config: AlgorithmConfig, step: int, total_steps: int) -> float:
    """β(k) for this config: the warmup–decay schedule or a constant β_base."""
    if config.beta_schedule == "constant":
        return config.beta_base
    return distill_weight(
        step, total_steps, config.beta_base, config.beta_warmup_steps, config.beta_decay_steps
    )


def teacher_sample_mask(config: AlgorithmConfig, advantages: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
    """[samples] bool: the samples whose tokens the loss needs the teacher for at step k.

    The teacher enters the loss through β(k) · m_i · KL(p ‖ SG q) alone, unless RLSD
    reweights every token's advantage by log q(y_t). So with `teacher_scope="needed"`: every
    sample for RLSD; none while β(k) = 0; with the positive-advantage gate, the samples with
    A_i > 0. Skipping the rest changes neither the loss nor its gradient, only which
    tokens opd_kl averages over. `teacher_scope="all"` keeps every sample."""
    everyone = torch.ones(advantages.shape, dtype=torch.bool)
    if not config.uses_teacher:
        return ~everyone
    if config.teacher_scope == "all" or config.advantage_reweighting != "none":
        return everyone
    if current_beta(config, step, total_steps) <= 0:
        return ~everyone
    if config.gate == "positive_advantage":
        return advantages.detach().cpu() > 0
    return everyone


class TokenTerms(NamedTuple):
    """The per-token pieces of the objective (before the mask and the normaliser)."""

    per_token: torch.Tensor  # [T] ℓ_out + β(k)·m_i·ℓ_OPD + α·f_K, differentiable
    outcome: OutcomeTerms | None  # the clipped outcome term, when on
    beta: float  # β(k)
    gate: torch.Tensor | None  # [T] m_i, when β(k) > 0
    penalty: torch.Tensor | None  # [T] f_K(log w), when the anchor is on
    tis_weight: torch.Tensor | None = None  # [T] min(π_old/π_engine, C), when tis_cap is set
    # [T] each term's differentiable share of per_token, for the terms that are on: "outcome"
    # (ℓ_out with its TIS and gate scaling), "opd" (β·m_i·ℓ_OPD), "anchor" (α·f_K), "entropy"
    parts: dict[str, torch.Tensor] | None = None


def token_terms(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    step: int,
    total_steps: int,
    config: AlgorithmConfig,
    reverse_kl: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    gated_token_scale: float = 1.0,
) -> TokenTerms:
    """Each token's term of the SDPG objective, a function of that token's statistics alone
    (so the loss is token-separable: `vocab_parallel_token_loss` may take it chunk by
    chunk). Arguments as in `sdpg_loss`."""
    parts: dict[str, torch.Tensor] = {}
    outcome = None
    tis_weight = None
    # loss_tokens="gated": the gated terms are means over the gated samples' tokens; the
    # caller's normaliser counts every token, so they are scaled by (all / gated) tokens.
    positive = (advantages.detach() > 0).to(logprobs.dtype)
    gated_scale = positive * gated_token_scale if config.loss_tokens == "gated" else None
    if config.use_outcome:
        token_advantages = advantages.detach()
        if config.advantage_reweighting == "opsd":
            if teacher_logprobs is None:
                raise ValueError("teacher_logprobs is required for OPSD's teacher-weighted advantages")
            token_advantages = opsd_token_advantages(token_advantages, teacher_logprobs, old_logprobs,
                                                     max_weight=config.log_ratio_clamp)
        elif config.advantage_reweighting == "rlsd":
            if teacher_logprobs is None:
                raise ValueError("teacher_logprobs is required for RLSD advantage reweighting")
            mix = rlsd_lambda(
                step, lambda_base=config.rlsd_lambda_base, decay_steps=config.rlsd_lambda_steps
            )
            token_advantages = rlsd_token_advantages(
                token_advantages, teacher_logprobs, old_logprobs,
                mix=mix, clip=config.rlsd_clip, log_ratio_clamp=config.log_ratio_clamp,
            )
        outcome = clipped_outcome_loss(
            logprobs, old_logprobs, token_advantages,
            clip_low=config.clip_low, clip_high=config.clip_high,
            dual_clip=config.dual_clip, log_ratio_clamp=config.log_ratio_clamp,
        )
        outcome_loss = outcome.loss
        if config.tis_cap is not None:
            if rollout_logprobs is None:
                raise ValueError("rollout_logprobs (the engine's) are required by algorithm.tis_cap")
            tis_weight = truncated_importance_weights(old_logprobs, rollout_logprobs, config.tis_cap)
            outcome_loss = outcome_loss * tis_weight
        if gated_scale is not None:
            outcome_loss = outcome_loss * gated_scale
        parts["outcome"] = outcome_loss

    beta = current_beta(config, step, total_steps)
    gate = None
    if beta > 0:
        if reverse_kl is None:
            raise ValueError(f"reverse_kl is required: β(k={step}) = {beta:g} > 0")
        gate = positive if config.gate == "positive_advantage" else torch.ones_like(logprobs)
        # the authors' code clamps each token's KL (no gradient above the clamp)
        kl = reverse_kl if config.opd_kl_clamp is None else reverse_kl.clamp(max=config.opd_kl_clamp)
        parts["opd"] = beta * (gate if gated_scale is None else gated_scale) * kl

    penalty = None
    if config.anchor != "none" and config.alpha > 0:
        if ref_logprobs is None:
            raise ValueError(f"ref_logprobs is required by the {config.anchor} anchor")
        penalty = anchor_penalty(logprobs, ref_logprobs, config.anchor)
        parts["anchor"] = config.alpha * penalty
    if config.entropy_coef > 0:
        if entropy is None:
            raise ValueError(f"entropy is required by the entropy bonus (algorithm.entropy_coef={config.entropy_coef})")
        parts["entropy"] = -config.entropy_coef * entropy
    per_token = torch.zeros_like(logprobs)
    for part in parts.values():
        per_token = per_token + part
    return TokenTerms(per_token, outcome, beta, gate, penalty, tis_weight, parts)


def sdpg_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    step: int,
    total_steps: int,
    config: AlgorithmConfig,
    reverse_kl: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_tokens: torch.Tensor | float | None = None,
    reverse_kl_mask: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    gated_token_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDPG loss and detached metrics.

    Args:
        logprobs: [T] log π_θ(y_t), differentiable.
        old_logprobs: [T] log π_old(y_t): the trainer's recomputation before the step's
            updates, or the engine's sampling log-probs (algorithm.old_logprobs).
        advantages: [T] per-token advantage (A_i broadcast over response i).
        mask: [T] 1 for response tokens, 0 for prompt/padding slots.
        step: rollout step k (1-based); total_steps: T.
        config: the algorithm section (a preset or a custom setting).
        reverse_kl: [T] exact full-vocabulary KL(p ‖ SG q), differentiable in p; required
            when β(k) > 0.
        ref_logprobs: [T] log π_ref(y_t); required when the anchor is on.
        teacher_logprobs: [T] log q(y_t); required for RLSD reweighting.
        entropy: [T] per-token entropy H(p), differentiable; reported, and in the loss
            when algorithm.entropy_coef > 0.
        num_tokens: Σ_i |y_i| over the whole mini-batch; defaults to mask.sum().
        reverse_kl_mask: [T] bool, the tokens whose reverse_kl was computed when the teacher
            ran for some samples only (`teacher_sample_mask`; the others hold zeros and are
            gated off). opd_kl is then the mean over these; None: every token.
        rollout_logprobs: [T] the engine's sampling log-probs, for algorithm.tis_cap.
        gated_token_scale: (all tokens) / (gated tokens) of the mini-batch, for
            algorithm.loss_tokens="gated".

    Returns:
        (loss, metrics): scalar loss already divided by num_tokens; metrics are detached
        token-means over this micro-batch's mask (and β, which is a plain value).
    """
    mask = mask.to(logprobs.dtype)
    if num_tokens is None:
        num_tokens = mask.sum()
    terms = token_terms(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, step=step, total_steps=total_steps,
        config=config, reverse_kl=reverse_kl, ref_logprobs=ref_logprobs, teacher_logprobs=teacher_logprobs,
        entropy=entropy, rollout_logprobs=rollout_logprobs, gated_token_scale=gated_token_scale,
    )
    sums = metric_sums(terms, logprobs=logprobs, mask=mask, reverse_kl=reverse_kl, reverse_kl_mask=reverse_kl_mask,
                       ref_logprobs=ref_logprobs, entropy=entropy)
    tokens = mask.sum()
    metrics = {key: (value / sums.get(f"{key}/tokens", tokens).clamp_min(1.0)).detach()
               for key, value in sums.items() if not key.endswith("/tokens")}
    metrics["beta"] = torch.tensor(terms.beta, dtype=torch.float64)
    loss = (terms.per_token * mask).sum() / num_tokens
    metrics["loss"] = loss.detach()
    return loss, metrics


def metric_sums(
    terms: TokenTerms,
    *,
    logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    reverse_kl: torch.Tensor | None = None,
    reverse_kl_mask: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The objective's metrics as detached token sums over `mask` (None: every token),
    from the same `TokenTerms` the loss is made of: Σ_t value_t · mask_t per metric, and
    "opd_kl/tokens", the count opd_kl is a mean over (the tokens whose reverse_kl was
    computed: `reverse_kl_mask`). Every other metric is a mean over mask.sum() tokens.
    Sums over chunks, micro-batches and ranks add up to the sums of the whole."""

    def total(values: torch.Tensor, over: torch.Tensor | None = mask) -> torch.Tensor:
        values = values.detach().to(logprobs.dtype)
        return values.sum() if over is None else (values * over).sum()

    sums: dict[str, torch.Tensor] = {}
    if terms.tis_weight is not None:
        sums["tis_weight"] = total(terms.tis_weight)
    if terms.outcome is not None:
        outcome = terms.outcome
        sums["outcome_loss"] = total(outcome.loss)
        sums["ratio_mean"] = total(outcome.ratio)
        sums["clip_frac_low"] = total(outcome.clipped_low)
        sums["clip_frac_high"] = total(outcome.clipped_high)
        sums["dual_clip_frac"] = total(outcome.dual_clipped)
    if reverse_kl is not None:
        computed = mask
        if reverse_kl_mask is not None:
            computed = reverse_kl_mask.to(logprobs.dtype) if mask is None else mask * reverse_kl_mask.to(mask.dtype)
        sums["opd_kl"] = total(reverse_kl, computed)
        sums["opd_kl/tokens"] = torch.tensor(float(reverse_kl.numel()), dtype=logprobs.dtype,
                                             device=logprobs.device) if computed is None else computed.sum()
    if terms.gate is not None:
        sums["gate_frac"] = total(terms.gate)
    if terms.penalty is not None:
        sums["anchor"] = total(terms.penalty)
    if ref_logprobs is not None:
        # k3 estimate of KL(π_θ ‖ π_ref) on sampled tokens, for monitoring.
        log_w = (logprobs - ref_logprobs).detach()
        sums["ref_kl_k3"] = total(torch.exp(-log_w) - 1.0 + log_w)
    if entropy is not None:
        sums["entropy"] = total(entropy)
    return sums
