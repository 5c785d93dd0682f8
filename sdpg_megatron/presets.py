"""The presets: every method of docs/method.md's baseline table as a function returning an
`AlgorithmConfig` (a setting of the one loss, never a code path of its own), and what a
preset sets outside the algorithm section, as the authors' script for it does.
"""

from __future__ import annotations

from typing import Callable

from sdpg_megatron.config import AlgorithmConfig, Config, apply_overrides, validate


def sdpg_urkl() -> AlgorithmConfig:
    """SDPG with the URKL anchor f_K = ½(log w)² — the method (paper §4.1; the per-token KL
    clamp at 20 nats is the authors' code)."""
    return AlgorithmConfig(name="sdpg-urkl", anchor="urkl", opd_kl_clamp=20.0)


def sdpg_ufkl() -> AlgorithmConfig:
    """SDPG with the UFKL anchor f_K = 1/w + log w."""
    return AlgorithmConfig(name="sdpg-ufkl", anchor="ufkl", opd_kl_clamp=20.0)


def grpo() -> AlgorithmConfig:
    """GRPO: outcome term only, symmetric clip, no dual clip, k1 KL in the reward."""
    return AlgorithmConfig(
        name="grpo", clip_low=0.2, clip_high=0.2, dual_clip=None,
        beta_base=0.0, gate="none", anchor="none", alpha=0.0, kl_in_reward_coef=1e-3,
    )


def rlsd() -> AlgorithmConfig:
    """RLSD as the authors ran it: outcome term with teacher-reweighted per-token
    advantages, clip (0.2, 0.2), dual clip c = 3 (the run preset also turns the overlong
    penalty off: `PRESET_RUN_SETTINGS`)."""
    return AlgorithmConfig(
        name="rlsd", clip_high=0.2, dual_clip=3.0, beta_base=0.0, gate="none", anchor="none", alpha=0.0,
        advantage_reweighting="rlsd",
    )


def opsd() -> AlgorithmConfig:
    """The authors' only pure-distillation script (Qwen3-1.7B OPSD), not the paper's OPCD:
    the frozen π_ref reads the privileged view; each token of a sample with A > 0 gets the
    advantage clamp(log q_ref(y_t) − log π_old(y_t), 0, 20) in PPO-clipped form (0.2, 0.2),
    averaged over those tokens; entropy bonus 0.01 (lr 5e-6 and no overlong penalty come
    with the run preset: `PRESET_RUN_SETTINGS`)."""
    return AlgorithmConfig(
        name="opsd", clip_high=0.2, dual_clip=None, beta_base=0.0, gate="positive_advantage", anchor="none",
        alpha=0.0, advantage_reweighting="opsd", teacher_weights="reference", loss_tokens="gated",
        entropy_coef=0.01,
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
    return AlgorithmConfig(name="ablation-alpha0", anchor="none", alpha=0.0, opd_kl_clamp=20.0)


ALGORITHM_PRESETS: dict[str, Callable[[], AlgorithmConfig]] = {
    "sdpg-urkl": sdpg_urkl,
    "sdpg-ufkl": sdpg_ufkl,
    "grpo": grpo,
    "rlsd": rlsd,
    "opcd": opcd,
    "opsd": opsd,
    "ablation-beta0": ablation_beta0,
    "ablation-alpha0": ablation_alpha0,
}

# What a preset changes outside the algorithm section, as the authors' script for it does
# (applied by `apply_preset` before the command line's own --set overrides).
PRESET_RUN_SETTINGS: dict[str, tuple[str, ...]] = {
    "rlsd": ("reward.overlong_buffer=none",),  # run_qwen3_4b_rlsd_boxed.sh
    "opsd": ("reward.overlong_buffer=none", "optimizer.lr=5e-6"),  # run_qwen3_1.7b_opsd.sh
}


def apply_preset(config: Config, name: str) -> Config:
    """Set `config.algorithm` to the preset `name` and apply its run settings."""
    config.algorithm = algorithm_preset(name)
    return apply_overrides(config, list(PRESET_RUN_SETTINGS.get(config.algorithm.name, ())))


def algorithm_preset(name: str) -> AlgorithmConfig:
    """Look a preset up by name (case-insensitive, '_' and '-' equivalent)."""
    key = name.lower().replace("_", "-")
    if key not in ALGORITHM_PRESETS:
        raise ValueError(
            f"algorithm preset {name!r} is unknown; choose one of {sorted(ALGORITHM_PRESETS)}"
        )
    return validate(ALGORITHM_PRESETS[key]())
