#!/usr/bin/env python
"""Prepare the DAPO-Math-17k training file: de-duplicate, keep the English problems.

    python tools/prepare_dapo.py --input dapo-math-17k.parquet --out data/dapo-math-en.parquet \\
        --report data/dapo-math-en.report.json

The public release repeats each of its 17,398 unique problems ~100 times and mixes in
problems written in Chinese; the paper trains on the ~13.9k English ones. This tool reads
one or more DAPO-Math-17k-schema parquet files with `load_dapo_parquet` (which drops exact
repeats of (question, answer) and skips malformed rows with a reason), drops repeats across
files too, keeps the rows whose question passes `is_english` (sdpg_megatron/data/language.py
states the rule: every letter Latin, Greek or a math letter) unless --language all, and
writes them in the same schema with `write_dapo_parquet` (atomic: an interrupted run leaves
the previous --out, or none, never half a file). It prints the counts and, with --report,
writes them as JSON.

Exit codes: 0 written; 1 nothing to write (no problem kept); 2 an input is missing or not a
DAPO-schema parquet, or --out / --report cannot be written (a directory, or in
one this user cannot write); 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

class NothingToWrite(ValueError):
    """The filter kept no problem; --out is not written (exit code 1)."""


NUM_EXAMPLES = 5  # non-English questions quoted in the report, for auditing the rule
EXAMPLE_CHARS = 120


def _example(problem: Any, letter: str) -> dict[str, str]:
    import unicodedata

    question = problem.question
    return {
        "uid": problem.uid,
        "letter": letter,
        "letter_name": unicodedata.name(letter, f"U+{ord(letter):04X}"),
        "question": question if len(question) <= EXAMPLE_CHARS else question[:EXAMPLE_CHARS] + "...",
    }


def prepare(
    inputs: list[Path],
    out: Path,
    *,
    language: str = "en",
    wrap: str = "answer",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Read `inputs`, filter, write `out`; the counts (the --report JSON).

    Raises ValueError (naming the file) for a missing or malformed input, before anything
    is written; NothingToWrite (a ValueError) when no problem is kept, writing nothing.
    """
    from sdpg_megatron.data import first_non_english_letter, load_dapo_parquet, write_dapo_parquet

    if language not in ("en", "all"):
        raise ValueError(f"language={language!r}; choose 'en' or 'all'")
    per_input, problems, seen = [], [], set()
    cross_file_duplicates = 0
    for path in inputs:
        started = time.perf_counter()
        size_mib = path.stat().st_size / 2**20 if path.is_file() else 0.0
        log(f"reading {path} ({size_mib:.1f} MiB) ...")
        report = load_dapo_parquet(path)
        new = 0
        for problem in report.problems:
            key = (problem.question, problem.answer)
            if key in seen:  # load_dapo_parquet de-duplicates within one file only
                cross_file_duplicates += 1
                continue
            seen.add(key)
            problems.append(problem)
            new += 1
        log(f"  {report.num_rows:,} rows: {len(report.problems):,} unique, "
            f"{report.num_duplicates:,} duplicates, {report.num_invalid:,} invalid"
            + (f", {len(report.problems) - new:,} already in an earlier input" if new < len(report.problems) else "")
            + f" ({time.perf_counter() - started:.1f} s)")
        for reason in report.invalid:
            log(f"  skipped {reason}")
        if report.num_invalid > len(report.invalid):
            log(f"  ... and {report.num_invalid - len(report.invalid):,} more invalid rows")
        per_input.append({
            "path": str(path), "rows": report.num_rows, "unique": len(report.problems),
            "duplicates": report.num_duplicates, "invalid": report.num_invalid,
            "invalid_reasons": report.invalid, "already_in_earlier_input": len(report.problems) - new,
        })

    english, non_english, examples = [], [], []
    for problem in problems:
        letter = first_non_english_letter(problem.question)
        if letter is None:
            english.append(problem)
        else:
            non_english.append(problem)
            if len(examples) < NUM_EXAMPLES:
                examples.append(_example(problem, letter))
    kept = english if language == "en" else problems
    counts: dict[str, Any] = {
        "inputs": per_input,
        "rows": sum(entry["rows"] for entry in per_input),
        "unique": len(problems),
        "duplicates": sum(entry["duplicates"] for entry in per_input) + cross_file_duplicates,
        "invalid": sum(entry["invalid"] for entry in per_input),
        "language": language,
        "english": len(english),
        "non_english": len(non_english),
        "kept": len(kept),
        "kept_english": len(english),
        "kept_non_english": len(kept) - len(english),
        "dropped_non_english": len(problems) - len(kept),
        "non_english_examples": examples,
        "rule": "is_english: every letter (Unicode category L*) is Latin, Greek or a math "
                "letter (sdpg_megatron/data/language.py, ENGLISH_LETTER_RANGES)",
        "out": str(out),
        "wrap": wrap,
    }
    log(f"{counts['rows']:,} rows read: {counts['unique']:,} unique problems, "
        f"{counts['duplicates']:,} duplicates, {counts['invalid']:,} invalid")
    log(f"language: {counts['english']:,} English, {counts['non_english']:,} non-English; "
        f"--language {language}: kept {counts['kept_english']:,} English + "
        f"{counts['kept_non_english']:,} non-English, dropped {counts['dropped_non_english']:,}")
    if not kept:
        raise NothingToWrite(f"no problem left to write to {out} (--language {language}); "
                         "check the inputs or use --language all")
    uids = [problem.uid for problem in kept]
    if len(set(uids)) < len(uids):
        log(f"note: {len(uids) - len(set(uids)):,} uids repeat across inputs; the loader will "
            f"identify {out.name}'s problems by question hashes instead")
    started = time.perf_counter()
    write_dapo_parquet(kept, out, wrap=wrap)
    log(f"wrote {out}: {len(kept):,} problems ({time.perf_counter() - started:.1f} s)")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, type=Path, metavar="PARQUET",
                        help="DAPO-Math-17k-schema parquet file; repeat for several")
    parser.add_argument("--out", required=True, type=Path, help="output parquet file (same schema)")
    parser.add_argument("--language", choices=("en", "all"), default="en",
                        help="en: keep the English problems (default); all: keep every unique problem")
    parser.add_argument("--report", type=Path, help="also write the counts to this JSON file")
    parser.add_argument("--wrap", choices=("answer", "boxed", "none"), default="answer",
                        help="stored user message: DAPO's 'Answer:' prompt as in the release (default), "
                             "the boxed student prompt, or the bare question; training re-renders it anyway")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"prepare_dapo: error: {message}", file=sys.stderr)
        return 2

    for path in args.input:
        if not path.is_file():
            return fail(f"--input {path}: no such file; download the DAPO-Math-17k "
                        "parquet (Hugging Face dataset BytedTsinghua-SIA/DAPO-Math-17k) or fix the path")
    from sdpg_megatron.cli_paths import output_file

    try:  # before reading anything: an output that cannot be written fails now, not after the read
        output_file(args.out, "--out")
        if args.report is not None:
            output_file(args.report, "--report")
    except OSError as error:
        return fail(str(error))

    from sdpg_megatron.fsio import write_json_atomic

    try:
        counts = prepare(args.input, args.out, language=args.language, wrap=args.wrap,
                         log=lambda line: print(line, flush=True))
    except NothingToWrite as error:
        print(f"prepare_dapo: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a malformed input, named in the message
        return fail(str(error))
    except KeyboardInterrupt:
        print(f"prepare_dapo: interrupted; {args.out} was not written (left as it was)", file=sys.stderr)
        return 130
    if args.report is not None:
        write_json_atomic(args.report, counts)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
