"""Student and teacher prompts (docs/method.md, "Data") and their chat-template encoding.

The student sees only the problem; the teacher sees the same text followed by a blank
line and the privileged context. Both are rendered with the model's chat template with
the generation prompt appended, so the response tokens are identical in both views and
only the prefix differs. A teacher prompt is never truncated: a truncated one would lose
the assistant header, so `encode_problem` raises and the caller skips the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sdpg_megatron.data.dapo import Problem

Privileged = Literal["answer", "answer+solution", "none"]
PRIVILEGED_CHOICES: tuple[str, ...] = ("answer", "answer+solution", "none")

STUDENT_PREFIX = (
    "Solve the following math problem step by step. Present your final answer inside "
    "\\boxed{}, for example \\boxed{42}."
)
STUDENT_SUFFIX = "Remember to put your final answer inside \\boxed{}."

ANSWER_CONTEXT = (
    "The correct answer to this problem is: {answer}\n"
    "Use this to verify your reasoning, but show your full solution process."
)

# Fig. 4's answer+solution context, character for character: three lines, the first and
# the last each one line (tests/test_data.py pins it).
SOLUTION_CONTEXT = (
    "[Hint] The correct answer is {answer}. A common way to solve this is:\n"
    "{solution}\n"
    "[Instruction] If possible, derive the answer {answer} using an alternative, equally "
    "rigorous mathematical approach (e.g., algebraic vs geometric, or different "
    "substitution). If no alternative exists, articulate the standard approach with "
    "exceptional clarity. Do NOT state that you were given the answer or reference."
)


def _fixed_text(template: str) -> list[str]:
    import string

    return [literal for literal, *_ in string.Formatter().parse(template)]


# The templates' fixed text (the student's two lines whole, the contexts' text between
# their placeholders), longest first: the phrases the embedded demo's tokenizer holds as
# single tokens (data.build_char_tokenizer's `phrases`).
TEMPLATE_PHRASES: tuple[str, ...] = tuple(sorted(
    {STUDENT_PREFIX, STUDENT_SUFFIX} | {piece for template in (ANSWER_CONTEXT, SOLUTION_CONTEXT)
                                        for piece in _fixed_text(template) if len(piece) >= 8},
    key=lambda piece: (-len(piece), piece)))


class PromptTooLongError(ValueError):
    """A student or teacher prompt exceeds `max_prompt_tokens`; skip the problem."""


def student_content(question: str) -> str:
    """The user message the student (and the evaluator) sees."""
    return f"{STUDENT_PREFIX}\n\n{question}\n\n{STUDENT_SUFFIX}"


def teacher_content(question: str, answer: str, solution: str | None = None) -> str:
    """Student content, a blank line, then the answer-only or answer+solution context."""
    if solution is None:
        context = ANSWER_CONTEXT.format(answer=answer)
    else:
        context = SOLUTION_CONTEXT.format(answer=answer, solution=solution.strip())
    return f"{student_content(question)}\n\n{context}"


def template_supports_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads `enable_thinking` (Qwen3's does).

    A plain substring test on the template source: Jinja ignores unknown variables, so a
    template that never names the flag renders the same with or without it, and passing
    it there would only hide that the switch has no effect.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = " ".join(str(t) for t in template.values())
    return template is not None and "enable_thinking" in str(template)


def _as_token_ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list, a BatchEncoding or a tensor."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if isinstance(encoded, Sequence) and len(encoded) > 0 and isinstance(encoded[0], Sequence):
        if len(encoded) != 1:
            raise ValueError(f"expected one rendered conversation, got {len(encoded)}")
        encoded = encoded[0]
    return [int(token_id) for token_id in encoded]


def render_prompt(tokenizer: Any, content: str, *, enable_thinking: bool) -> list[int]:
    """Token ids of one user message under the chat template, generation prompt appended.

    enable_thinking is passed through to templates that know the flag (Qwen3's): True ends
    the prompt at the assistant header, so the model opens its own <think> block; False
    makes Qwen3's template append an empty "<think>\n\n</think>\n\n" block, so the model
    answers directly. Templates that never mention it (the project's character tokenizer)
    are called without it and render the same prompt for both values. The flag is
    required, not defaulted: student, teacher and evaluation prompts must agree on it, and
    a silent default would let one caller drift from the others.
    """
    kwargs: dict[str, Any] = {}
    if template_supports_thinking(tokenizer):
        kwargs["enable_thinking"] = bool(enable_thinking)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        **kwargs,
    )
    return _as_token_ids(encoded)


@dataclass
class EncodedPrompt:
    student_ids: list[int]
    teacher_ids: list[int]


def encode_problem(
    tokenizer: Any,
    problem: Problem,
    *,
    max_prompt_tokens: int,
    enable_thinking: bool,
    privileged: Privileged = "answer",
    context_from: Problem | None = None,
) -> EncodedPrompt:
    """Render both views of one problem.

    enable_thinking: see `render_prompt`; both views use the same value, so the response
    tokens follow the same assistant prefix in both.

    privileged: "answer" (answer-only context), "answer+solution" (falls back to
    "answer" when the problem has no reference solution) or "none" (the teacher sees
    the student prompt: teacher_ids == student_ids).

    context_from: the problem whose answer (and solution) the teacher's context holds;
    None: `problem` itself (data.privileged_from="other" passes another one: a control).

    Raises:
        PromptTooLongError: either prompt is longer than max_prompt_tokens.
    """
    if privileged not in PRIVILEGED_CHOICES:
        raise ValueError(f"privileged={privileged!r}; choose one of {PRIVILEGED_CHOICES}")
    student_ids = render_prompt(
        tokenizer, student_content(problem.question), enable_thinking=enable_thinking
    )
    _check_length("student", problem.uid, len(student_ids), max_prompt_tokens)
    if privileged == "none":
        return EncodedPrompt(student_ids=student_ids, teacher_ids=list(student_ids))
    source = problem if context_from is None else context_from
    solution = source.solution if privileged == "answer+solution" else None
    teacher_ids = render_prompt(
        tokenizer,
        teacher_content(problem.question, source.answer, solution),
        enable_thinking=enable_thinking,
    )
    _check_length("teacher", problem.uid, len(teacher_ids), max_prompt_tokens)
    return EncodedPrompt(student_ids=student_ids, teacher_ids=teacher_ids)


def _check_length(view: str, uid: str, num_tokens: int, max_prompt_tokens: int) -> None:
    if num_tokens > max_prompt_tokens:
        raise PromptTooLongError(
            f"problem {uid!r}: {view} prompt has {num_tokens} tokens, over "
            f"max_prompt_tokens={max_prompt_tokens}; skip it or raise the limit"
        )
