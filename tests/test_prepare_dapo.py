"""tools/prepare_dapo.py on fabricated DAPO-Math-17k-schema files: counts, the English
filter, the output's schema, input errors and the atomic write."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdpg_megatron.data import load_dapo_parquet
from sdpg_megatron.data.dapo import DAPO_PREFIX, DAPO_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "prepare_dapo.py"

# (index, question, answer, copies): the release repeats each problem many times.
ENGLISH = [
    ("e1", "Compute $3 \\times 4 + \\frac{\\pi}{2} \\cdot 0$.", "12", 3),
    ("e2", "A circle has radius 2. Using π ≈ 3.14, is 2 × 3 ≤ 7? Give the area.", "12.56", 1),
    ("e3", "Zoë and José share 12 apples; Zoë gets ¾ of them. How many does José get?", "3", 2),
    ("e4", "Let $f:\\mathbb{R}\\to\\mathbb{R}$ with f(x)² = xⁿ for x ∈ ℝ; find f(𝑥) at 𝑥 = 1.", "1", 1),
    ("e5", "In △ABC, ∠A = 60° and ∠B = 45°; find ∠C in degrees.", "75", 1),
]
NON_ENGLISH = [
    ("c1", "已知 $x^2 = 4$ 且 $x > 0$，求 $x$ 的值。", "2", 4),
    ("c2", "A bag weighs $5\\text{千克}$; how many grams is that?", "5000", 1),
    ("j1", "次の値を求めよ: $2+3$", "5", 1),
    ("k1", "다음을 계산하시오: $2+2$", "4", 1),
    ("r1", "Найдите $x$, если $2x = 4$.", "2", 2),
]


def _row(question: str | None, answer: str, index: str) -> dict:
    prompt = [] if question is None else [
        {"content": f"{DAPO_PREFIX}\n\n{question}\n\n{DAPO_SUFFIX}", "role": "user"}]
    return {
        "data_source": "math_dapo",
        "prompt": prompt,
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def _write(path: Path, problems: list[tuple[str, str, str, int]], invalid: int = 0) -> Path:
    """Copies interleaved as in the release (not adjacent), then `invalid` broken rows."""
    rows = []
    for copy in range(max(copies for *_, copies in problems)):
        rows += [_row(question, answer, index) for index, question, answer, copies in problems
                 if copy < copies]
    rows += [_row("What is 2+2?", "", "bad-answer"), _row(None, "1", "bad-prompt")][:invalid]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """19 rows: 10 unique problems (5 English), 7 repeats, 2 invalid rows."""
    return _write(tmp_path / "dapo-math-17k.parquet", ENGLISH + NON_ENGLISH, invalid=2)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("prepare_dapo", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keeps_the_english_unique_rows(tool, release, tmp_path, capsys):
    out, report = tmp_path / "data" / "dapo-math-en.parquet", tmp_path / "report.json"
    code = tool.main(["--input", str(release), "--out", str(out), "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0
    counts = json.loads(report.read_text())
    assert {key: counts[key] for key in (
        "rows", "unique", "duplicates", "invalid", "english", "non_english", "kept",
        "kept_english", "kept_non_english", "dropped_non_english")} == {
        "rows": 19, "unique": 10, "duplicates": 7, "invalid": 2, "english": 5, "non_english": 5,
        "kept": 5, "kept_english": 5, "kept_non_english": 0, "dropped_non_english": 5}
    assert counts["inputs"][0]["invalid_reasons"] == [
        "row 17: no ground truth (reward_model.ground_truth is empty)",
        "row 18: no user message in prompt",
    ]
    assert [(e["uid"], e["letter"]) for e in counts["non_english_examples"]] == [
        ("c1", "已"), ("c2", "千"), ("j1", "次"), ("k1", "다"), ("r1", "Н")]
    assert counts["non_english_examples"][4]["letter_name"] == "CYRILLIC CAPITAL LETTER EN"
    assert "19 rows read: 10 unique problems, 7 duplicates, 2 invalid" in printed
    assert "kept 5 English + 0 non-English, dropped 5" in printed
    assert f"wrote {out}: 5 problems" in printed

    reloaded = load_dapo_parquet(out)
    assert reloaded.num_rows == 5 and reloaded.num_duplicates == reloaded.num_invalid == 0
    assert [(p.uid, p.question, p.answer, p.solution) for p in reloaded.problems] == [
        (index, question, answer, None) for index, question, answer, _ in ENGLISH]
    # same schema as the release, the user message in DAPO's own "Answer:" prompt
    table = pq.read_table(out)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    first = table.to_pylist()[0]
    assert first["prompt"] == [{"content": f"{DAPO_PREFIX}\n\n{ENGLISH[0][1]}\n\n{DAPO_SUFFIX}",
                                "role": "user"}]
    assert first["data_source"] == "math_dapo" and first["ability"] == "MATH"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dapo-math-en.parquet"]  # no temp left


def test_language_all_keeps_every_unique_row(tool, release, tmp_path, capsys):
    out = tmp_path / "all.parquet"
    assert tool.main(["--input", str(release), "--out", str(out), "--language", "all"]) == 0
    assert "kept 5 English + 5 non-English, dropped 0" in capsys.readouterr().out
    problems = load_dapo_parquet(out).problems
    assert [p.uid for p in problems] == [index for index, *_ in ENGLISH + NON_ENGLISH]


def test_several_inputs_drop_repeats_across_files(tool, release, tmp_path, capsys):
    more = _write(tmp_path / "more.parquet", [
        ENGLISH[1],  # already in the release (1 row)
        NON_ENGLISH[0],  # already in the release (4 rows)
        ("e6", "What is 7 − 2?", "5", 2),  # new; U+2212 minus (2 rows)
    ])
    out = tmp_path / "en.parquet"
    counts = tool.prepare([release, more], out, log=lambda line: None)
    assert {key: counts[key] for key in ("rows", "unique", "duplicates", "invalid", "english",
                                         "non_english", "kept", "dropped_non_english")} == {
        "rows": 26, "unique": 11, "duplicates": 7 + 4 + 2, "invalid": 2, "english": 6, "non_english": 5,
        "kept": 6, "dropped_non_english": 5}
    assert counts["inputs"][1] | {"path": None} == {
        "path": None, "rows": 7, "unique": 3, "duplicates": 4, "invalid": 0, "invalid_reasons": [],
        "already_in_earlier_input": 2}
    assert [p.uid for p in load_dapo_parquet(out).problems] == ["e1", "e2", "e3", "e4", "e5", "e6"]


def test_missing_input_names_the_path_and_exits_2(tmp_path):
    missing = tmp_path / "nowhere" / "dapo-math-17k.parquet"
    out = tmp_path / "out.parquet"
    done = subprocess.run([sys.executable, str(TOOL), "--input", str(missing), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"--input {missing}: no such file" in done.stderr
    assert "DAPO-Math-17k" in done.stderr
    assert not out.exists()


def test_malformed_inputs_exit_2_naming_the_file(tool, release, tmp_path, capsys):
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("not a parquet file")
    wrong_schema = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), wrong_schema)
    out = tmp_path / "out.parquet"
    for bad in (not_parquet, wrong_schema):
        # a bad second input fails before anything is written
        assert tool.main(["--input", str(release), "--input", str(bad), "--out", str(out)]) == 2
        assert str(bad) in capsys.readouterr().err
        assert not out.exists()
    assert tool.main(["--input", str(release), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_nothing_english_writes_nothing_and_exits_1(tool, tmp_path, capsys):
    chinese = _write(tmp_path / "zh.parquet", NON_ENGLISH)
    out = tmp_path / "out.parquet"
    assert tool.main(["--input", str(chinese), "--out", str(out)]) == 1
    assert "no problem left" in capsys.readouterr().err
    assert not out.exists()


def test_an_interrupted_write_leaves_the_previous_output(tool, release, tmp_path, monkeypatch, capsys):
    out = tmp_path / "en.parquet"
    assert tool.main(["--input", str(release), "--out", str(out), "--language", "all"]) == 0
    before = out.read_bytes()

    def interrupted(table, where, **kwargs):
        where.write(b"PAR1 half a file")  # some bytes reach the temp file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", interrupted)
    assert tool.main(["--input", str(release), "--out", str(out)]) == 130
    assert "was not written" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert len(load_dapo_parquet(out).problems) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dapo-math-17k.parquet", "en.parquet"]
