"""Answer extraction, a conservative normal form, and DAPO's overlong penalty.

The final answer is the last `\\boxed{}` in the answer region's last
`DEFAULT_ANSWER_TAIL_CHARS` characters, as in the authors' scorer (`compute_score_boxed`
in their verl fork); with thinking on, the answer region is what follows `</think>`.

Everything here runs in the trainer process on untrusted model output, so every function
is linear in the input length: a hand-written brace scanner instead of a recursive
regex, and tokenising regexes whose alternatives cannot backtrack into each other.
Nothing is evaluated; `normalize_answer` only rewrites spelling.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# Qwen3 with enable_thinking=True writes "<think>...</think>" and then the answer.
THINK_END = "</think>"
# The authors read the answer from a response's last 500 characters.
DEFAULT_ANSWER_TAIL_CHARS = 500

# One LaTeX token: a control word, a control symbol (backslash + any one character),
# a whitespace run, or any other single character.
_LATEX_TOKEN = re.compile(r"\\[A-Za-z]++|\\.|\s++|.", re.DOTALL)
# Inside a braced group only braces and escapes matter; everything else is skipped by
# the regex engine in one go.
_BRACE_EVENT = re.compile(r"\\.|[{}]", re.DOTALL)
_SINGLE_TOKEN = re.compile(r"[^\s$]++")

# Tokens that only change typesetting, never the value.
_DROPPED_TOKENS = frozenset(
    {"\\!", "\\,", "\\;", "\\:", "\\ ", "$", "\\left", "\\right", "\\displaystyle"}
)
_TEXT_COMMANDS = frozenset(
    {"\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mbox", "\\operatorname"}
)
_RENAMED_TOKENS = {"\\dfrac": "\\frac", "\\tfrac": "\\frac"}
_INTEGER_WITH_ZERO_FRACTION = re.compile(r"([+-]?\d++)\.0++")


def answer_region(
    response: str, *, thinking: bool, tail_chars: int | None = DEFAULT_ANSWER_TAIL_CHARS
) -> str | None:
    """The part of `response` in which the final answer is looked for; None if it has none.

    With `thinking`, only the text after the last `</think>` is the answer: a box inside
    the reasoning is a draft, not an answer, and a response cut off before `</think>`
    (no `</think>` at all) never answered — None, which the verifier scores as
    "unfinished_thinking". Without `thinking` the whole response is the region. Either
    way only the region's last `tail_chars` characters are returned (None: all of it),
    so a box must start there to count: the authors' rule, which also keeps an early
    box in a rambling response from being taken as its answer.
    """
    if tail_chars is not None and (
        isinstance(tail_chars, bool) or not isinstance(tail_chars, int) or tail_chars < 1
    ):
        raise ValueError(
            f"answer tail_chars={tail_chars!r} must be a positive number of characters, or "
            "None to read the whole answer region"
        )
    if thinking:
        end = response.rfind(THINK_END)
        if end < 0:
            return None
        response = response[end + len(THINK_END) :]
    return response if tail_chars is None else response[-tail_chars:]


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`.

    Nested braces are balanced; escaped braces (`\\{`, `\\}`) do not count. `\\boxed 42`
    (a space, then one token up to whitespace or `$`) is accepted too. Returns None when
    there is no box, or when the last box never closes — an earlier complete box is then
    ignored, since the model's final answer is the last one it started.
    """
    # Each command's rightmost unexamined occurrence; only the one examined is searched
    # again, so every character is scanned once per command name.
    last_seen = {command: text.rfind(command) for command in _BOX_COMMANDS}
    while True:
        command = max(last_seen, key=last_seen.__getitem__)
        start = last_seen[command]
        if start < 0:
            return None
        content = _box_content(text, start + len(command))
        if content is not _NOT_A_BOX:
            return content
        # e.g. `\boxedfoo`: a different control word; keep looking further left.
        last_seen[command] = text.rfind(command, 0, start)


_NOT_A_BOX = object()


def _box_content(text: str, pos: int):
    """Argument of a box command whose name ends at `pos`; None if it never closes."""
    after_name = pos
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos < len(text) and text[pos] == "{":
        return _balanced_group(text, pos)
    if pos == after_name:
        return _NOT_A_BOX
    token = _SINGLE_TOKEN.match(text, pos)
    return token.group(0) if token else None


def _balanced_group(text: str, open_pos: int) -> str | None:
    depth = 0
    for event in _BRACE_EVENT.finditer(text, open_pos):
        brace = event.group(0)
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : event.start()]
    return None


def normalize_answer(answer: str) -> str:
    """A light canonical spelling for the exact-match fast path.

    Removes whitespace, `$`, `\\left`/`\\right`, `\\displaystyle` and thin spaces, maps
    `\\dfrac`/`\\tfrac` to `\\frac`, drops one trailing period and a leading `+`, and
    writes an integer with a zero fractional part (`12.00`) as the integer. Every rewrite
    preserves the value, so equal normal forms mean equal answers; unequal normal forms
    mean nothing (the caller then asks math-verify). A space is kept where removing it
    would merge a control word with the following letters (`\\pi r` is not `\\pir`),
    and inside `\\text{...}` whitespace runs collapse to one space instead.
    """
    kept: list[str] = []
    separated = False  # a dropped token sat between kept[-1] and the next token
    text_depth = 0  # brace depth inside the argument of \text{...} and friends
    awaiting_text_argument = False
    for token in _LATEX_TOKEN.findall(answer):
        if text_depth:
            # Text mode: spaces separate words, so they are collapsed, not removed.
            text_depth += (token == "{") - (token == "}")
            kept.append(" " if token.isspace() else token)
            continue
        if token.isspace() or token in _DROPPED_TOKENS:
            separated = True
            continue
        token = _RENAMED_TOKENS.get(token, token)
        if separated and kept and _is_control_word(kept[-1]) and token[0].isalpha():
            kept.append(" ")
        kept.append(token)
        separated = False
        if awaiting_text_argument and token == "{":
            text_depth = 1
        awaiting_text_argument = token in _TEXT_COMMANDS
    if len(kept) > 1 and kept[-1] == "." and kept[-2] != ".":
        kept.pop()
    if len(kept) > 1 and kept[0] == "+":
        kept.pop(0)
    normalized = "".join(kept)
    integer = _INTEGER_WITH_ZERO_FRACTION.fullmatch(normalized)
    return integer.group(1) if integer else normalized


def _is_control_word(token: str) -> bool:
    return len(token) > 1 and token[0] == "\\" and token[1].isalpha()


def overlong_penalty(length: int, max_length: int, buffer: int = 512) -> float:
    """DAPO's soft overlong penalty: min(−(L − (L_max − buffer)) / buffer, 0).

    0 while length ≤ max_length − buffer, then linear down to −1 at length = max_length.
    """
    if buffer <= 0:
        raise ValueError(f"overlong buffer={buffer} must be positive")
    if buffer > max_length:
        raise ValueError(
            f"overlong buffer={buffer} exceeds max_length={max_length}; use a buffer "
            "no larger than the maximum response length"
        )
    if length < 0:
        raise ValueError(f"response length={length} must be non-negative")
    excess = length - (max_length - buffer)
    return -excess / buffer if excess > 0 else 0.0
