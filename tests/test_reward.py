"""Verifier rewards: boxed extraction, normal form, overlong penalty, and the worker pool.

One module-scoped pool serves every pool test (a spawned worker pays ~2 s importing
math-verify). Its verify_fn delegates to math-verify except for three scripted answers —
HANG, CRASH, RAISE — so the hard timeout and crash recovery are tested on the same pool
that does the real scoring. The tests that break workers come last.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sdpg_megatron.reward import (
    VERDICT_STATUSES,
    Verdict,
    VerifierPool,
    extract_boxed,
    normalize_answer,
    overlong_penalty,
    score_responses,
    verify_with_math_verify,
)

TIMEOUT_S = 4.0
CORRECT = Verdict(correct=True, status="correct")
WRONG = Verdict(correct=False, status="wrong")
NO_ANSWER = Verdict(correct=False, status="no_answer")
TIMEOUT = Verdict(correct=False, status="timeout")
ERROR = Verdict(correct=False, status="error")


def _scripted_verify(gold_answer: str, predicted_answer: str) -> bool:
    """Runs in the workers: math-verify, unless the prediction scripts a failure."""
    if predicted_answer == "HANG":
        time.sleep(3600)
    if predicted_answer == "CRASH":
        os._exit(3)
    if predicted_answer == "RAISE":
        raise ValueError("scripted verifier failure")
    return verify_with_math_verify(gold_answer, predicted_answer)


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(
        num_workers=2, timeout_s=TIMEOUT_S, verify_fn="tests.test_reward:_scripted_verify"
    ) as shared_pool:
        yield shared_pool


def boxed(answer: str) -> str:
    return f"Some reasoning.\n\nThe answer is $\\boxed{{{answer}}}$."


# --- extract_boxed -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} and more text", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not grouping
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed {5}", "5"),
        ("answer: \\boxed 12$ done", "12"),
        ("\\boxed{}", ""),
        ("\\boxed{1} then \\boxedfoo", "1"),  # a different control word is not a box
        ("no box here: 42", None),
        ("", None),
        ("\\boxed{\\frac{1}{2}", None),  # the last box never closes
        ("\\boxed{1} and \\boxed{2", None),  # ... even if an earlier one does
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "adversarial",
    [
        "\\boxed{" + "{" * 100_000,
        "\\boxed{" * 20_000,
        "\\boxed{" + "\\{" * 50_000,
        "\\boxed " + " " * 100_000,
        "\\boxedx" * 20_000,
    ],
)
def test_extract_boxed_is_linear_on_adversarial_input(adversarial):
    start = time.perf_counter()
    assert extract_boxed(adversarial) is None
    normalize_answer(adversarial)
    assert time.perf_counter() - start < 1.0


# --- normalize_answer ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac12"),
        (" 5. ", "5"),
        ("+5", "5"),
        ("12.0", "12"),
        ("-3.00", "-3"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("2\\!\\sqrt{3}", "2\\sqrt{3}"),
        ("1\\,000", "1000"),
        ("\\displaystyle x^2 + 1", "x^2+1"),
        ("\\pi r^2", "\\pi  r^2"),
        ("\\text{east  north}", "\\text{east north}"),
    ],
)
def test_normalize_answer_equates_spellings(left, right):
    assert normalize_answer(left) == normalize_answer(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("\\pi r", "\\pir"),  # a space that ends a control word is kept
        ("\\text{east north}", "\\text{eastnorth}"),  # text keeps its word breaks
        ("12.5", "12"),
        ("12.50", "12.5"),  # not rewritten: math-verify decides
        ("1,2", "12"),
        ("-5", "5"),
        ("\\rightarrow", "\\"),  # \right only goes when it is the whole control word
        ("1,2,...", "1,2,.."),
        ("\\$5", "5"),
    ],
)
def test_normalize_answer_keeps_distinct_values_apart(left, right):
    assert normalize_answer(left) != normalize_answer(right)


def test_normalize_answer_exact_forms():
    assert normalize_answer("\\left[ 0, \\dfrac{1}{2} \\right)") == "[0,\\frac{1}{2})"
    assert normalize_answer("\\rightarrow") == "\\rightarrow"
    assert normalize_answer("+12.000.") == "12"


# --- overlong_penalty ----------------------------------------------------------------


def test_overlong_penalty_values():
    # METHOD.md defaults: L_max = 4096, buffer = 512, so the ramp starts at 3584.
    assert overlong_penalty(0, 4096) == 0.0
    assert overlong_penalty(3584, 4096, 512) == 0.0
    assert overlong_penalty(3585, 4096, 512) == pytest.approx(-1 / 512)
    assert overlong_penalty(3840, 4096, 512) == pytest.approx(-0.5)
    assert overlong_penalty(4096, 4096, 512) == pytest.approx(-1.0)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 100) == pytest.approx(-1.0)


def test_overlong_penalty_validates_arguments():
    with pytest.raises(ValueError, match="buffer=600.*max_length=512"):
        overlong_penalty(10, 512, 600)
    with pytest.raises(ValueError, match="buffer=0"):
        overlong_penalty(10, 512, 0)
    with pytest.raises(ValueError, match="length=-1"):
        overlong_penalty(-1, 512, 64)


# --- VerifierPool --------------------------------------------------------------------


def test_verdict_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="status"):
        Verdict(correct=False, status="maybe")
    with pytest.raises(ValueError, match="contradicts"):
        Verdict(correct=True, status="wrong")


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="verify_fn"):
        VerifierPool(verify_fn="no_function_named")
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(timeout_s=0)


def test_pool_scores_equivalent_forms(pool):
    pool.wait_ready()
    cases = [
        ("34", "34"),
        ("34", "34.0"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "\\frac12"),
        ("\\frac{1}{2}", "1/2"),
        ("0.5", "\\dfrac{1}{2}"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("2\\sqrt{3}", "2 \\sqrt 3"),
        ("x^2+1", "1+x^2"),
        ("\\frac{\\pi}{4}", "\\pi/4"),
        ("3,5", "5,3"),
    ]
    verdicts = pool.score([boxed(pred) for _, pred in cases], [gold for gold, _ in cases])
    assert verdicts == [CORRECT] * len(cases), list(zip(cases, verdicts))


def test_pool_scores_wrong_and_missing_answers(pool):
    responses = [boxed("35"), boxed("\\frac{1}{3}"), "I give up.", "", boxed(""), boxed("34")]
    answers = ["34", "\\frac{1}{2}", "34", "34", "34", "34"]
    expected = [WRONG, WRONG, NO_ANSWER, NO_ANSWER, NO_ANSWER, CORRECT]
    assert pool.score(responses, answers) == expected
    assert pool.score([], []) == []
    with pytest.raises(ValueError, match="2 responses and 1 answers"):
        pool.score(["a", "b"], ["a"])


def test_pool_passes_gold_first(pool):
    # math-verify's documented asymmetry: a relation in the gold may be compared with a
    # set in the prediction, not the other way round (allow_set_relation_comp=False).
    assert pool.score([boxed("(1,2)")], ["1<x<2"]) == [CORRECT]
    assert pool.score([boxed("1<x<2")], ["(1,2)"]) == [WRONG]
    # ... and a prediction that is an equation is unwrapped to follow a plain gold.
    assert pool.score([boxed("2x+z=1")], ["1"]) == [CORRECT]
    assert pool.score([boxed("1")], ["2x+z=1"]) == [WRONG]


def test_fast_path_never_reaches_the_workers(pool):
    # Equal normal forms are correct without verification: a scripted hang is not hit.
    start = time.monotonic()
    assert pool.score([boxed("HANG")], ["HANG"]) == [CORRECT]
    assert time.monotonic() - start < 1.0


def test_score_responses_rewards_and_counts(pool):
    responses = [boxed("34"), boxed("35"), "", boxed("\\frac12")]
    answers = ["34", "34", "34", "0.5"]
    lengths = [10, 90, 100, 85]
    batch = score_responses(
        pool, responses, answers, lengths, max_response_tokens=100, overlong_buffer=20
    )
    # Penalties: 0, −(90 − 80)/20, −(100 − 80)/20, −(85 − 80)/20.
    assert batch.rewards == pytest.approx([1.0, -0.5, -1.0, 0.75])
    assert batch.correct == [True, False, False, True]
    assert batch.counts == {
        "correct": 2,
        "wrong": 1,
        "no_answer": 1,
        "timeout": 0,
        "error": 0,
        "overlong": 3,
        "truncated": 1,
    }
    assert set(VERDICT_STATUSES) <= set(batch.counts)

    batch = score_responses(
        pool,
        responses,
        answers,
        lengths,
        max_response_tokens=100,
        overlong_buffer=None,
        truncated=[False, True, True, False],
    )
    assert batch.rewards == [1.0, 0.0, 0.0, 1.0]
    assert batch.counts["overlong"] == 0 and batch.counts["truncated"] == 2


def test_score_responses_validates_inputs(pool):
    with pytest.raises(ValueError, match="lengths"):
        score_responses(pool, ["a"], ["a"], [], max_response_tokens=10, overlong_buffer=None)
    with pytest.raises(ValueError, match="truncated"):
        score_responses(
            pool, ["a"], ["a"], [1], max_response_tokens=10, overlong_buffer=None, truncated=[]
        )
    with pytest.raises(ValueError, match="buffer"):
        score_responses(pool, ["a"], ["a"], [1], max_response_tokens=10, overlong_buffer=11)


def test_hanging_verifier_times_out_and_pool_recovers(pool):
    pool.wait_ready()
    start = time.monotonic()
    verdicts = pool.score([boxed("HANG"), boxed("HANG")], ["1", "1"])
    elapsed = time.monotonic() - start
    assert verdicts == [TIMEOUT, TIMEOUT]
    # Both calls were in flight at once, each under its own deadline.
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0
    assert pool.score([boxed("\\frac12")], ["0.5"]) == [CORRECT]


def test_crashing_or_raising_verifier_is_an_error_and_pool_recovers(pool):
    responses = [boxed("CRASH"), boxed("\\frac12"), boxed("RAISE"), "", boxed("35")]
    answers = ["1", "0.5", "1", "1", "34"]
    assert pool.score(responses, answers) == [ERROR, CORRECT, ERROR, NO_ANSWER, WRONG]
    assert pool.score([boxed("2\\sqrt{3}")], ["\\sqrt{12}"]) == [CORRECT]


def test_worker_killed_while_idle_is_replaced_without_losing_answers(pool):
    pool.wait_ready()
    victim = pool._workers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    responses = [boxed("\\frac12"), boxed("\\sqrt{12}"), boxed("0.25")]
    answers = ["0.5", "2\\sqrt{3}", "\\frac{1}{4}"]
    assert pool.score(responses, answers) == [CORRECT] * 3


def test_default_pool_uses_math_verify_and_closes():
    pool = VerifierPool(num_workers=1, timeout_s=TIMEOUT_S)
    with pool:
        assert pool.score([boxed("0.5"), boxed("0.4")], ["\\frac{1}{2}"] * 2) == [CORRECT, WRONG]
        worker_pids = [worker.process.pid for worker in pool._workers]
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped and reaped
    with pytest.raises(RuntimeError, match="after close"):
        pool.score([boxed("1")], ["1"])
    pool.close()  # idempotent
