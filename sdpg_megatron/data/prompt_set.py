"""The training prompts as one seeded stream (the trainer's driver reads it)."""

from __future__ import annotations

import logging
from typing import Sequence

from sdpg_megatron.data.dapo import PromptSampler, load_dapo_parquet
from sdpg_megatron.data.templates import PromptTooLongError, encode_problem

logger = logging.getLogger(__name__)


class PromptSet:
    """The training prompts, loaded, validated and encoded once, read as one stream:
    `take(n)` returns the next n (the stream is a pure function of the seed: each epoch a
    permutation of the problems, see `PromptSampler`) and advances `position`, which a
    checkpoint records so that a resumed run draws exactly what the original drew.

    Rows without a usable question or answer, and prompts over `max_prompt_tokens`, are
    skipped with a warning and counted (`num_invalid`, `num_too_long`); fewer than
    `min_problems` usable ones is an error naming the files. `privileged_from="other"`:
    the teacher's context holds the next problem's answer (and solution), a control."""

    def __init__(self, files: Sequence[str], tokenizer, *, max_prompt_tokens: int, privileged: str,
                 enable_thinking: bool, seed: int, min_problems: int, privileged_from: str = "own"):
        problems, self.num_invalid, self.num_too_long = [], 0, 0
        for path in files:
            report = load_dapo_parquet(path)
            self.num_invalid += report.num_invalid
            for reason in report.invalid:
                logger.warning("%s: skipped %s", path, reason)
            problems.extend(report.problems)
        if privileged_from == "other" and len(problems) < 2:
            raise ValueError(f"data.privileged_from=other shows the teacher another problem's context: "
                             f"data.train_files {list(files)} need at least 2 problems")
        items = []  # (EncodedPrompt, Problem); uids need not be unique across files
        for i, problem in enumerate(problems):
            # the control: the next problem's answer (and solution), never the problem's own
            other = problems[(i + 1) % len(problems)] if privileged_from == "other" else None
            try:
                encoded = encode_problem(tokenizer, problem, max_prompt_tokens=max_prompt_tokens,
                                         privileged=privileged, enable_thinking=enable_thinking, context_from=other)
            except PromptTooLongError as error:
                self.num_too_long += 1
                logger.warning("skipped: %s", error)
                continue
            items.append((encoded, problem))
        if len(items) < min_problems:
            raise ValueError(
                f"data.train_files {list(files)} give {len(items)} usable problems "
                f"({self.num_invalid} invalid rows, {self.num_too_long} prompts over data.max_prompt_tokens); "
                f"a step needs schedule.prompts_per_step={min_problems}"
            )
        logger.info("training data: %d problems (%d invalid rows, %d too long)", len(items), self.num_invalid,
                    self.num_too_long)
        self.sampler = PromptSampler(items, seed)
        self.position = 0

    def take(self, count: int) -> list:
        """[(EncodedPrompt, Problem)] × count, the next ones of the stream."""
        batch = self.sampler.slice(self.position, count)
        self.position += count
        return batch
