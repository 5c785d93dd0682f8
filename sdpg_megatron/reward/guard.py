"""Refuse predicted answers that math-verify cannot decide cheaply.

The pool's per-answer timeout bounds any one verification, but a batch in which several
answers run into it waits `timeout_s` per wave, and the killed worker must re-import
math-verify (seconds). A model under RL finds such answers: sympy evaluates
`10^{10^{10}}` and `(100!)!` exactly, expands `(x+y+z)^{100}` into 176,851 terms, and the
LaTeX parser is exponential in nested braces (15 levels of `{...}`: 8 s). None of these
is how a competition answer is written, so `answer_too_complex` refuses them up front,
in the trainer process, without evaluating anything: one linear scan over at most
`MAX_ANSWER_CHARS` characters.

The thresholds leave wide margins around real data: all 5,100 answers of MATH-500,
OlympiadBench, Minerva-Math, GaoKao-2023-en, AIME 2024/2025 and AMC 2023 pass (longest
210 characters, deepest nesting 4, largest exponent 4 digits as in `2^{1009}`, longest
number 8 digits), and so do the 2,781 answers of CollegeMath up to 400 characters (the
37 longer ones are worked solutions, not answers). Measured with math-verify (seconds
per call, one worker): `2^{9999}` 0.5, `100000!` 0.5, `(x+1)^{500}` 0.7, 8 nested
braces 0.45, a 409-character sum 0.5 — all accepted; what is refused beyond them took
4 s or more, or ran past a 10–20 s timeout. Anything that slips through is still bounded
by the pool's timeout.

Only predictions are checked: gold answers come from the data set, and an answer equal
to the gold is accepted by the exact-match fast path before the guard is asked.
"""

from __future__ import annotations

import math
import re

# Longer than any competition answer (the longest in the sets above: 210 characters).
MAX_ANSWER_CHARS = 400
# Digits in one number: real answers reach 8, 2^64 has 20; Python refuses to convert
# more than 4,300 digits, which math-verify reports as an error.
MAX_NUMBER_DIGITS = 100
# Brackets of any kind open at once ({, (, [, \{): real answers reach 4 (CollegeMath 5);
# the LaTeX parser's time grows ~1.6x per level of braces (10: 0.7 s, 12: 1.7 s, 15: 8 s).
MAX_NESTING_DEPTH = 8
# Powers inside exponents: 2^{2^{n}} (depth 2) is real, 2^{2^{2^{n}}} is not.
MAX_POWER_DEPTH = 2
# Digits of an integer inside an exponent: 2^{2013} is real; 10^{100000000} never finishes.
MAX_EXPONENT_DIGITS = 4
# Terms of the expansion of (k symbols)^n, C(n + k, k): (x+1)^{500} (501) takes 0.7 s,
# (x+y+z)^{100} (176,851) and (1+\pi)^{2013} run past the timeout.
MAX_EXPANSION_TERMS = 600
# Digits of an integer under a factorial or a binomial: 100000! takes 0.5 s,
# 1000000! 4.4 s, \binom{100000000}{50000000} never finishes.
MAX_FACTORIAL_DIGITS = 5
# n!! is the double factorial; n!!! and beyond only read as factorials of factorials.
MAX_CONSECUTIVE_FACTORIALS = 2

# One token: a control word, a control symbol, a digit run, a whitespace run, or any
# other character. The alternatives start with different characters: no backtracking.
_TOKEN = re.compile(r"\\[A-Za-z]++|\\.|[0-9]++|\s++|.", re.DOTALL)
_OPENERS = frozenset({"{", "(", "[", "\\{", "\\langle", "\\lfloor", "\\lceil"})
_CLOSERS = frozenset({"}", ")", "]", "\\}", "\\rangle", "\\rfloor", "\\rceil"})
_BINOMIALS = frozenset({"\\binom", "\\dbinom", "\\tbinom"})
# Symbols that sympy keeps symbolic, so a power of a sum of them is expanded term by term.
_SYMBOL_COMMANDS = frozenset(
    "\\" + name
    for name in (
        "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa "
        "lambda mu nu xi pi varpi rho varrho sigma varsigma tau upsilon phi varphi chi "
        "psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega"
    ).split()
)
_DIGITS = re.compile(r"[0-9]+")
_ASCII_DIGITS = frozenset("0123456789")  # a token starting with one is a digit run
_SIGNED_INTEGER = re.compile(r"[+-]?([0-9]+)")


def answer_too_complex(answer: str) -> str | None:
    """Why math-verify could not decide `answer` cheaply, or None when it may verify it.

    Rules, each with its threshold constant above: a number longer than
    MAX_NUMBER_DIGITS; more than MAX_ANSWER_CHARS characters; brackets nested deeper than
    MAX_NESTING_DEPTH; power towers (powers nested deeper than MAX_POWER_DEPTH, chained
    superscripts `a^b^c`, or a power of numbers inside an exponent, `10^{10^{10}}`); an
    exponent integer longer than MAX_EXPONENT_DIGITS; a power of a bracketed expression
    of symbols whose expansion has more than MAX_EXPANSION_TERMS terms; factorial towers
    (a factorial of a factorial or of a numeric power, more than
    MAX_CONSECUTIVE_FACTORIALS `!` in a row); a factorial or binomial of an integer
    longer than MAX_FACTORIAL_DIGITS. Nothing is evaluated; time is linear in
    len(answer). The reason names the rule and its constant, for logs and tests.
    """
    longest = max((len(run) for run in _DIGITS.findall(answer)), default=0)
    if longest > MAX_NUMBER_DIGITS:
        return f"a {longest}-digit number (more than MAX_NUMBER_DIGITS={MAX_NUMBER_DIGITS})"
    if len(answer) > MAX_ANSWER_CHARS:
        return f"{len(answer)} characters (more than MAX_ANSWER_CHARS={MAX_ANSWER_CHARS})"
    scan = _Scan()
    for token in _TOKEN.findall(answer):
        if not token.isspace():
            reason = scan.feed(token)
            if reason is not None:
                return reason
    return None


class _Group:
    """One open bracket and what has been seen inside it, nested groups included."""

    __slots__ = ("is_exponent", "is_binomial_argument", "base_symbols", "symbols",
                 "longest_number", "has_power", "has_factorial", "content")

    def __init__(
        self, *, is_exponent: bool = False, is_binomial_argument: bool = False,
        base_symbols: int = 0,
    ) -> None:
        self.is_exponent = is_exponent
        self.is_binomial_argument = is_binomial_argument
        self.base_symbols = base_symbols  # for an exponent: the symbols in its base
        self.symbols = 0  # letters and Greek letters
        self.longest_number = 0  # digits
        self.has_power = False
        self.has_factorial = False
        self.content: list[str] = []  # its own tokens, whitespace excluded


class _Scan:
    """The state of `answer_too_complex` between tokens: open groups and the operand
    just completed, which a following `^` or `!` applies to."""

    def __init__(self) -> None:
        self.stack: list[_Group] = []
        self.exponent_depth = 0  # exponent groups on the stack
        self.awaiting_exponent = False  # the token after `^`
        self.exponent_base_symbols = 0
        self.binomial_arguments = 0  # braced arguments still expected after \binom
        self.binomial_depth = 0  # stack depth at which they are expected
        # The operand just completed: "number", "symbol", "group", "exponent",
        # "factorial" or "other"; with the number's digits or the closed group.
        self.previous = "other"
        self.previous_number = ""
        self.previous_group: _Group | None = None
        self.consecutive_factorials = 0

    def feed(self, token: str) -> str | None:
        if self.stack and token not in _CLOSERS:
            self.stack[-1].content.append(token)
        if self.binomial_arguments and len(self.stack) == self.binomial_depth and token != "{":
            self.binomial_arguments = 0  # `\binom` without braced arguments: nothing to track
        if self.awaiting_exponent:
            self.awaiting_exponent = False
            return self._exponent(token)
        if token == "^":
            return self._caret()
        if token == "!":
            return self._factorial()
        self.consecutive_factorials = 0
        if token in _OPENERS:
            is_argument = (
                token == "{" and self.binomial_arguments > 0
                and len(self.stack) == self.binomial_depth
            )
            self.binomial_arguments -= is_argument
            return self._open(_Group(is_binomial_argument=is_argument))
        if token in _CLOSERS:
            return self._close()
        if token in _BINOMIALS:
            self.binomial_arguments, self.binomial_depth = 2, len(self.stack)
            self.previous = "other"
        elif token[0] in _ASCII_DIGITS:
            for group in self.stack:
                group.longest_number = max(group.longest_number, len(token))
            if self.exponent_depth and len(token) > MAX_EXPONENT_DIGITS:
                before = self.stack[-1].content[-2:-1]
                if before not in ([","], ["."]):  # not the fraction part of a decimal
                    return self._huge_exponent(token)
            self.previous, self.previous_number = "number", token
        elif _is_symbol(token):
            for group in self.stack:
                group.symbols += 1
            self.previous = "symbol"
        else:
            self.previous = "other"
        return None

    def _caret(self) -> str | None:
        if self.previous == "exponent":
            return "chained superscripts (a^b^c): a power tower"
        if self.exponent_depth + 1 > MAX_POWER_DEPTH:
            return (
                f"powers nested more than MAX_POWER_DEPTH={MAX_POWER_DEPTH} deep: a power tower"
            )
        for group in self.stack:
            group.has_power = True
        base = self.previous_group if self.previous == "group" else None
        self.exponent_base_symbols = base.symbols if base is not None else 0
        self.awaiting_exponent = True
        self.consecutive_factorials = 0
        return None

    def _exponent(self, token: str) -> str | None:
        """The token after `^`: a bracket opens the exponent group; else it is the exponent."""
        if token in _OPENERS:
            # `(` too: in `10^(10^(10))` a plain-text reader takes the group as the exponent.
            self.exponent_depth += 1
            return self._open(_Group(is_exponent=True, base_symbols=self.exponent_base_symbols))
        self.previous = "exponent"
        self.previous_group = None
        if token[0] in _ASCII_DIGITS:
            if len(token) > MAX_EXPONENT_DIGITS:
                return self._huge_exponent(token)
            return _expansion(self.exponent_base_symbols, int(token))
        if _is_symbol(token):
            for group in self.stack:
                group.symbols += 1
        return None

    def _factorial(self) -> str | None:
        self.consecutive_factorials += 1
        if self.consecutive_factorials > MAX_CONSECUTIVE_FACTORIALS:
            return (
                f"more than MAX_CONSECUTIVE_FACTORIALS={MAX_CONSECUTIVE_FACTORIALS} '!' in a "
                "row: a factorial tower"
            )
        if self.consecutive_factorials == 1:
            reason = self._factorial_argument()
            if reason is not None:
                return reason
        for group in self.stack:
            group.has_factorial = True
        self.previous = "factorial"
        return None

    def _factorial_argument(self) -> str | None:
        """Refusal for what a first `!` applies to: a number, a bracket group or a power."""
        if self.previous == "number":
            digits = len(self.previous_number)
            return self._huge_factorial(digits) if digits > MAX_FACTORIAL_DIGITS else None
        argument = self.previous_group if self.previous in ("group", "exponent") else None
        if argument is None:
            return None
        if argument.has_factorial:
            return "a factorial of a factorial: a factorial tower"
        if argument.symbols:
            return None  # (2n)!, (n^2)!: sympy keeps a symbolic factorial unevaluated
        if argument.has_power or argument.is_exponent:
            return "a factorial of a power of numbers: a factorial tower"
        if argument.longest_number > MAX_FACTORIAL_DIGITS:
            return self._huge_factorial(argument.longest_number)
        return None

    def _open(self, group: _Group) -> str | None:
        self.stack.append(group)
        self.previous = "other"
        if len(self.stack) > MAX_NESTING_DEPTH:
            return f"brackets nested more than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH} deep"
        return None

    def _close(self) -> str | None:
        if not self.stack:
            self.previous = "other"  # an unmatched closer, e.g. in prose: nothing to track
            return None
        group = self.stack.pop()
        self.previous, self.previous_group = "group", group
        if group.is_binomial_argument and group.longest_number > MAX_FACTORIAL_DIGITS:
            return self._huge_factorial(group.longest_number)
        if not group.is_exponent:
            return None
        self.exponent_depth -= 1
        self.previous = "exponent"
        if group.has_power and group.symbols == 0:
            return "a power of numbers inside an exponent (10^{10^{10}}): a power tower"
        integer = _SIGNED_INTEGER.fullmatch("".join(group.content))
        return _expansion(group.base_symbols, int(integer.group(1))) if integer else None

    @staticmethod
    def _huge_exponent(digits: str) -> str:
        return (
            f"a {len(digits)}-digit exponent (more than MAX_EXPONENT_DIGITS="
            f"{MAX_EXPONENT_DIGITS})"
        )

    @staticmethod
    def _huge_factorial(digits: int) -> str:
        return (
            f"a factorial or binomial of a {digits}-digit number (more than "
            f"MAX_FACTORIAL_DIGITS={MAX_FACTORIAL_DIGITS})"
        )


def _is_symbol(token: str) -> bool:
    """A Latin letter or a Greek one: what sympy keeps as a symbol (e, i and pi included)."""
    return (len(token) == 1 and token.isascii() and token.isalpha()) or token in _SYMBOL_COMMANDS


def _expansion(base_symbols: int, exponent: int) -> str | None:
    """Refusal when (a bracketed expression of `base_symbols` symbols)^exponent would
    expand into more than MAX_EXPANSION_TERMS monomials, C(exponent + k, k)."""
    if base_symbols == 0:
        return None
    terms = math.comb(exponent + base_symbols, base_symbols)
    if terms <= MAX_EXPANSION_TERMS:
        return None
    return (
        f"a power {exponent} of a bracketed expression of {base_symbols} symbol(s), "
        f"{terms} terms expanded (more than MAX_EXPANSION_TERMS={MAX_EXPANSION_TERMS})"
    )
