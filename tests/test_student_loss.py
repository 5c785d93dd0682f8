"""The student pass's loss of one micro-batch (`student_loss.StudentLoss`) against a naive
full-logits computation in float64: the loss, the metric sums (each token's terms computed
once) and, with logging.term_pulls, each term's pull (the squared norm of its gradient with
respect to the last hidden states); in the two-pass and the single-pass modes, with the
teacher for every token and for some only.
"""

from __future__ import annotations

import pytest
import torch

from sdpg_megatron.algo import metric_sums, token_terms
from sdpg_megatron.config import Config, apply_overrides, validate
from sdpg_megatron.experience import MicroBatch
from sdpg_megatron.passes import TeacherStates
from sdpg_megatron.presets import apply_preset
from sdpg_megatron.student_loss import LossSettings, StudentLoss

S, B, H, V = 7, 2, 16, 23  # sequence, rows, hidden, vocabulary
STEP = 3


def _config(**overrides) -> Config:
    config = apply_preset(Config(), "sdpg-urkl")
    settings = {"algorithm.beta_schedule": "constant", "algorithm.beta_base": 0.5, "algorithm.alpha": 0.3,
                "algorithm.entropy_coef": 0.01, "algorithm.tis_cap": 2.0, "rollout.temperature": 0.9,
                "schedule.total_steps": 10, **overrides}
    return apply_overrides(config, [f"{key}={value}" for key, value in settings.items()])


@pytest.fixture(scope="module")
def case():
    """A micro-batch of two rows with responses of 4 and 3 tokens, its hidden states, the
    output weight, the teacher's states, π_ref and π_old log-probs."""
    g = torch.Generator().manual_seed(3)
    response_mask = torch.zeros(B, S, dtype=torch.bool)
    response_mask[0, 2:6] = True
    response_mask[1, 3:6] = True
    n = int(response_mask.sum())
    empty = torch.zeros(B, S, dtype=torch.long)
    mb = MicroBatch(
        tokens=empty, positions=empty, response_mask=response_mask, teacher_tokens=empty, teacher_positions=empty,
        teacher_response_mask=response_mask, lengths=torch.tensor([S, S]), teacher_lengths=torch.tensor([S, S]),
        targets=torch.randint(0, V, (n,), generator=g), rollout_logprobs=-torch.rand(n, generator=g) * 3,
        advantages=torch.tensor([0.8] * 4 + [-0.6] * 3), sample_ids=torch.tensor([0] * 4 + [1] * 3),
    )
    return {
        "mb": mb, "hidden": torch.randn(S, B, H, generator=g), "weight": torch.randn(V, H, generator=g) * 0.5,
        "teacher": torch.randn(n, H, generator=g), "reference": -torch.rand(n, generator=g) * 3,
        "old": -torch.rand(n, generator=g) * 3,
    }


def _naive(config: Config, case, kl_rows: torch.Tensor | None):
    """float64 full-logits statistics → the loss, the metric sums and each term's squared pull;
    kl_rows: the tokens with the teacher (None: all)."""
    mb = case["mb"]
    states = case["hidden"].double().transpose(0, 1)[mb.response_mask].requires_grad_(True)
    temperature = config.rollout.temperature
    log_p = torch.log_softmax(states @ case["weight"].double().t() / temperature, -1)
    log_q = torch.log_softmax(case["teacher"].double() @ case["weight"].double().t() / temperature, -1)
    logprobs = log_p.gather(1, mb.targets[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    reverse_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    computed = torch.ones_like(logprobs, dtype=torch.bool)
    if kl_rows is not None:
        computed = torch.zeros_like(computed)
        computed[kl_rows] = True
        reverse_kl = torch.where(computed, reverse_kl, 0.0)
    terms = token_terms(logprobs=logprobs, old_logprobs=case["old"].double(), advantages=mb.advantages.double(),
                        step=STEP, total_steps=config.schedule.total_steps, config=config.algorithm,
                        reverse_kl=reverse_kl, ref_logprobs=case["reference"].double(), entropy=entropy,
                        rollout_logprobs=mb.rollout_logprobs.double())
    sums = metric_sums(terms, logprobs=logprobs, reverse_kl=reverse_kl, reverse_kl_mask=computed,
                       ref_logprobs=case["reference"].double(), entropy=entropy)
    pulls = {name: torch.autograd.grad(part.sum(), states, retain_graph=True)[0].square().sum().item()
             for name, part in terms.parts.items()}
    return terms.per_token.sum().item(), {k: v.item() for k, v in sums.items()}, pulls


def _student_loss(config: Config, case, *, single_pass: bool, rows: torch.Tensor | None):
    mb = case["mb"]
    teacher = case["teacher"] if rows is None else case["teacher"][rows]
    settings = LossSettings(config=config, group=None, vocab_size=V, step=STEP, single_pass=single_pass)
    loss_func = StudentLoss(settings, mb, mb.response_mask, lambda: case["weight"],
                            teacher=TeacherStates(teacher, None, rows), teacher_ran=True,
                            reference=case["reference"], old=case["old"])
    hidden = case["hidden"].clone().requires_grad_(True)
    loss, num_tokens, sums = loss_func(hidden)
    assert int(num_tokens) == mb.num_tokens
    return loss, {k: float(v) for k, v in sums.items()}, hidden


@pytest.mark.parametrize("single_pass", [False, True], ids=["stats", "single_pass"])
@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2, 3])], ids=["teacher_all", "teacher_some"])
def test_loss_and_metric_sums_match_the_naive_terms(case, single_pass, rows):
    config = _config()
    expected_loss, expected_sums, _ = _naive(config, case, rows)
    loss, sums, hidden = _student_loss(config, case, single_pass=single_pass, rows=rows)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert sums["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert sums["tokens"] == case["mb"].num_tokens
    assert sums["opd_kl/tokens"] == (case["mb"].num_tokens if rows is None else len(rows))
    for key, value in expected_sums.items():
        assert sums[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    loss.backward()  # the gradient reaches the hidden states either way
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2, 3])], ids=["teacher_all", "teacher_some"])
def test_term_pulls_are_the_norms_of_each_terms_gradient(case, rows):
    config = _config(**{"logging.term_pulls": "true", "model.loss_mode": "stats"})
    _, _, expected = _naive(config, case, rows)
    assert set(expected) == {"outcome", "opd", "anchor", "entropy"}
    _, sums, _ = _student_loss(config, case, single_pass=False, rows=rows)
    for name, value in expected.items():
        assert value > 0
        assert sums[f"pull/{name}"] == pytest.approx(value, rel=1e-4), name
    # without the KL's gradient (β = 0) the OPD pull is 0 and the others are unchanged
    beta0 = _config(**{"logging.term_pulls": "true", "algorithm.beta_base": 0.0})
    _, sums0, _ = _student_loss(beta0, case, single_pass=False, rows=rows)
    assert "pull/opd" not in sums0 and sums0["pull/outcome"] == pytest.approx(sums["pull/outcome"], rel=1e-6)


def test_term_pulls_refuse_the_single_pass_loss(case):
    with pytest.raises(ValueError, match="logging.term_pulls.*set model.loss_mode=stats"):
        validate(_config(**{"logging.term_pulls": "true", "model.loss_mode": "single_pass", "model.hf_dir": "/m",
                             "data.train_files": "/d.parquet"}))
    config = _config(**{"logging.term_pulls": "true"})  # loss_mode auto: single pass on a bf16 GPU
    with pytest.raises(ValueError, match="set model.loss_mode=stats"):
        _student_loss(config, case, single_pass=True, rows=None)
