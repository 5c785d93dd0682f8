"""Every command line that takes a path fails on a bad one naming the option, the path and
the fix, before any work starts (sdpg_megatron/cli_paths.py); the launch scripts find the
repository's .venv without PYTHON, or say what to install.

The tools and `sdpg_megatron.evaluate` run in this process (their `main`); the launch
scripts run under `env -i` with a PATH whose `python` cannot import torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_tool_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "examples/sdpg_qwen3_4b_tp2.sh"


def _usage_error(main, argv: list[str], capsys) -> str:
    """argparse's error exit (code 2) of `main(argv)`; its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A directory with a config.json and a tokenizer (the files the checks look for)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def benchmark(tmp_path) -> str:
    (tmp_path / "aime.parquet").write_bytes(b"")
    return f"aime24={tmp_path / 'aime.parquet'}"


def test_evaluate_names_the_option_and_the_path(hf_dir, benchmark, tmp_path, capsys):
    from sdpg_megatron.evaluate import main

    def error(*argv: str) -> str:
        return _usage_error(main, ["--benchmark", benchmark, "--out", str(tmp_path / "eval.json"), *argv], capsys)

    missing = tmp_path / "runs" / "x" / "hf"
    stderr = error("--hf-dir", str(missing))
    assert f"--hf-dir {missing}: no such directory" in stderr and "tools/mcore_to_hf.py" in stderr
    assert "repo" not in stderr.lower()  # not transformers' Hub message about repository ids
    assert f"--hf-dir {hf_dir / 'config.json'}: not a directory" in error("--hf-dir", str(hf_dir / "config.json"))
    (hf_dir / "config.json").unlink()
    assert f"--hf-dir {hf_dir}: has no config.json" in error("--hf-dir", str(hf_dir))
    (hf_dir / "config.json").write_text("{}")
    assert f"--tokenizer-dir {tmp_path / 'tok'}: no such directory" in error(
        "--hf-dir", str(hf_dir), "--tokenizer-dir", str(tmp_path / "tok"))
    (hf_dir / "tokenizer_config.json").unlink()
    assert f"--hf-dir {hf_dir}: has no tokenizer.json or tokenizer_config.json" in error("--hf-dir", str(hf_dir))
    (hf_dir / "tokenizer_config.json").write_text("{}")
    stderr = _usage_error(main, ["--hf-dir", str(hf_dir), "--benchmark", benchmark, "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path}: is a directory" in stderr
    stderr = _usage_error(main, ["--hf-dir", str(hf_dir), "--benchmark", f"amc={tmp_path / 'amc.parquet'}",
                                 "--out", str(tmp_path / "eval.json")], capsys)
    assert f"--benchmark: benchmark amc: {tmp_path / 'amc.parquet'} does not exist" in stderr


def test_train_config_names_the_option_and_the_path(tmp_path, capsys):
    from sdpg_megatron.cli import parse_args

    missing = tmp_path / "runs" / "old" / "config.json"
    stderr = _usage_error(parse_args, ["--config", str(missing)], capsys)
    assert f"--config {missing}: no such file" in stderr and "out_dir/config.json" in stderr
    broken = tmp_path / "config.json"
    broken.write_text("{")
    assert f"--config {broken}: not JSON" in _usage_error(parse_args, ["--config", str(broken)], capsys)
    assert f"--config {tmp_path}: is a directory" in _usage_error(parse_args, ["--config", str(tmp_path)], capsys)


def test_conversion_tools_name_the_option_and_the_path(hf_dir, tmp_path, capsys):
    missing = tmp_path / "Qwen3-4B"
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(missing), "--out", str(tmp_path / "m"),
                                       capsys=capsys)
    assert code == 2 and f"hf_to_mcore: error: --hf-dir {missing}: no such directory" in stderr
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    code, stderr = run_tool_in_process("hf_to_mcore.py", "--hf-dir", str(hf_dir), "--out", str(a_file / "ckpt"),
                                       capsys=capsys)
    assert code == 2 and f"--out {a_file / 'ckpt'}: {a_file} is a file" in stderr
    code, stderr = run_tool_in_process("mcore_to_hf.py", "--mcore-dir", str(hf_dir), "--out", str(a_file),
                                       capsys=capsys)
    assert code == 2 and f"mcore_to_hf: error: --out {a_file}: is a file" in stderr


def test_other_tools_name_the_option_and_the_path(tmp_path, capsys):
    from sdpg_megatron.tiny import main as tiny_main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert f"--out {a_file}: is a file" in _usage_error(tiny_main, ["--out", str(a_file)], capsys)

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.5}\n')
    with pytest.raises(SystemExit) as exit_info:
        run_tool_in_process("plot_metrics.py", "--run", f"A={run}", "--out", str(tmp_path), capsys=capsys)
    assert exit_info.value.code == 2 and f"--out {tmp_path}: is a directory" in capsys.readouterr().err

    parquet = tmp_path / "in.parquet"
    parquet.write_bytes(b"")
    code, stderr = run_tool_in_process("prepare_dapo.py", "--input", str(parquet), "--out", str(tmp_path / "o.parquet"),
                                       "--report", str(a_file / "report.json"), capsys=capsys)
    assert code == 2 and f"--report {a_file / 'report.json'}: {a_file} is a file" in stderr
    assert not (tmp_path / "o.parquet").exists()

    pins = subprocess.run([sys.executable, str(ROOT / "tools" / "check_pins.py"), str(tmp_path / "gpu.txt")],
                          capture_output=True, text=True, timeout=120)
    assert pins.returncode == 2
    assert f"requirements file {tmp_path / 'gpu.txt'}: No such file or directory" in pins.stderr


def test_unreadable_and_unwritable_paths_are_named(tmp_path, monkeypatch):
    from sdpg_megatron import cli_paths

    locked = tmp_path / "locked"
    locked.mkdir()
    # root passes every permission check: stand in for a user the directory is closed to
    monkeypatch.setattr(cli_paths.os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(PermissionError, match=f"--hf-dir {locked}: not readable by this user"):
        cli_paths.input_dir(locked, "--hf-dir")
    with pytest.raises(PermissionError, match=f"--out {locked / 'a' / 'b.json'}: {locked} is not writable"):
        cli_paths.output_file(locked / "a" / "b.json", "--out")
    assert cli_paths.output_dir(tmp_path / "new" / "dir", "--out") == tmp_path / "new" / "dir"


# --------------------------------------------------------------------------- launch scripts


def _repo_copy(tmp_path: Path, *, with_venv: bool) -> Path:
    """The launch scripts in a fresh root; its .venv is this test's environment (or none)."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", root / "examples", ignore=shutil.ignore_patterns("*.py"))
    (root / "sdpg_megatron").symlink_to(ROOT / "sdpg_megatron")
    if with_venv:
        (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def _run_script(root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`bash SCRIPT args` with no PYTHON / SDPG_VENV and a PATH whose python lacks torch."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (fake_bin / name).write_text("#!/bin/sh\necho \"No module named 'torch'\" >&2\nexit 1\n")
        (fake_bin / name).chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(root / SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "activate").is_file(), reason="the tests run outside a venv")
def test_launch_script_uses_the_repository_venv_without_python(tmp_path):
    root = _repo_copy(tmp_path, with_venv=True)
    result = _run_script(root, tmp_path, "--print-config")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads(result.stdout)
    assert config["logging"]["out_dir"] == f"{root}/runs/sdpg-qwen3-4b"
    assert config["model"]["params_dtype"] == "bfloat16"


def test_launch_script_without_torch_says_what_to_install(tmp_path):
    root = _repo_copy(tmp_path, with_venv=False)
    for mode in ("--print-config", "--dry-run"):
        result = _run_script(root, tmp_path, mode)
        assert result.returncode == 2
        assert "cannot import torch, megatron.core and sdpg_megatron" in result.stderr, result.stderr[-2000:]
        assert f"build {root}/.venv with `bash tools/install.sh`" in result.stderr
        assert "No module named" not in result.stderr
