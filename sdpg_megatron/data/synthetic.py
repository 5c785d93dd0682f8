"""A synthetic arithmetic task small enough for a tiny character-level model.

Problems are "What is a + b?" over operands 0..max_operand. Subtraction is drawn with
a >= b, so every answer is a non-negative integer and the verifier sees only digits.
The worked solution ("47 + 38 = 85.\\n\\boxed{85}") is the supervised target of a warm
start; `sft_examples` pairs it with both the student and the teacher prompt so the
warm-started model has already seen the privileged answer in its context.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from sdpg_megatron.data.dapo import Problem
from sdpg_megatron.data.templates import student_content, teacher_content

SUPPORTED_OPS = "+-*"
DATA_SOURCE = "synthetic-arithmetic"


def _num_pairs(op: str, max_operand: int) -> int:
    size = max_operand + 1
    return size * (size + 1) // 2 if op == "-" else size * size


def _pair(op: str, k: int, max_operand: int) -> tuple[int, int]:
    """The k-th operand pair of op, without listing the others."""
    if op == "-":  # pairs with b <= a, row a holding a + 1 of them
        a = (math.isqrt(8 * k + 1) - 1) // 2
        return a, k - a * (a + 1) // 2
    return divmod(k, max_operand + 1)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_problems(
    num: int, seed: int, *, max_operand: int = 99, ops: str = "+-"
) -> list[Problem]:
    """`num` distinct problems, deterministic in (seed, max_operand, ops).

    ops: any of "+", "-", "*"; operands are drawn from 0..max_operand, subtraction with
    a >= b. The problem space is sampled without replacement.

    Raises:
        ValueError: bad ops or max_operand, or num exceeds the distinct problems.
    """
    if not ops or any(op not in SUPPORTED_OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops={ops!r}: use distinct characters from {SUPPORTED_OPS!r}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    sizes = [_num_pairs(op, max_operand) for op in ops]
    if not 0 <= num <= sum(sizes):
        raise ValueError(
            f"num={num}: ops={ops!r} with max_operand={max_operand} give {sum(sizes)} "
            "distinct problems; lower num or raise max_operand"
        )
    rng = random.Random(f"arithmetic:{seed}")
    problems = []
    for k, flat_index in enumerate(rng.sample(range(sum(sizes)), num)):
        for op, size in zip(ops, sizes):
            if flat_index < size:
                break
            flat_index -= size
        a, b = _pair(op, flat_index, max_operand)
        answer = str(_apply(op, a, b))
        problems.append(
            Problem(
                uid=f"arith-{seed}-{k}",
                question=f"What is {a} {op} {b}?",
                answer=answer,
                solution=f"{a} {op} {b} = {answer}.\n\\boxed{{{answer}}}",
                data_source=DATA_SOURCE,
            )
        )
    return problems


def sft_examples(problems: Sequence[Problem]) -> list[tuple[str, str]]:
    """(user content, assistant target) pairs: the student and the teacher view of each.

    The target is the problem's worked solution; the teacher view carries the
    answer-only context, as the SDPG teacher does during training.
    """
    examples = []
    for problem in problems:
        if problem.solution is None:
            raise ValueError(f"problem {problem.uid!r} has no solution to use as SFT target")
        examples.append((student_content(problem.question), problem.solution))
        examples.append(
            (teacher_content(problem.question, problem.answer), problem.solution)
        )
    return examples
