"""One typed configuration tree for the recipe.

Every method in METHOD.md's baseline table is a *setting* of one loss: the presets below
are functions that return an `AlgorithmConfig`, never separate code paths. `validate()`
is the one place that checks a config and raises `ValueError` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

AnchorKind = Literal["none", "urkl", "ufkl", "fkl", "rkl"]
GateKind = Literal["none", "positive_advantage"]
BetaSchedule = Literal["warmup_decay", "constant"]
AdvantageReweighting = Literal["none", "rlsd"]


@dataclass(kw_only=True)
class AlgorithmConfig:
    """The SDPG loss and its baselines (METHOD.md, "Loss" and "Baselines")."""

    name: str = "sdpg-urkl"
    # Group-relative advantage.
    group_size: int = 8
    advantage_eps: float = 1e-6
    # Outcome (clipped policy-gradient) term.
    use_outcome: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0  # None disables the dual clip for A < 0
    log_ratio_clamp: float = 20.0
    # On-policy distillation (exact full-vocabulary reverse KL to the detached teacher).
    beta_base: float = 1e-3
    beta_schedule: BetaSchedule = "warmup_decay"
    beta_warmup_steps: int = 50
    beta_decay_steps: int = 350
    gate: GateKind = "positive_advantage"
    # Reference-policy anchor on sampled tokens.
    anchor: AnchorKind = "urkl"
    alpha: float = 1e-3
    # k1 KL penalty folded into the reward (GRPO baseline); 0 disables it.
    kl_in_reward_coef: float = 0.0
    # RLSD per-token advantage reweighting by the teacher/old-policy ratio.
    advantage_reweighting: AdvantageReweighting = "none"
    rlsd_lambda_base: float = 0.5
    rlsd_lambda_steps: int = 50
    rlsd_clip: float = 0.2

    @property
    def uses_teacher(self) -> bool:
        """Whether a teacher forward (privileged context) is needed at all."""
        return self.beta_base > 0 or self.advantage_reweighting == "rlsd"

    @property
    def uses_reference(self) -> bool:
        """Whether the frozen reference policy is needed at all."""
        return (self.anchor != "none" and self.alpha > 0) or self.kl_in_reward_coef > 0


@dataclass(kw_only=True)
class ScheduleConfig:
    total_steps: int = 400


@dataclass(kw_only=True)
class Config:
    """Root of the tree. Later sections (model, parallel, rollout, ...) join here."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# --------------------------------------------------------------------------- presets


def sdpg_urkl() -> AlgorithmConfig:
    """SDPG with the URKL anchor f_K = ½(log w)² — the method."""
    return AlgorithmConfig(name="sdpg-urkl", anchor="urkl")


def sdpg_ufkl() -> AlgorithmConfig:
    """SDPG with the UFKL anchor f_K = 1/w + log w."""
    return AlgorithmConfig(name="sdpg-ufkl", anchor="ufkl")


def grpo() -> AlgorithmConfig:
    """GRPO: outcome term only, symmetric clip, no dual clip, k1 KL in the reward."""
    return AlgorithmConfig(
        name="grpo", clip_low=0.2, clip_high=0.2, dual_clip=None,
        beta_base=0.0, gate="none", anchor="none", alpha=0.0, kl_in_reward_coef=1e-3,
    )


def rlsd() -> AlgorithmConfig:
    """RLSD: outcome term with teacher-reweighted per-token advantages, dual clip c = 3."""
    return AlgorithmConfig(
        name="rlsd", dual_clip=3.0, beta_base=0.0, gate="none", anchor="none", alpha=0.0,
        advantage_reweighting="rlsd",
    )


def opcd() -> AlgorithmConfig:
    """OPCD: pure self-distillation, reverse KL on every rollout with a constant weight.

    With no outcome and no anchor the weight only scales the loss; 1.0 makes the loss the
    plain token-mean reverse KL.
    """
    return AlgorithmConfig(
        name="opcd", use_outcome=False, beta_base=1.0, beta_schedule="constant",
        gate="none", anchor="none", alpha=0.0,
    )


def ablation_beta0() -> AlgorithmConfig:
    """SDPG-URKL without the distillation term."""
    return AlgorithmConfig(name="ablation-beta0", beta_base=0.0, gate="none", anchor="urkl")


def ablation_alpha0() -> AlgorithmConfig:
    """SDPG without the reference anchor."""
    return AlgorithmConfig(name="ablation-alpha0", anchor="none", alpha=0.0)


ALGORITHM_PRESETS: dict[str, Callable[[], AlgorithmConfig]] = {
    "sdpg-urkl": sdpg_urkl,
    "sdpg-ufkl": sdpg_ufkl,
    "grpo": grpo,
    "rlsd": rlsd,
    "opcd": opcd,
    "ablation-beta0": ablation_beta0,
    "ablation-alpha0": ablation_alpha0,
}


def algorithm_preset(name: str) -> AlgorithmConfig:
    """Look a preset up by name (case-insensitive, '_' and '-' equivalent)."""
    key = name.lower().replace("_", "-")
    if key not in ALGORITHM_PRESETS:
        raise ValueError(
            f"algorithm preset {name!r} is unknown; choose one of {sorted(ALGORITHM_PRESETS)}"
        )
    return validate(ALGORITHM_PRESETS[key]())


# --------------------------------------------------------------------------- validation


def validate(config):
    """Check a config (or one section) and return it; raise ValueError naming the field."""
    if isinstance(config, Config):
        validate(config.algorithm)
        validate(config.schedule)
    elif isinstance(config, AlgorithmConfig):
        _validate_algorithm(config)
    elif isinstance(config, ScheduleConfig):
        _require(config.total_steps >= 1, "schedule.total_steps", "must be >= 1")
    else:
        raise TypeError(f"cannot validate {type(config).__name__}")
    return config


def _require(condition: bool, field_name: str, fix: str) -> None:
    if not condition:
        raise ValueError(f"config field {field_name}: {fix}")


def _validate_algorithm(c: AlgorithmConfig) -> None:
    p = "algorithm."
    _require(c.group_size >= 1, p + "group_size", f"must be >= 1, got {c.group_size}")
    _require(c.advantage_eps > 0, p + "advantage_eps", "must be > 0")
    _require(0 <= c.clip_low < 1, p + "clip_low", f"must be in [0, 1), got {c.clip_low}")
    _require(c.clip_high >= 0, p + "clip_high", f"must be >= 0, got {c.clip_high}")
    _require(
        c.dual_clip is None or c.dual_clip > 1, p + "dual_clip",
        f"must be > 1 or None (disabled), got {c.dual_clip}",
    )
    _require(c.log_ratio_clamp > 0, p + "log_ratio_clamp", "must be > 0")
    _require(c.beta_base >= 0, p + "beta_base", f"must be >= 0, got {c.beta_base}")
    _require(
        c.beta_schedule in ("warmup_decay", "constant"), p + "beta_schedule",
        f"must be 'warmup_decay' or 'constant', got {c.beta_schedule!r}",
    )
    _require(c.beta_warmup_steps >= 0, p + "beta_warmup_steps", "must be >= 0")
    _require(c.beta_decay_steps >= 0, p + "beta_decay_steps", "must be >= 0")
    _require(
        c.gate in ("none", "positive_advantage"), p + "gate",
        f"must be 'none' or 'positive_advantage', got {c.gate!r}",
    )
    _require(
        c.anchor in ("none", "urkl", "ufkl", "fkl", "rkl"), p + "anchor",
        f"must be one of none/urkl/ufkl/fkl/rkl, got {c.anchor!r}",
    )
    _require(c.alpha >= 0, p + "alpha", f"must be >= 0, got {c.alpha}")
    _require(c.kl_in_reward_coef >= 0, p + "kl_in_reward_coef", "must be >= 0")
    _require(
        c.advantage_reweighting in ("none", "rlsd"), p + "advantage_reweighting",
        f"must be 'none' or 'rlsd', got {c.advantage_reweighting!r}",
    )
    _require(0 <= c.rlsd_lambda_base <= 1, p + "rlsd_lambda_base", "must be in [0, 1]")
    _require(c.rlsd_lambda_steps >= 1, p + "rlsd_lambda_steps", "must be >= 1")
    _require(0 <= c.rlsd_clip < 1, p + "rlsd_clip", "must be in [0, 1)")
    _require(
        c.use_outcome or c.beta_base > 0 or (c.anchor != "none" and c.alpha > 0),
        p + "use_outcome",
        "the loss has no term: enable use_outcome, set beta_base > 0 or choose an anchor with alpha > 0",
    )

