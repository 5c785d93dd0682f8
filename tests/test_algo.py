"""The SDPG math (docs/method.md) against hand-computed values and naive per-token formulas."""

from __future__ import annotations

import math

import pytest
import torch

from sdpg_megatron import config as cfg
from sdpg_megatron import presets
from sdpg_megatron.algo import (
    anchor_penalty,
    clipped_outcome_loss,
    distill_weight,
    group_relative_advantages,
    kl_penalized_rewards,
    rlsd_lambda,
    rlsd_token_advantages,
    sdpg_loss,
    teacher_sample_mask,
)

# --------------------------------------------------------------------------- advantages


def test_group_relative_advantage_hand_computed():
    # Group [1, 0, 0, 0]: mean 0.25, sample std 0.5 → A = [1.5, −0.5, −0.5, −0.5].
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    advantages = group_relative_advantages(rewards, group_size=4, eps=0.0)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, -1.0, 1.0, 1.0, -1.0]) * torch.tensor(
        [1, 1, 1, 1, 1 / math.sqrt(4 / 3), 1 / math.sqrt(4 / 3), 1 / math.sqrt(4 / 3), 1 / math.sqrt(4 / 3)]
    )
    torch.testing.assert_close(advantages, expected)


def test_group_relative_advantage_eps_in_denominator():
    advantages = group_relative_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=0.5)
    std = math.sqrt(0.5)
    torch.testing.assert_close(advantages, torch.tensor([0.5 / (std + 0.5), -0.5 / (std + 0.5)]))


@pytest.mark.parametrize("rewards, group_size", [([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 3), ([1.0, 0.0], 1)])
def test_all_equal_group_gets_zero_advantage(rewards, group_size):
    advantages = group_relative_advantages(torch.tensor(rewards), group_size)
    assert torch.equal(advantages, torch.zeros(len(rewards)))


def test_group_relative_advantage_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(torch.ones(7), group_size=4)
    with pytest.raises(ValueError, match="1-D"):
        group_relative_advantages(torch.ones(2, 4), group_size=4)


# --------------------------------------------------------------------------- β(k)


@pytest.mark.parametrize(
    "step, expected",
    [(1, 1 / 50), (25, 0.5), (50, 1.0), (51, 349 / 350), (100, 300 / 350), (399, 1 / 350), (400, 0.0), (450, 0.0)],
)
def test_distill_weight_warmup_decay(step, expected):
    assert distill_weight(step, 400, 1e-3, 50, 350) == pytest.approx(1e-3 * expected)


def test_distill_weight_zero_lengths_mean_one():
    assert distill_weight(3, 10, 2.0, 0, 0) == 2.0
    assert distill_weight(3, 10, 2.0, 6, 0) == pytest.approx(1.0)
    assert distill_weight(9, 10, 2.0, 0, 4) == pytest.approx(0.5)


# --------------------------------------------------------------------------- outcome term


def _outcome(ratio, advantage, dual_clip=10.0):
    logprobs = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    terms = clipped_outcome_loss(
        logprobs, torch.zeros(1, dtype=torch.float64), torch.tensor([advantage], dtype=torch.float64),
        clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
    )
    terms.loss.sum().backward()
    return terms, logprobs.grad.item()


@pytest.mark.parametrize(
    "ratio, advantage, value, grad, flag",
    [
        (1.0, 2.0, -2.0, -2.0, None),  # on-policy: −A, gradient −A∇log π
        (1.5, 1.0, -1.28, 0.0, "clipped_high"),  # A > 0 above 1 + ε_high: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5, None),  # A > 0 below 1 − ε_low: unclipped branch
        (0.5, -1.0, 0.8, 0.0, "clipped_low"),  # A < 0 below 1 − ε_low: clipped
        (1.5, -1.0, 1.5, 1.5, None),  # A < 0 above 1 + ε_high: unclipped (pessimistic)
        (20.0, -1.0, 10.0, 0.0, "dual_clipped"),  # dual clip −A·c caps it
    ],
)
def test_clipped_outcome_hand_computed(ratio, advantage, value, grad, flag):
    terms, gradient = _outcome(ratio, advantage)
    assert terms.loss.item() == pytest.approx(value)
    assert gradient == pytest.approx(grad)
    for name in ("clipped_low", "clipped_high", "dual_clipped"):
        assert bool(getattr(terms, name).item()) == (name == flag), name


def test_no_dual_clip_when_disabled():
    terms, _ = _outcome(20.0, -1.0, dual_clip=None)
    assert terms.loss.item() == pytest.approx(20.0)


def test_log_ratio_is_clamped():
    terms = clipped_outcome_loss(
        torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([-1.0]),
        clip_low=0.2, clip_high=0.28, dual_clip=None,
    )
    assert terms.ratio.item() == pytest.approx(math.exp(20.0))


# --------------------------------------------------------------------------- anchors


@pytest.mark.parametrize(
    "kind, formula",
    [
        ("urkl", lambda lw: 0.5 * lw**2),
        ("ufkl", lambda lw: math.exp(-lw) + lw),
        ("fkl", lambda lw: math.exp(-lw)),
        ("rkl", lambda lw: 0.5 * (lw + 1) ** 2),
    ],
)
def test_anchor_values(kind, formula):
    log_w = [-1.0, 0.0, 0.3, 2.0]
    values = anchor_penalty(torch.tensor(log_w, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), kind)
    assert values.tolist() == pytest.approx([formula(x) for x in log_w])


@pytest.mark.parametrize("kind", ["urkl", "ufkl"])
def test_anchor_expected_gradient_is_kl_gradient(kind):
    """E_{y∼π}[∇f_K] equals ∇KL(π‖π_ref) for URKL and ∇KL(π_ref‖π) for UFKL (exact sum)."""
    torch.manual_seed(0)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(7, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    expected_penalty = (logp.exp().detach() * anchor_penalty(logp, ref_logp, kind)).sum()
    (surrogate_grad,) = torch.autograd.grad(expected_penalty, theta, retain_graph=True)
    p, p_ref = logp.exp(), ref_logp.exp()
    kl = (p * (logp - ref_logp)).sum() if kind == "urkl" else (p_ref * (ref_logp - logp)).sum()
    (kl_grad,) = torch.autograd.grad(kl, theta)
    torch.testing.assert_close(surrogate_grad, kl_grad)


def test_anchor_unknown_kind():
    with pytest.raises(ValueError, match="anchor kind"):
        anchor_penalty(torch.zeros(1), torch.zeros(1), "k9")


def test_kl_in_reward_is_k1_sum():
    rewards = torch.tensor([1.0, 0.0])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    shaped = kl_penalized_rewards(rewards, old, ref, mask, coef=0.1)
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.1 * 0.5, 0.0 - 0.1 * 3.0]))


# --------------------------------------------------------------------------- RLSD


def test_rlsd_lambda_schedule():
    assert [rlsd_lambda(k) for k in (0, 25, 50, 80)] == pytest.approx([0.5, 0.25, 0.0, 0.0])


def test_rlsd_token_advantages_hand_computed():
    advantages = torch.tensor([2.0, -1.0, 1.0])
    teacher = torch.tensor([math.log(1.5), math.log(1.5), math.log(1.1)])
    old = torch.zeros(3)
    weighted = rlsd_token_advantages(advantages, teacher, old, mix=0.5, clip=0.2)
    # u = 1.5 → 1.2; u = 1/1.5 → 0.8; u = 1.1 stays.
    expected = [2.0 * (0.5 + 0.5 * 1.2), -1.0 * (0.5 + 0.5 * 0.8), 1.0 * (0.5 + 0.5 * 1.1)]
    assert weighted.tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------- Prop. 3.1


def test_prop_3_1_reverse_kl_gradient_is_centred_log_ratio_policy_gradient():
    """∇KL(p‖SG q) = −E_{a∼p}[(D̄ − log p(a)/q(a)) ∇log p(a)]."""
    torch.manual_seed(1)
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    kl = (logp.exp() * (logp - teacher_logp)).sum(-1)
    (kl_grad,) = torch.autograd.grad(kl.sum(), logits, retain_graph=True)
    log_ratio = (logp - teacher_logp).detach()
    centred_advantage = kl.detach()[:, None] - log_ratio
    surrogate = -(logp.exp().detach() * centred_advantage * logp).sum()
    (pg_grad,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(kl_grad, pg_grad)


# --------------------------------------------------------------------------- the full loss


def _batch(seed=0, num_tokens=12):
    generator = torch.Generator().manual_seed(seed)
    def randn():
        return torch.randn(num_tokens, generator=generator, dtype=torch.float64)
    old = -randn().abs() - 0.1
    return dict(
        logprobs=(old + 0.3 * randn()).requires_grad_(True),
        old_logprobs=old,
        ref_logprobs=old + 0.2 * randn(),
        teacher_logprobs=old + 0.5 * randn(),
        # token 5 is over the authors' 20-nat KL clamp
        reverse_kl=(randn().abs() * 0.1 + 30.0 * (torch.arange(num_tokens) == 5)).requires_grad_(True),
        entropy=(randn().abs() + 0.5).requires_grad_(True),
        advantages=torch.tensor([1.2, 1.2, 1.2, -0.4, -0.4, 0.0, 0.0, 0.0, 2.0, 2.0, -1.5, -1.5], dtype=torch.float64),
        mask=torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float64),
    )


def _naive_loss(batch, config: cfg.AlgorithmConfig, step: int, total_steps: int, num_tokens: float,
                gated_scale: float = 1.0) -> float:
    """docs/method.md's formula written token by token with Python floats, with the authors'
    settings: the KL clamp, OPSD's teacher-weighted advantages, the mean over gated tokens
    (scaled by gated_scale = all / gated tokens) and the entropy bonus."""
    c = config
    batch = {name: value.detach() for name, value in batch.items()}
    if c.beta_schedule == "constant":
        beta = c.beta_base
    else:
        warm = 1.0 if c.beta_warmup_steps == 0 else min(1.0, step / c.beta_warmup_steps)
        decay = 1.0 if c.beta_decay_steps == 0 else min(1.0, (total_steps - step) / c.beta_decay_steps)
        beta = c.beta_base * max(0.0, warm) * max(0.0, decay)
    lam = c.rlsd_lambda_base * max(0.0, 1 - step / c.rlsd_lambda_steps)
    total = 0.0
    for t in range(len(batch["mask"])):
        if batch["mask"][t] == 0:
            continue
        lp, old, ref = float(batch["logprobs"][t]), float(batch["old_logprobs"][t]), float(batch["ref_logprobs"][t])
        a = float(batch["advantages"][t])
        positive = 1.0 if a > 0 else 0.0
        scale = positive * gated_scale if c.loss_tokens == "gated" else 1.0
        term = 0.0
        if c.use_outcome:
            if c.advantage_reweighting == "opsd":
                a = positive * min(max(float(batch["teacher_logprobs"][t]) - old, 0.0), 20.0)
            elif c.advantage_reweighting == "rlsd":
                sign = (a > 0) - (a < 0)
                u = math.exp(sign * max(-20, min(20, float(batch["teacher_logprobs"][t]) - old)))
                a = a * ((1 - lam) + lam * min(max(u, 1 - c.rlsd_clip), 1 + c.rlsd_clip))
            rho = math.exp(max(-20, min(20, lp - old)))
            clipped = max(-a * rho, -a * min(max(rho, 1 - c.clip_low), 1 + c.clip_high))
            if c.dual_clip is not None and a < 0:
                clipped = min(clipped, -a * c.dual_clip)
            term += scale * clipped
        gate = 1.0 if (c.gate == "none" or float(batch["advantages"][t]) > 0) else 0.0
        kl = float(batch["reverse_kl"][t])
        if c.opd_kl_clamp is not None:
            kl = min(kl, c.opd_kl_clamp)
        term += beta * (scale if c.loss_tokens == "gated" else gate) * kl
        if c.anchor != "none":
            lw = lp - ref
            f = {"urkl": 0.5 * lw**2, "ufkl": math.exp(-lw) + lw, "fkl": math.exp(-lw), "rkl": 0.5 * (lw + 1) ** 2}[c.anchor]
            term += c.alpha * f
        term -= c.entropy_coef * float(batch["entropy"][t])
        total += term
    return total / num_tokens


@pytest.mark.parametrize("preset", sorted(presets.ALGORITHM_PRESETS))
@pytest.mark.parametrize("step", [1, 10, 30, 120, 399])
def test_each_preset_reproduces_its_formula(preset, step):
    config = presets.algorithm_preset(preset)
    batch = _batch(seed=step)
    num_tokens = 17.0  # the global count: more tokens than this micro-batch holds
    loss, metrics = sdpg_loss(**batch, step=step, total_steps=400, config=config, num_tokens=num_tokens,
                              gated_token_scale=2.5)
    assert loss.item() == pytest.approx(_naive_loss(batch, config, step, 400, num_tokens, 2.5), rel=1e-12)
    assert all(not v.requires_grad for v in metrics.values())


def test_on_policy_gradient_is_minus_advantage():
    config = cfg.AlgorithmConfig(beta_base=0.0, anchor="none", alpha=0.0, gate="none")
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logprobs = old.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss, _ = sdpg_loss(
        logprobs=logprobs, old_logprobs=old, advantages=advantages, mask=torch.ones(3),
        step=1, total_steps=10, config=config,
    )
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages / 3)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)


def test_gate_blocks_distillation_on_non_positive_advantage():
    config = presets.sdpg_urkl()
    batch = _batch()
    loss, metrics = sdpg_loss(**batch, step=100, total_steps=400, config=config, num_tokens=10.0)
    loss.backward()
    gated = batch["advantages"] <= 0
    assert torch.all(batch["reverse_kl"].grad[gated] == 0)
    assert torch.all(batch["reverse_kl"].grad[~gated & (batch["mask"] > 0)] > 0)
    assert metrics["gate_frac"].item() == pytest.approx(4 / 10)


def test_opd_kl_metric_averages_where_the_teacher_ran():
    """With the teacher run only for some tokens (zeros elsewhere), opd_kl is the mean
    over those; the loss and its gradients do not change when the others are gated."""
    config = presets.sdpg_urkl()
    full = _batch()
    loss_full, metrics_full = sdpg_loss(**full, step=100, total_steps=400, config=config, num_tokens=10.0)
    loss_full.backward()

    partial = _batch()
    ran = partial["advantages"] > 0
    with torch.no_grad():
        partial["reverse_kl"][~ran] = 0.0
    loss, metrics = sdpg_loss(**partial, step=100, total_steps=400, config=config, num_tokens=10.0,
                              reverse_kl_mask=ran)
    loss.backward()
    assert loss.item() == loss_full.item()
    torch.testing.assert_close(partial["logprobs"].grad, full["logprobs"].grad, rtol=0, atol=0)
    torch.testing.assert_close(partial["reverse_kl"].grad, full["reverse_kl"].grad, rtol=0, atol=0)
    counted = ran & (partial["mask"] > 0)
    expected = (full["reverse_kl"].detach() * counted).sum() / counted.sum()
    assert metrics["opd_kl"].item() == pytest.approx(expected.item())
    assert metrics_full["opd_kl"].item() != pytest.approx(expected.item())

    _, metrics = sdpg_loss(**_batch(), step=100, total_steps=400, config=config,
                           reverse_kl_mask=torch.zeros(12, dtype=torch.bool))
    assert metrics["opd_kl"].item() == 0.0  # no token: the passes then give it weight 0


@pytest.mark.parametrize("preset, step, expected", [
    ("sdpg-urkl", 100, "positive"),  # β(k) > 0, gate A > 0
    ("sdpg-urkl", 400, "none"),  # β(T) = 0 after the decay
    ("opcd", 1, "all"),  # no gate
    ("rlsd", 1, "all"),  # β = 0, but every token's advantage is reweighted by log q(y_t)
    ("opsd", 1, "all"),  # every token's advantage is log q_ref(y_t) − log π_old(y_t)
    ("grpo", 1, "none"),  # no teacher at all
])
def test_teacher_sample_mask(preset, step, expected):
    advantages = torch.tensor([1.5, 0.0, -0.7, 0.2, 0.0, -1.0])
    config = presets.algorithm_preset(preset)
    needed = teacher_sample_mask(config, advantages, step, 400)
    assert needed.dtype == torch.bool and needed.shape == advantages.shape
    want = {"positive": advantages > 0, "none": torch.zeros(6, dtype=torch.bool),
            "all": torch.ones(6, dtype=torch.bool)}[expected]
    assert torch.equal(needed, want)
    if config.uses_teacher:  # teacher_scope="all": every sample, e.g. for opd_kl over all tokens
        config.teacher_scope = "all"
        assert teacher_sample_mask(config, advantages, step, 400).all()


def test_all_equal_groups_are_finite_and_opd_off():
    rewards = torch.ones(8)
    advantages = group_relative_advantages(rewards, 4).double()
    batch = _batch(num_tokens=8)
    batch["advantages"] = advantages
    batch["mask"] = torch.ones(8, dtype=torch.float64)
    loss, metrics = sdpg_loss(**batch, step=100, total_steps=400, config=presets.sdpg_ufkl())
    loss.backward()
    assert torch.isfinite(loss) and metrics["gate_frac"].item() == 0.0
    assert torch.all(batch["reverse_kl"].grad == 0)
    assert torch.all(torch.isfinite(batch["logprobs"].grad))


def test_missing_inputs_are_named():
    batch = _batch()
    with pytest.raises(ValueError, match="reverse_kl"):
        sdpg_loss(**{**batch, "reverse_kl": None}, step=100, total_steps=400, config=presets.sdpg_urkl())
    with pytest.raises(ValueError, match="ref_logprobs"):
        sdpg_loss(**{**batch, "ref_logprobs": None}, step=100, total_steps=400, config=presets.sdpg_urkl())
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sdpg_loss(**{**batch, "teacher_logprobs": None}, step=1, total_steps=400, config=presets.rlsd())


# --------------------------------------------------------------------------- config


def test_presets_by_name_and_validation():
    assert presets.algorithm_preset("SDPG_UFKL").anchor == "ufkl"
    assert not presets.grpo().uses_teacher and presets.grpo().uses_reference
    assert presets.opcd().uses_teacher and not presets.opcd().uses_reference
    with pytest.raises(ValueError, match="unknown"):
        presets.algorithm_preset("ppo")
    with pytest.raises(ValueError, match="algorithm.clip_low"):
        cfg.validate(cfg.AlgorithmConfig(clip_low=1.5))
    with pytest.raises(ValueError, match="algorithm.use_outcome"):
        cfg.validate(cfg.AlgorithmConfig(use_outcome=False, beta_base=0.0, alpha=0.0))
    with pytest.raises(ValueError, match="algorithm.teacher_scope: must be 'needed' or 'all', got 'some'"):
        cfg.validate(cfg.AlgorithmConfig(teacher_scope="some"))


def test_loss_backend_setting():
    config = cfg.apply_overrides(cfg.Config(), ["model.loss_backend=torch"])
    assert config.model.loss_backend == "torch"
    with pytest.raises(ValueError, match="model.loss_backend"):
        cfg.validate(cfg.ModelConfig(hf_dir="x", loss_backend="cuda"))


def test_weight_transport_setting():
    config = cfg.apply_overrides(cfg.Config(), ["rollout.weight_transport=nccl", "rollout.gpus_per_engine=1"])
    assert config.rollout.weight_transport == "nccl"
    cfg.validate(config.rollout)
    assert cfg.Config().rollout.weight_transport == "auto"
    with pytest.raises(ValueError, match="rollout.weight_transport: must be one of"):
        cfg.validate(cfg.RolloutConfig(weight_transport="tcp"))
    with pytest.raises(ValueError, match="needs GPU engines"):
        cfg.validate(cfg.RolloutConfig(weight_transport="nccl"))
    with pytest.raises(ValueError, match="'cuda_ipc' needs GPU engines"):
        cfg.validate(cfg.RolloutConfig(weight_transport="cuda_ipc"))
    with pytest.raises(ValueError, match="rollout.gpus_per_engine: an engine's 2 TP workers need one GPU each"):
        cfg.validate(cfg.RolloutConfig(engine_tensor_parallel=2, gpus_per_engine=1))


def test_authors_settings_change_the_loss_where_they_should():
    """Each of the authors' settings moves the loss (the formula test above would pass
    vacuously if a setting were ignored by both sides)."""
    batch = _batch(seed=3)

    def loss(config, **kwargs):
        return sdpg_loss(**batch, step=100, total_steps=400, config=config, num_tokens=10.0, **kwargs)[0].item()

    base = cfg.AlgorithmConfig(name="x", beta_base=0.5, beta_schedule="constant", gate="none")
    clamped = cfg.AlgorithmConfig(name="x", beta_base=0.5, beta_schedule="constant", gate="none", opd_kl_clamp=20.0)
    assert loss(base) - loss(clamped) == pytest.approx(0.5 * (batch["reverse_kl"][5].item() - 20.0) / 10.0)
    entropic = cfg.AlgorithmConfig(name="x", beta_base=0.5, beta_schedule="constant", gate="none", entropy_coef=0.01)
    masked_entropy = float((batch["entropy"].detach() * batch["mask"]).sum())
    assert loss(base) - loss(entropic) == pytest.approx(0.01 * masked_entropy / 10.0)
    opsd = presets.algorithm_preset("opsd")
    opsd.entropy_coef = 0.0  # the entropy bonus stays a mean over every token
    assert loss(opsd, gated_token_scale=2.0) == pytest.approx(2 * loss(opsd, gated_token_scale=1.0))
    assert loss(opsd) != 0.0


def test_opsd_advantages_and_truncated_importance_weights():
    from sdpg_megatron.algo import opsd_token_advantages, truncated_importance_weights

    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, 0.0])
    teacher = torch.tensor([-1.0, -3.0, 40.0, 0.0, 0.0])
    old = torch.tensor([-2.0, -2.0, 0.0, -5.0, -5.0])
    assert opsd_token_advantages(advantages, teacher, old).tolist() == [1.0, 0.0, 20.0, 0.0, 0.0]
    weights = truncated_importance_weights(torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.0, -2.0, -0.5]), 2.0)
    assert weights.tolist() == pytest.approx([1.0, 2.0, math.exp(-0.5)])  # e^1 capped at 2


def test_preset_run_settings_apply_outside_the_algorithm_section():
    config = presets.apply_preset(cfg.Config(), "opsd")
    assert config.optimizer.lr == 5e-6 and config.reward.overlong_buffer is None
    assert config.algorithm.uses_reference and config.algorithm.uses_teacher
    rlsd = presets.apply_preset(cfg.Config(), "rlsd")
    assert (rlsd.algorithm.clip_low, rlsd.algorithm.clip_high) == (0.2, 0.2) and rlsd.reward.overlong_buffer is None
    assert presets.apply_preset(cfg.Config(), "sdpg-urkl").reward.overlong_buffer == 512
    with pytest.raises(ValueError, match="tis_cap"):
        cfg.validate(cfg.AlgorithmConfig(old_logprobs="engine", tis_cap=2.0))
