"""Verifier rewards: boxed-answer extraction, math-verify in worker processes, and the
overlong penalty. No torch here; `score_responses` returns plain Python lists."""

from sdpg_megatron.reward.boxed import extract_boxed, normalize_answer, overlong_penalty
from sdpg_megatron.reward.verifier import (
    VERDICT_STATUSES,
    RewardBatch,
    Verdict,
    VerifierPool,
    score_responses,
    verify_with_math_verify,
)

__all__ = [
    "VERDICT_STATUSES",
    "RewardBatch",
    "Verdict",
    "VerifierPool",
    "extract_boxed",
    "normalize_answer",
    "overlong_penalty",
    "score_responses",
    "verify_with_math_verify",
]
