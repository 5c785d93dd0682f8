"""DAPO-Math-17k parquet files: load, de-duplicate, sample, write.

Rows follow the DAPO-Math-17k schema: `data_source`, `prompt` (a list of chat messages),
`ability`, `reward_model = {ground_truth, style}`, `extra_info` (may hold `index` and
`solution`). The public release repeats every problem ~100 times and the eval files
repeat every problem 32 times, so loading de-duplicates on (question, answer).

The question is recovered from the user message by stripping the prompt wrapper it was
stored with: DAPO's "Answer:" format or this project's boxed format (templates.py),
tolerant of whitespace differences. Training and evaluation re-render it in the boxed
format; the stored wrapper is never shown to the model.

Bad rows (no user message, empty question, no ground truth) are skipped and reported,
never raised: one broken row must not stop a 1.8M-row load.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from sdpg_megatron.data.templates import STUDENT_PREFIX, STUDENT_SUFFIX, student_content
from sdpg_megatron.fsio import fsync_dir

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
    "problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'

REQUIRED_COLUMNS = ("prompt", "reward_model")
MAX_INVALID_REASONS = 20


@dataclass(frozen=True)
class Problem:
    uid: str
    question: str
    answer: str
    solution: str | None = None
    data_source: str = ""


@dataclass
class DatasetReport:
    problems: list[Problem]
    num_rows: int
    num_duplicates: int
    num_invalid: int
    invalid: list[str] = field(default_factory=list)  # the first MAX_INVALID_REASONS reasons


def _whitespace_tolerant(text: str) -> str:
    return r"\s+".join(re.escape(word) for word in text.split())


# (prefix, suffix) patterns of the wrappers a stored user message may carry.
_WRAPPERS = [
    (
        re.compile(r"\A\s*" + _whitespace_tolerant(prefix) + r"\s*"),
        re.compile(r"\s*" + _whitespace_tolerant(suffix) + r"\s*\Z"),
    )
    for prefix, suffix in ((DAPO_PREFIX, DAPO_SUFFIX), (STUDENT_PREFIX, STUDENT_SUFFIX))
]


_EXACT_WRAPPERS = [(f"{DAPO_PREFIX}\n\n", f"\n\n{DAPO_SUFFIX}"),
                   (f"{STUDENT_PREFIX}\n\n", f"\n\n{STUDENT_SUFFIX}")]


def extract_question(content: str) -> str:
    """The raw problem inside a DAPO "Answer:" or boxed prompt; else the stripped content."""
    for prefix, suffix in _EXACT_WRAPPERS:  # fast path: the regexes cost ~10 us a row
        if content.startswith(prefix) and content.endswith(suffix):
            return content[len(prefix): len(content) - len(suffix)].strip()
    for prefix, suffix in _WRAPPERS:
        stripped = suffix.sub("", prefix.sub("", content, count=1), count=1)
        if stripped != content:
            return stripped.strip()
    return content.strip()


def _user_content(prompt: Any) -> str | None:
    if not prompt:
        return None
    for message in reversed(list(prompt)):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


_Parsed = tuple[str, str, str | None, str | None, str]  # question, answer, solution, index, source


def _row_problem(
    row: int, data_source: Any, prompt: Any, reward_model: Any, extra_info: Any
) -> _Parsed | str:
    """(question, answer, solution, index, data_source) of one row, or a reason string."""
    content = _user_content(prompt)
    if content is None:
        return f"row {row}: no user message in prompt"
    question = extract_question(content)
    if not question:
        return f"row {row}: empty question in the user message"
    ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    answer = "" if ground_truth is None else str(ground_truth).strip()
    if not answer:
        return f"row {row}: no ground truth (reward_model.ground_truth is empty)"
    extra_info = extra_info if isinstance(extra_info, dict) else {}
    solution = extra_info.get("solution")
    solution = solution if isinstance(solution, str) and solution.strip() else None
    index = extra_info.get("index")
    index = None if index is None or str(index) == "" else str(index)
    return question, answer, solution, index, "" if data_source is None else str(data_source)


def _question_hash(question: str) -> str:
    return "q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _assign_uids(
    keys: list[tuple[str, str]],
    indices: list[str | None],
    index_to_keys: dict[str, set[tuple[str, str]]],
) -> list[str]:
    """extra_info.index when it names problems one-to-one, else a hash of the question.

    Some files reuse `index` for something else (the eval files' AIME 2025 and AMC 2023
    store the sample number 0..31 there), so an index that maps to several problems, or
    a file where some rows lack one, falls back to hashes for every problem.
    """
    index_names_problems = all(index is not None for index in indices) and all(
        len(problem_keys) == 1 for problem_keys in index_to_keys.values()
    )
    if index_names_problems:
        return list(indices)  # type: ignore[arg-type]
    uids, used = [], set()
    for question, answer in keys:
        uid = _question_hash(question)
        if uid in used:  # same question, another answer
            uid = _question_hash(f"{question}\0{answer}")
        used.add(uid)
        uids.append(uid)
    return uids


def _open_parquet(path: Path) -> tuple[pq.ParquetFile, list[str]]:
    """The file and the schema columns to read; ValueError naming what is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: no such parquet file")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error
    names = parquet.schema_arrow.names
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; expected the DAPO-Math-17k schema "
            f"(data_source, prompt, ability, reward_model, extra_info), found {names}"
        )
    return parquet, [name for name in _READ_COLUMNS if name in names]


_READ_COLUMNS = ("data_source", "prompt", "reward_model", "extra_info")


def _rows(parquet: pq.ParquetFile, columns: list[str], batch_size: int = 65536):
    """(data_source, prompt, reward_model, extra_info) per row, batch by batch."""
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        values = [
            batch.column(name).to_pylist() if name in columns else [None] * batch.num_rows
            for name in _READ_COLUMNS
        ]
        yield from zip(*values)


def load_dapo_parquet(path: str | os.PathLike) -> DatasetReport:
    """Unique, valid problems of one DAPO-Math-17k-schema parquet file, in file order.

    Rows are numbered from 0 in the reasons. Raises ValueError for a missing or
    unreadable file or one without a `prompt` or `reward_model` column.
    """
    path = Path(path)
    parquet, columns = _open_parquet(path)
    seen: set[tuple[str, str]] = set()
    kept: list[_Parsed] = []
    index_to_keys: dict[str, set[tuple[str, str]]] = {}
    invalid: list[str] = []
    num_rows = num_invalid = num_duplicates = 0
    for row, fields in enumerate(_rows(parquet, columns)):
        num_rows += 1
        parsed = _row_problem(row, *fields)
        if isinstance(parsed, str):
            num_invalid += 1
            if len(invalid) < MAX_INVALID_REASONS:
                invalid.append(parsed)
            continue
        question, answer, _, index, _ = parsed
        key = (question, answer)
        if index is not None:
            index_to_keys.setdefault(index, set()).add(key)
        if key in seen:
            num_duplicates += 1
            continue
        seen.add(key)
        kept.append(parsed)
    keys = [(question, answer) for question, answer, *_ in kept]
    uids = _assign_uids(keys, [entry[3] for entry in kept], index_to_keys)
    problems = [
        Problem(uid=uid, question=question, answer=answer, solution=solution,
                data_source=data_source)
        for uid, (question, answer, solution, _, data_source) in zip(uids, kept)
    ]
    return DatasetReport(
        problems=problems,
        num_rows=num_rows,
        num_duplicates=num_duplicates,
        num_invalid=num_invalid,
        invalid=invalid,
    )


class PromptSampler:
    """Batches of problems as a pure function of (seed, step); resume needs only the step.

    Problem i of the stream (i = step * num_prompts + j) is position i % N of epoch
    i // N, where each epoch is a permutation drawn from Random(f"{seed}:{epoch}"), so
    every epoch visits every problem exactly once. A batch may straddle two epochs.
    """

    def __init__(self, problems: Sequence[Problem], seed: int):
        if len(problems) == 0:
            raise ValueError("PromptSampler needs at least one problem; check data.train_files")
        self.problems = list(problems)
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}  # memo only; results never depend on it

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(next(iter(self._permutations)))
            order = list(range(len(self.problems)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._permutations[epoch] = order
        return self._permutations[epoch]

    def batch(self, step: int, num_prompts: int) -> list[Problem]:
        """Problems [step · num_prompts, (step + 1) · num_prompts) of the stream."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.slice(step * num_prompts, num_prompts)

    def slice(self, start: int, count: int) -> list[Problem]:
        """Problems [start, start + count) of the stream."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        num_problems = len(self.problems)
        batch = []
        for i in range(start, start + count):
            epoch, position = divmod(i, num_problems)
            batch.append(self.problems[self._permutation(epoch)[position]])
        return batch


_PROMPT_TYPE = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", _PROMPT_TYPE),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.string()), ("solution", pa.string())])),
])


def _wrapped(question: str, wrap: str) -> str:
    if wrap == "boxed":
        return student_content(question)
    if wrap == "answer":
        return f"{DAPO_PREFIX}\n\n{question}\n\n{DAPO_SUFFIX}"
    return question


def write_dapo_parquet(
    problems: Sequence[Problem],
    path: str | os.PathLike,
    *,
    style: str = "rule",
    wrap: Literal["boxed", "answer", "none"] = "boxed",
) -> None:
    """Write problems in the DAPO-Math-17k schema, atomically: a temp file in the same
    directory, fsync, os.replace, fsync of the directory. A reader (or a run interrupted
    mid-write) sees the old file or the new one, never half of one.

    wrap: the user message is the boxed student prompt ("boxed"), DAPO's "Answer:"
    prompt ("answer") or the bare question ("none"); load_dapo_parquet reads all three.
    """
    if wrap not in ("boxed", "answer", "none"):
        raise ValueError(f"wrap={wrap!r}; choose 'boxed', 'answer' or 'none'")
    path = Path(path)
    rows = {
        "data_source": [problem.data_source for problem in problems],
        "prompt": [[{"content": _wrapped(problem.question, wrap), "role": "user"}]
                   for problem in problems],
        "ability": ["MATH"] * len(problems),
        "reward_model": [{"ground_truth": problem.answer, "style": style}
                         for problem in problems],
        "extra_info": [{"index": problem.uid, "solution": problem.solution or ""}
                       for problem in problems],
    }
    table = pa.Table.from_pydict(rows, schema=_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a data file other jobs read keeps the
        # replaced file's mode, or a plain 0644.
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o644)
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
