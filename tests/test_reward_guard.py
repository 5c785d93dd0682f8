"""The guard that refuses predicted answers too costly for math-verify (pure, no pool).

Each rule is tested three ways: a pathological answer of its kind is refused with a
reason that names the rule's constant, the answer one step inside the threshold passes,
and real competition answers — the extremes of MATH-500, OlympiadBench, Minerva-Math,
GaoKao and AIME/AMC by length, nesting, exponent and digits — all pass. The batch-level
behaviour (refused answers never reach a worker) is in tests/test_reward.py.
"""

from __future__ import annotations

import random
import time

import pytest

from sdpg_megatron.reward import answer_too_complex
from sdpg_megatron.reward.guard import (
    MAX_ANSWER_CHARS,
    MAX_CONSECUTIVE_FACTORIALS,
    MAX_EXPANSION_TERMS,
    MAX_EXPONENT_DIGITS,
    MAX_FACTORIAL_DIGITS,
    MAX_NESTING_DEPTH,
    MAX_NUMBER_DIGITS,
    MAX_POWER_DEPTH,
)

REAL_ANSWERS = [
    # The brief's examples and everyday forms.
    "\\frac{1}{2}",
    "2^{10}",
    "3\\sqrt{2}",
    "\\left(\\frac{3}{4}\\right)^{2}",
    "(0, 1]",
    "[-2, \\infty)",
    "(1, 2, 3)",
    "123456",
    "\\binom{10}{3}",
    "\\dbinom{2023}{2}",
    "-\\frac{\\sqrt{3}}{2}",
    "90^\\circ",
    "\\text{Evelyn}",
    "x^2+y^2=1",
    "6 - 5i",
    "e^{-x^2/2}",
    "\\sqrt{2+\\sqrt{2+\\sqrt{2}}}",
    "\\frac{1}{1+\\frac{1}{1+\\frac{1}{2}}}",
    "1\\!000\\!000",
    "0.000123456",
    # Extremes of the benchmark answers (see guard.py's docstring).
    "\\omega_{n}^{2} e^{-\\zeta \\omega_{n} t} \\cos \\left(\\omega_{n} \\sqrt{1-\\zeta^{2}} t"
    "\\right)-\\frac{\\zeta \\omega_{n}^{2}}{\\sqrt{1-\\zeta^{2}}} e^{-\\zeta \\omega_{n} t} "
    "\\sin \\left(\\omega_{n} \\sqrt{1-\\zeta^{2}} t\\right)",  # longest: 210 characters
    "(0,1,1),(0,-1,-1),(1,0,1),(-1,0,-1),(1,1,0)$,$(-1,-1,0),\\left(\\frac{1}{\\sqrt{3}}, "
    "\\frac{1}{\\sqrt{3}}, \\frac{1}{\\sqrt{3}}\\right)$,$\\left(-\\frac{1}{\\sqrt{3}},"
    "-\\frac{1}{\\sqrt{3}},-\\frac{1}{\\sqrt{3}}\\right)",
    "\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[e^{h c /(\\lambda k T)}-1\\right] d^{2}}",
    "$8(\\sqrt[10]{2^{7}})$",
    "\\frac{v_{0}}{r_{0}} \\frac{1}{\\left(1+r / r_{0}\\right)^{3 / 2}}",
    "\\frac{\\omega_{d}}{(s+\\sigma)^{2}+\\omega_{d}^{2}}",
    "10^{100}$,$10^{1 / 100}",
    "2^{1009}",
    "\\frac{2^{2013}-1}{3}",
    "10112369",
    "\\frac{100!}{2^{50}}",
    "\\frac{d !}{2 k(d-k) !}",
    "\\binom{2n}{n}",
    "(-\\infty, 0)\\cup(0,1)\\cup(1,+\\infty)",
    "$\\{x|x=3k,k\\in \\mathbb{Z}\\}$",
    "\\begin{pmatrix} 16/49 \\\\ 48/49 \\\\ 24/49 \\end{pmatrix}",
    # Forms next to the rules: a double power, factorials, symbolic powers.
    "2^{2^{n}}",
    "e^{x^{2}}",
    "(2n)!",
    "(n^2)!",
    "(n!)^{n}",
    "15!!",
    "2024!",
    "x^{2013}",
    "(1+\\sqrt{2})^{2013}",
    "\\left(\\frac{1}{2}\\right)^{2013}",
    "(x+1)^{10}",
    "(a+b)^{2}",
]


@pytest.mark.parametrize("answer", REAL_ANSWERS)
def test_real_answers_pass(answer):
    assert answer_too_complex(answer) is None


@pytest.mark.parametrize(
    ("answer", "rule"),
    [
        # power towers
        ("2^{2^{2^{2^{2}}}}", "MAX_POWER_DEPTH"),
        ("2^{2^{2^{n}}}", "MAX_POWER_DEPTH"),
        ("10^10^10^10", "chained superscripts"),
        ("a^{b}^{c}", "chained superscripts"),
        ("10^{10^{10}}", "power of numbers inside an exponent"),
        ("10^(10^(10))", "power of numbers inside an exponent"),
        ("10^{100000000}", "MAX_EXPONENT_DIGITS"),
        ("2^{-123456}", "MAX_EXPONENT_DIGITS"),
        ("7^123456", "MAX_EXPONENT_DIGITS"),
        # expansions
        ("(x+y+z)^{100}", "MAX_EXPANSION_TERMS"),
        ("(a+b+c+d)^{50}", "MAX_EXPANSION_TERMS"),
        ("(1+i)^{2013}", "MAX_EXPANSION_TERMS"),
        ("\\left(1+\\pi\\right)^{2013}", "MAX_EXPANSION_TERMS"),
        # factorial towers and huge factorials
        ("(100!)!", "factorial of a factorial"),
        ("\\left(10!\\right)!", "factorial of a factorial"),
        ("5!!!", "MAX_CONSECUTIVE_FACTORIALS"),
        ("(10^{6})!", "factorial of a power of numbers"),
        ("10^{6}!", "factorial of a power of numbers"),
        ("1000000!", "MAX_FACTORIAL_DIGITS"),
        ("(1000000)!", "MAX_FACTORIAL_DIGITS"),
        ("\\binom{100000000}{50000000}", "MAX_FACTORIAL_DIGITS"),
        # giant expressions and numbers
        ("1" * 10_000, "MAX_NUMBER_DIGITS"),
        ("3." + "1" * 200, "MAX_NUMBER_DIGITS"),
        ("+".join(["x"] * 300), "MAX_ANSWER_CHARS"),
        # deep nesting
        ("\\frac{1}{" * 30 + "2" + "}" * 30, "MAX_NESTING_DEPTH"),
        ("(" * 60 + "x" + ")" * 60, "MAX_NESTING_DEPTH"),
        ("{" * 15 + "x" + "}" * 15, "MAX_NESTING_DEPTH"),
        ("\\sqrt{" * 12 + "2" + "}" * 12, "MAX_NESTING_DEPTH"),
    ],
)
def test_pathological_answers_are_refused(answer, rule):
    reason = answer_too_complex(answer)
    assert reason is not None and rule in reason, reason


def test_thresholds_are_the_boundaries():
    """One step inside each threshold passes, one step outside is refused."""
    cases = [
        ("1" * MAX_NUMBER_DIGITS, "1" * (MAX_NUMBER_DIGITS + 1)),
        ("x" * MAX_ANSWER_CHARS, "x" * (MAX_ANSWER_CHARS + 1)),
        (
            "(" * MAX_NESTING_DEPTH + "x" + ")" * MAX_NESTING_DEPTH,
            "[" * (MAX_NESTING_DEPTH + 1) + "x" + "]" * (MAX_NESTING_DEPTH + 1),
        ),
        (
            "x^{" * MAX_POWER_DEPTH + "n" + "}" * MAX_POWER_DEPTH,
            "x^{" * (MAX_POWER_DEPTH + 1) + "n" + "}" * (MAX_POWER_DEPTH + 1),
        ),
        ("2^{" + "9" * MAX_EXPONENT_DIGITS + "}", "2^{1" + "0" * MAX_EXPONENT_DIGITS + "}"),
        # (x+1)^n expands into n + 1 terms.
        (f"(x+1)^{{{MAX_EXPANSION_TERMS - 1}}}", f"(x+1)^{{{MAX_EXPANSION_TERMS}}}"),
        ("9" * MAX_FACTORIAL_DIGITS + "!", "1" + "0" * MAX_FACTORIAL_DIGITS + "!"),
        ("7" + "!" * MAX_CONSECUTIVE_FACTORIALS, "7" + "!" * (MAX_CONSECUTIVE_FACTORIALS + 1)),
    ]
    for inside, outside in cases:
        assert answer_too_complex(inside) is None, inside
        assert answer_too_complex(outside) is not None, outside


def test_escaped_and_text_characters_are_not_operators():
    assert answer_too_complex("1\\!000\\!000\\!000") is None  # thin spaces, not factorials
    assert answer_too_complex("\\{\\{\\{1\\}\\}\\}") is None
    assert answer_too_complex("e^{0.123456789}") is None  # decimals in an exponent


def test_scan_never_raises_and_is_fast_on_token_soup():
    """Unbalanced, mismatched, truncated input: a reason or None, never an exception."""
    pieces = ["{", "}", "(", ")", "[", "]", "\\{", "\\}", "^", "_", "!", "12", "99999",
              "x", "\\pi", "\\frac", "\\binom", "\\left(", "\\right)", "+", " ", ".", "²"]
    rng = random.Random(0)
    start = time.perf_counter()
    outcomes = set()
    for _ in range(3000):
        answer = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        reason = answer_too_complex(answer)
        assert reason is None or isinstance(reason, str)
        outcomes.add(reason is None)
    assert outcomes == {True, False}
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "adversarial",
    ["{" * 1_000_000, "^" * 1_000_000, "1" * 1_000_000, "!" * 1_000_000, "x^{" * 300_000],
)
def test_guard_is_linear_on_huge_input(adversarial):
    start = time.perf_counter()
    assert answer_too_complex(adversarial) is not None
    assert time.perf_counter() - start < 1.0
