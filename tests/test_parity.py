"""docs/parity.md against the configs it documents: the 4B script's resolved tree (through
`--print-config`, the way a user sees it) and each baseline preset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_megatron import config as cfg
from sdpg_megatron import presets

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "docs" / "parity.md"
SECTION = re.compile(r"<!-- parity: (script|preset) (\S+) -->")
CLAIM = re.compile(r"`([a-z_]+)\.([a-z_0-9]+)` = ([^;|]+?)(?: \(|;|$)")


def _claims() -> dict[tuple[str, str], list[tuple[str, str, str]]]:
    """{(kind, name): [(section, field, documented value)]} from the tables' last column."""
    claims, current = {}, None
    for line in PARITY.read_text().splitlines():
        if match := SECTION.search(line):
            current = (match.group(1), match.group(2))
            claims[current] = []
        elif current and line.startswith("|") and not line.startswith("|---"):
            last_column = line.strip().strip("|").split("|")[-1].strip()
            claims[current] += CLAIM.findall(last_column)
    return claims


def _documented(section: str, field: str, text: str):
    """The documented value parsed as the field's type (by the config's own --set parser)."""
    probe = cfg.Config()
    cfg.apply_overrides(probe, [f"{section}.{field}={text.strip()}"])
    return getattr(getattr(probe, section), field)


def _print_config(script: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    env.pop("SDPG_VENV", None)
    result = subprocess.run(["bash", str(ROOT / script), "--print-config"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_parity_page_documents_the_4b_script_and_three_baselines():
    claims = _claims()
    assert set(claims) == {("script", "examples/sdpg_qwen3_4b_tp2.sh"), ("preset", "grpo"), ("preset", "rlsd"),
                           ("preset", "opsd")}
    assert len(claims["script", "examples/sdpg_qwen3_4b_tp2.sh"]) >= 40
    assert all(len(rows) >= 5 for rows in claims.values())


def test_4b_script_resolves_to_the_parity_table():
    script = "examples/sdpg_qwen3_4b_tp2.sh"
    resolved = cfg.config_from_dict(_print_config(script))
    mismatches = []
    for section, field, text in _claims()["script", script]:
        actual = getattr(getattr(resolved, section), field)
        if actual != _documented(section, field, text):
            mismatches.append(f"{section}.{field}: script {actual!r}, docs/parity.md {text!r}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("preset", ["grpo", "rlsd", "opsd"])
def test_baseline_presets_resolve_to_the_parity_table(preset):
    resolved = presets.apply_preset(cfg.Config(), preset)
    mismatches = [f"{s}.{f}: preset {getattr(getattr(resolved, s), f)!r}, docs/parity.md {text!r}"
                  for s, f, text in _claims()["preset", preset]
                  if getattr(getattr(resolved, s), f) != _documented(s, f, text)]
    assert not mismatches, "\n".join(mismatches)


def test_a_drifted_value_is_caught(tmp_path):
    """The comparison is not vacuous: a changed setting no longer matches its row."""
    resolved = presets.apply_preset(cfg.Config(), "sdpg-urkl")
    resolved.optimizer.lr_warmup_unit = "optimizer_step"
    rows = dict(((s, f), t) for s, f, t in _claims()["script", "examples/sdpg_qwen3_4b_tp2.sh"])
    assert resolved.optimizer.lr_warmup_unit != _documented("optimizer", "lr_warmup_unit",
                                                            rows["optimizer", "lr_warmup_unit"])
