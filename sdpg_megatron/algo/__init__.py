"""Pure torch SDPG math: no Megatron, Ray or vLLM imports here."""

from sdpg_megatron.algo.advantages import (
    group_relative_advantages,
    opsd_token_advantages,
    rlsd_lambda,
    rlsd_token_advantages,
    truncated_importance_weights,
)
from sdpg_megatron.algo.policy_loss import OutcomeTerms, clipped_outcome_loss
from sdpg_megatron.algo.reference_kl import ANCHORS, anchor_penalty, kl_penalized_rewards
from sdpg_megatron.algo.schedules import distill_weight
from sdpg_megatron.algo.sdpg_loss import (
    TokenTerms, current_beta, metric_sums, sdpg_loss, teacher_sample_mask, token_terms,
)

__all__ = [
    "ANCHORS",
    "OutcomeTerms",
    "TokenTerms",
    "anchor_penalty",
    "clipped_outcome_loss",
    "current_beta",
    "distill_weight",
    "group_relative_advantages",
    "kl_penalized_rewards",
    "metric_sums",
    "opsd_token_advantages",
    "rlsd_lambda",
    "rlsd_token_advantages",
    "sdpg_loss",
    "teacher_sample_mask",
    "token_terms",
    "truncated_importance_weights",
]
