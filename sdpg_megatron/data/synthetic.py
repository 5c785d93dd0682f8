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


def column_addition_problems(num: int, seed: int, *, digits: int = 4) -> list[Problem]:
    """`num` distinct problems "What is a + b?" with a and b of exactly `digits` digits,
    deterministic in (seed, digits). The worked solution adds column by column from the
    right, carrying, one line per column, then boxes the sum:

        What is 4738 + 2965?   →   8+5=13 / 3+6+1=10 / 7+9+1=17 / 4+2+1=7 / \\boxed{7703}

    (one line each). Every line is a chain of decisions the next depends on, and the
    reward is all or nothing on the boxed sum: many decision tokens, a sparse reward.
    The space has (9·10^(digits−1))² problems (81 million at 4 digits): a training file of
    a few thousand repeats none within a run, and held-out problems are plentiful.

    Raises:
        ValueError: digits < 1, or num exceeds the distinct problems.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low = 10 ** (digits - 1) if digits > 1 else 0  # one digit: 0..9
    count = 10**digits - low
    if not 0 <= num <= count * count:
        raise ValueError(f"num={num}: {digits}-digit operands give {count * count} distinct problems; lower num")
    rng = random.Random(f"column-addition:{digits}:{seed}")
    problems = []
    for k, flat_index in enumerate(rng.sample(range(count * count), num)):
        a, b = low + flat_index // count, low + flat_index % count
        answer = str(a + b)
        problems.append(Problem(
            uid=f"columns{digits}-{seed}-{k}", question=f"What is {a} + {b}?", answer=answer,
            solution="\n".join(column_steps(a, b)) + f"\n\\boxed{{{answer}}}", data_source="synthetic-columns",
        ))
    return problems


def column_steps(a: int, b: int) -> list[str]:
    """The column sums of a + b from the right: "8+5=13", then "3+6+1=10" with the carry."""
    steps, carry = [], 0
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    for column in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[column]) if column < len(digits_a) else 0
        y = int(digits_b[column]) if column < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def sft_examples(problems: Sequence[Problem], *, with_solution: bool = False) -> list[tuple[str, str]]:
    """(user content, assistant target) pairs: the student and the teacher view of each.

    The target is the problem's worked solution; the teacher view carries the answer-only
    context, or with `with_solution` the answer and the worked solution
    (data.privileged="answer+solution"), as the SDPG teacher sees it during training.
    """
    examples = []
    for problem in problems:
        if problem.solution is None:
            raise ValueError(f"problem {problem.uid!r} has no solution to use as SFT target")
        examples.append((student_content(problem.question), problem.solution))
        context = problem.solution if with_solution else None
        examples.append((teacher_content(problem.question, problem.answer, context), problem.solution))
    return examples
