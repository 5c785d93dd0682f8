"""Verifier rewards: the answer region and its last box, the guard against answers too
costly to verify, math-verify in worker processes, and the overlong penalty. No torch
here; `score_responses` returns plain Python lists."""

from sdpg_megatron.reward.boxed import (
    DEFAULT_ANSWER_TAIL_CHARS,
    THINK_END,
    answer_region,
    extract_boxed,
    normalize_answer,
    overlong_penalty,
)
from sdpg_megatron.reward.guard import answer_too_complex
from sdpg_megatron.reward.verifier import (
    REWARD_SCHEMES,
    VERDICT_STATUSES,
    RewardBatch,
    Verdict,
    VerifierPool,
    score_responses,
    verify_with_math_verify,
)

__all__ = [
    "DEFAULT_ANSWER_TAIL_CHARS",
    "REWARD_SCHEMES",
    "THINK_END",
    "VERDICT_STATUSES",
    "RewardBatch",
    "Verdict",
    "VerifierPool",
    "answer_region",
    "answer_too_complex",
    "extract_boxed",
    "normalize_answer",
    "overlong_penalty",
    "score_responses",
    "verify_with_math_verify",
]
