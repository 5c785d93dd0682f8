"""Verifier rewards: answer region, boxed extraction, normal form, overlong penalty,
reward schemes, the guard's refusals in a batch, and the worker pool.

One module-scoped pool serves every pool test (a spawned worker pays ~2 s importing
math-verify). Its verify_fn delegates to math-verify except for three scripted answers —
HANG, CRASH, RAISE — and the PATHOLOGICAL answers, which hang too: a refused answer that
reached a worker would read "timeout" after TIMEOUT_S. So the hard timeout, crash
recovery and the guard are tested on the same pool that does the real scoring. The
tests that break workers come last. The guard's own rules: tests/test_reward_guard.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sdpg_megatron.reward import (
    REWARD_SCHEMES,
    THINK_END,
    VERDICT_STATUSES,
    Verdict,
    VerifierPool,
    answer_region,
    answer_too_complex,
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
UNFINISHED = Verdict(correct=False, status="unfinished_thinking")
REFUSED = Verdict(correct=False, status="refused")

# One answer per kind the guard refuses; the scripted verifier hangs on each of them.
PATHOLOGICAL = (
    "2^{2^{2^{2^{2}}}}",  # a power tower
    "10^10^10^10",  # chained superscripts
    "10^{10^{10}}",  # a power of numbers in an exponent (math-verify: past any timeout)
    "(100!)!",  # a factorial tower (math-verify: past any timeout)
    "1" * 10_000,  # a 10,000-digit integer
    "\\frac{1}{" * 30 + "2" + "}" * 30,  # deep nesting (math-verify: past any timeout)
    "+".join(f"x_{{{i}}}" for i in range(100)),  # a giant expression, 689 characters
    "(x+y+z)^{100}",  # an expansion into 176,851 terms (math-verify: past any timeout)
)


def _scripted_verify(gold_answer: str, predicted_answer: str) -> bool:
    """Runs in the workers: math-verify, unless the prediction scripts a failure."""
    if predicted_answer == "HANG" or predicted_answer in PATHOLOGICAL:
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


# --- answer_region: thinking split and tail -----------------------------------------


def think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n{THINK_END}\n\n{answer}"


def test_answer_region_thinking_takes_the_text_after_the_last_think_end():
    response = think("draft: \\boxed{35}", "So \\boxed{34}.")
    assert answer_region(response, thinking=True, tail_chars=None) == "\n\nSo \\boxed{34}."
    assert extract_boxed(answer_region(response, thinking=True)) == "34"
    # Without thinking the whole response is the region: its last box, as before.
    assert answer_region(response, thinking=False, tail_chars=None) == response
    # The last </think> ends the thinking (a quoted tag earlier does not).
    twice = f"<think>the tag {THINK_END} appears{THINK_END} \\boxed{{1}}{THINK_END}\\boxed{{2}}"
    assert answer_region(twice, thinking=True) == "\\boxed{2}"


def test_answer_region_ignores_a_box_inside_the_thinking():
    response = think("so the answer is \\boxed{34}", "I am not sure.")
    assert extract_boxed(answer_region(response, thinking=True)) is None
    assert extract_boxed(answer_region(response, thinking=False)) == "34"


@pytest.mark.parametrize(
    "cut_off", ["<think>\nlong reasoning \\boxed{34} and more", "\\boxed{34}", "", "</think"]
)
def test_answer_region_without_think_end_has_no_answer(cut_off):
    assert answer_region(cut_off, thinking=True) is None
    assert answer_region(cut_off, thinking=False) == cut_off


def test_answer_region_tail_rule():
    box = "\\boxed{34}"
    early = box + "x" * (600 - len(box))  # the box starts 600 characters before the end
    assert extract_boxed(answer_region(early, thinking=False)) is None  # default 500
    assert extract_boxed(answer_region(early, thinking=False, tail_chars=500)) is None
    assert extract_boxed(answer_region(early, thinking=False, tail_chars=600)) == "34"
    assert extract_boxed(answer_region(early, thinking=False, tail_chars=None)) == "34"
    # The box must start inside the tail: one character short of it is not enough.
    assert extract_boxed(answer_region(early, thinking=False, tail_chars=599)) is None
    # A later box inside the tail wins over the earlier one either way.
    both = early + " final \\boxed{35}"
    assert extract_boxed(answer_region(both, thinking=False)) == "35"
    # In thinking mode the tail is measured on the answer region, not the response.
    thought = think("y" * 5000, early)
    assert extract_boxed(answer_region(thought, thinking=True, tail_chars=700)) == "34"
    assert extract_boxed(answer_region(thought, thinking=True)) is None


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "500"])
def test_answer_region_rejects_bad_tail(bad):
    with pytest.raises(ValueError, match=f"tail_chars={bad!r}.*None"):
        answer_region("\\boxed{1}", thinking=False, tail_chars=bad)


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
    # Signed by default: +1 / −1; penalties 0, −(90 − 80)/20, −(100 − 80)/20, −(85 − 80)/20.
    assert batch.rewards == pytest.approx([1.0, -1.5, -2.0, 0.75])
    assert batch.correct == [True, False, False, True]
    assert batch.counts == {
        "correct": 2,
        "wrong": 1,
        "no_answer": 1,
        "unfinished_thinking": 0,
        "refused": 0,
        "timeout": 0,
        "error": 0,
        "overlong": 3,
        "truncated": 1,
    }
    assert list(batch.counts)[: len(VERDICT_STATUSES)] == list(VERDICT_STATUSES)

    batch = score_responses(
        pool,
        responses,
        answers,
        lengths,
        max_response_tokens=100,
        overlong_buffer=None,
        truncated=[False, True, True, False],
    )
    assert batch.rewards == [1.0, -1.0, -1.0, 1.0]
    assert batch.counts["overlong"] == 0 and batch.counts["truncated"] == 2


@pytest.mark.parametrize(
    ("scheme", "overlong_buffer", "expected"),
    [
        # correct short, wrong short, correct in the ramp, wrong at the limit
        ("signed", None, [1.0, -1.0, 1.0, -1.0]),
        ("binary", None, [1.0, 0.0, 1.0, 0.0]),
        ("signed", 20, [1.0, -1.0, 0.5, -2.0]),
        ("binary", 20, [1.0, 0.0, 0.5, -1.0]),
    ],
)
def test_score_responses_schemes(pool, scheme, overlong_buffer, expected):
    responses = [boxed("34"), boxed("35"), boxed("34"), boxed("35")]
    lengths = [10, 10, 90, 100]  # ramp from 80 to 100: penalties 0, 0, −0.5, −1
    batch = score_responses(
        pool, responses, ["34"] * 4, lengths, max_response_tokens=100,
        overlong_buffer=overlong_buffer, scheme=scheme,
    )
    assert batch.rewards == pytest.approx(expected)
    assert batch.correct == [True, False, True, False]
    assert set(REWARD_SCHEMES) == {"signed", "binary"}


def test_score_responses_every_failure_is_minus_one_when_signed(pool):
    responses = [boxed("35"), "no box", "<think>cut off", boxed("10^{10^{10}}"), boxed("RAISE")]
    batch = score_responses(
        pool, responses, ["34"] * 5, [1] * 5, max_response_tokens=100, overlong_buffer=None,
        thinking=False, answer_tail_chars=None,
    )
    assert [batch.counts[s] for s in ("wrong", "no_answer", "refused", "error")] == [1, 2, 1, 1]
    assert batch.rewards == [-1.0] * 5
    thinking = score_responses(
        pool, responses[1:3], ["34"] * 2, [1] * 2, max_response_tokens=100,
        overlong_buffer=None, thinking=True, scheme="binary",
    )
    assert thinking.counts["unfinished_thinking"] == 2 and thinking.rewards == [0.0, 0.0]


def test_score_responses_thinking(pool):
    responses = [
        think("try \\boxed{35}", "The answer is \\boxed{34}."),  # the box after </think> counts
        think("the answer is \\boxed{34}", "Done."),  # a box only in the thinking: none
        "<think>\nstill thinking, \\boxed{34} so far",  # cut off inside the thinking
        think("", boxed("\\frac12")),
    ]
    answers = ["34", "34", "34", "0.5"]
    batch = score_responses(
        pool, responses, answers, [10] * 4, max_response_tokens=100, overlong_buffer=None,
        thinking=True,
    )
    assert batch.correct == [True, False, False, True]
    assert batch.rewards == [1.0, -1.0, -1.0, 1.0]
    assert (batch.counts["no_answer"], batch.counts["unfinished_thinking"]) == (1, 1)
    assert pool.score(responses, answers, thinking=True) == [CORRECT, NO_ANSWER, UNFINISHED, CORRECT]
    # Thinking off: the last box anywhere in the tail, the thinking's included.
    verdicts = pool.score(responses, answers, thinking=False)
    assert verdicts == [CORRECT, CORRECT, CORRECT, CORRECT]


def test_score_responses_tail_rule(pool):
    early = boxed("34") + " Let me double-check." + " Indeed." * 80  # box > 500 chars back
    late = "x" * 5000 + boxed("34")
    verdicts = pool.score([early, late], ["34", "34"])
    assert verdicts == [NO_ANSWER, CORRECT]
    assert pool.score([early], ["34"], answer_tail_chars=None) == [CORRECT]
    batch = score_responses(
        pool, [early], ["34"], [1], max_response_tokens=10, overlong_buffer=None,
        answer_tail_chars=1000,
    )
    assert batch.correct == [True]


def test_refused_answers_never_reach_a_worker(pool):
    """Pathological answers among normal ones: the batch ends far below the timeout.

    Each pathological answer hangs the scripted verifier, so one that reached a worker
    would read "timeout" and hold the batch for TIMEOUT_S.
    """
    assert all(answer_too_complex(answer) for answer in PATHOLOGICAL)
    pool.wait_ready()
    normal = [  # (gold, prediction, verdict); all but "34" need math-verify
        ("\\frac{1}{2}", "0.5", CORRECT),
        ("34", "34", CORRECT),
        ("2\\sqrt{3}", "\\sqrt{12}", CORRECT),
        ("34", "35", WRONG),
    ]
    responses, answers, expected = [], [], []
    for index, answer in enumerate(PATHOLOGICAL):
        gold, prediction, verdict = normal[index % len(normal)]
        responses += [boxed(answer), boxed(prediction)]
        answers += ["34", gold]
        expected += [REFUSED, verdict]
    start = time.monotonic()
    verdicts = pool.score(responses, answers, answer_tail_chars=None)
    elapsed = time.monotonic() - start
    assert verdicts == expected
    assert elapsed < TIMEOUT_S / 2, elapsed  # a refused answer in a worker: >= TIMEOUT_S
    batch = score_responses(
        pool, responses, answers, [1] * len(responses), max_response_tokens=10,
        overlong_buffer=None, answer_tail_chars=None,
    )
    assert batch.counts["refused"] == len(PATHOLOGICAL) and batch.counts["timeout"] == 0
    assert batch.rewards == [1.0 if verdict.correct else -1.0 for verdict in expected]


def test_prediction_equal_to_the_gold_is_correct_before_the_guard(pool):
    tower = "2^{2^{2^{2^{2}}}}"
    assert pool.score([boxed(tower), boxed(tower + "+0")], [tower, tower]) == [CORRECT, REFUSED]


def test_score_responses_validates_inputs(pool):
    with pytest.raises(ValueError, match="lengths"):
        score_responses(pool, ["a"], ["a"], [], max_response_tokens=10, overlong_buffer=None)
    with pytest.raises(ValueError, match="truncated"):
        score_responses(
            pool, ["a"], ["a"], [1], max_response_tokens=10, overlong_buffer=None, truncated=[]
        )
    with pytest.raises(ValueError, match="buffer"):
        score_responses(pool, ["a"], ["a"], [1], max_response_tokens=10, overlong_buffer=11)
    with pytest.raises(ValueError, match="scheme='signd'.*'signed'.*'binary'"):
        score_responses(
            pool, ["a"], ["a"], [1], max_response_tokens=10, overlong_buffer=None, scheme="signd"
        )
    with pytest.raises(ValueError, match="tail_chars=0"):
        score_responses(
            pool, [], [], [], max_response_tokens=10, overlong_buffer=None, answer_tail_chars=0
        )


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
