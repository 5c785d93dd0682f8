"""DAPO dynamic sampling in the driver: refill, cap, determinism, resume.

The driver runs for real (tokenizer, prompt stream, math-verify pool, metrics sink) with a
stand-in fleet whose groups are all right, all wrong or mixed as a seeded function of
(prompt, sampling seed), so two thirds of the groups are uninformative and the driver has
to draw more generation batches.
"""

from __future__ import annotations

import pytest

from sdpg_megatron.driver import Driver, PhaseTimer
from tests.helpers import arithmetic_task, patterned_groups

GROUP = 4
PROMPTS = 8  # per step; 2 PPO mini-batches of 4 prompts


class PatternFleet:
    """Answers `\\boxed{right}` or `\\boxed{wrong}`; each group is all right, all wrong or
    half and half, chosen by (prompt, seed)."""

    version = 0

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str], informative_share: float):
        self.tokenizer, self.answers, self.informative_share = tokenizer, answers, informative_share
        self.calls = []

    def generate(self, prompts, n, sampling, *, seed=None):
        self.calls.append((len(prompts), seed))
        return patterned_groups(self.tokenizer, self.answers, prompts, n, seed,
                                informative_share=self.informative_share)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    return root, arithmetic_task(root)


def _config(root, out: str, **schedule):
    from sdpg_megatron.config import Config

    config = Config()
    config.model.hf_dir = str(root / "model")
    config.data.train_files = (str(root / "train.parquet"),)
    config.algorithm.group_size = GROUP
    config.schedule.prompts_per_step, config.schedule.minibatches_per_step = PROMPTS, 2
    config.schedule.dynamic_sampling, config.schedule.max_generation_batches = True, 4
    for key, value in schedule.items():
        setattr(config.schedule, key, value)
    config.reward.num_workers, config.reward.overlong_buffer = 1, None
    config.rollout.max_response_tokens = 64
    config.logging.out_dir, config.logging.tensorboard, config.logging.progress = str(root / out), False, False
    return config


def _driver(config, tokenizer, share: float, start_step: int = 0, position: int | None = None):
    fleet = PatternFleet(tokenizer, {}, share)
    driver = Driver(config, fleet, start_step, prompt_position=position)
    fleet.answers = {tuple(prompt.student_ids): problem.answer for prompt, problem in driver.prompts.sampler.problems}
    return driver, fleet


def _run(driver, steps):
    out = []
    for step in steps:
        batch, metrics = driver.rollout(step, PhaseTimer())
        out.append((batch, metrics, driver.prompts.position))
    return out


def _signature(batch):
    return [(s.group, tuple(s.student_prompt), tuple(s.response), s.reward, s.correct) for s in batch.samples]


def test_refill_until_the_step_is_full_of_informative_groups(setup):
    root, tokenizer = setup
    driver, fleet = _driver(_config(root, "refill"), tokenizer, share=0.4)
    try:
        results = _run(driver, range(1, 5))
    finally:
        driver.close()
    batches_used = [m["dynamic_sampling/generation_batches"] for _, m, _ in results]
    assert max(batches_used) >= 2  # some step needed more than one generation batch
    for batch, metrics, _ in results:
        assert metrics["dynamic_sampling/groups_trained"] == PROMPTS == batch.num_groups
        correct = [[s.correct for s in batch.samples[g * GROUP:(g + 1) * GROUP]] for g in range(batch.num_groups)]
        assert all(0 < sum(c) < GROUP for c in correct)  # only informative groups
        assert [s.group for s in batch.samples] == [g for g in range(PROMPTS) for _ in range(GROUP)]
        generated = metrics["dynamic_sampling/generation_batches"] * PROMPTS
        assert 0 < metrics["dynamic_sampling/filtered_frac"] < 1
        assert metrics["accuracy"] * generated * GROUP == pytest.approx(round(metrics["accuracy"] * generated * GROUP))
    # the stream advanced by every prompt generated, and each generation batch had its own seed
    assert results[-1][2] == PROMPTS * sum(batches_used)
    seeds = [seed for _, seed in fleet.calls]
    assert len(seeds) == len(set(seeds)) == sum(batches_used)


def test_cap_trains_on_whole_minibatches_of_what_there_is(setup):
    root, tokenizer = setup
    driver, _ = _driver(_config(root, "cap", max_generation_batches=2), tokenizer, share=0.2)
    try:
        results = _run(driver, range(1, 7))
    finally:
        driver.close()
    per_minibatch = PROMPTS // 2
    short = [(b, m) for b, m, _ in results if m["dynamic_sampling/groups_trained"] < PROMPTS]
    assert short, "with 20% informative groups and 2 batches some step must come up short"
    for batch, metrics in short:
        assert metrics["dynamic_sampling/generation_batches"] == 2  # the cap, not more
        assert batch.num_groups % per_minibatch == 0 and batch.num_groups >= per_minibatch
        informative = batch.num_groups - metrics["dynamic_sampling/uninformative_trained"]
        if metrics["dynamic_sampling/uninformative_trained"]:  # topped up only below one mini-batch
            assert batch.num_groups == per_minibatch and informative < per_minibatch


def test_no_dynamic_sampling_is_one_generation_batch_of_every_group(setup):
    root, tokenizer = setup
    driver, fleet = _driver(_config(root, "off", dynamic_sampling=False), tokenizer, share=0.2)
    try:
        (batch, metrics, position), = _run(driver, [1])
    finally:
        driver.close()
    assert batch.num_groups == PROMPTS and position == PROMPTS and len(fleet.calls) == 1
    assert not any(key.startswith("dynamic_sampling/") for key in metrics)


def test_deterministic_and_resumes_exactly(setup):
    root, tokenizer = setup
    first, _ = _driver(_config(root, "a"), tokenizer, share=0.4)
    second, _ = _driver(_config(root, "b"), tokenizer, share=0.4)
    try:
        run_a, run_b = _run(first, range(1, 5)), _run(second, range(1, 5))
    finally:
        first.close()
        second.close()
    assert [_signature(b) for b, _, _ in run_a] == [_signature(b) for b, _, _ in run_b]
    # a run resumed after step 2 from the position its checkpoint saved draws steps 3 and 4 alike
    resumed, _ = _driver(_config(root, "a"), tokenizer, share=0.4, start_step=2, position=run_a[1][2])
    try:
        run_c = _run(resumed, range(3, 5))
    finally:
        resumed.close()
    assert [_signature(b) for b, _, _ in run_c] == [_signature(b) for b, _, _ in run_a[2:]]
    assert run_a[1][2] > 2 * PROMPTS  # the position is not the no-filter one: it had to be saved
