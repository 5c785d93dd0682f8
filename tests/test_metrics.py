"""sdpg_megatron.metrics, sdpg_megatron.plotting and tools/plot_metrics.py.

- every logged step is one fsync'd JSON line; non-finite values become null, non-numeric
  values raise TypeError naming the key;
- a resumed run leaves the same metrics.jsonl (and TensorBoard curves) as an unbroken one;
- a line torn by a crash is skipped with a warning, corruption elsewhere is an error;
- plots and summaries of methods × seeds, checked by hand; the CLI end to end.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sdpg_megatron import metrics as metrics_module
from sdpg_megatron.fsio import write_json_atomic
from sdpg_megatron.metrics import MetricsLogger, read_metrics
from sdpg_megatron.plotting import plot_runs, summarize_runs

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_step_metrics(step: int, *, offset: float = 0.0) -> dict[str, float]:
    return {"reward_mean": 0.1 * step + offset, "accuracy": 0.05 * step + offset,
            "entropy": 1.0 / step, "response_length": 100.0 + step, "time/rollout": 2.5}


def write_run(run_dir: Path, num_steps: int, *, offset: float = 0.0, drop: tuple[str, ...] = ()) -> Path:
    with MetricsLogger(run_dir, total_steps=num_steps, tensorboard=False, progress=False) as logger:
        for step in range(1, num_steps + 1):
            logger.log(step, {key: value for key, value in fake_step_metrics(step, offset=offset).items()
                              if key not in drop})
    return run_dir


def test_one_fsynced_json_line_per_step(tmp_path, monkeypatch):
    synced_descriptors = []
    real_fsync = os.fsync

    def recording_fsync(file_descriptor):
        synced_descriptors.append(file_descriptor)
        real_fsync(file_descriptor)

    monkeypatch.setattr(metrics_module.os, "fsync", recording_fsync)
    logger = MetricsLogger(tmp_path, total_steps=3, tensorboard=False, progress=False)
    metrics_file_descriptor = logger._file.fileno()
    for step in (1, 2, 3):
        logger.log(step, {"reward_mean": step / 4, "num_tokens": step * 10, "time/rollout": 1.5})
        assert synced_descriptors.count(metrics_file_descriptor) == step
        # Visible to another reader before close: a crash right now would lose nothing.
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == step
        assert json.loads(lines[-1]) == {"step": step, "reward_mean": step / 4,
                                         "num_tokens": float(step * 10), "time/rollout": 1.5}
    logger.close()
    logger.close()  # idempotent
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path / "metrics.jsonl") == read_metrics(tmp_path)
    assert all(isinstance(value, float) for record in read_metrics(tmp_path)
               for key, value in record.items() if key != "step")


def test_scalar_tensors_and_arrays_are_accepted(tmp_path):
    import numpy as np
    import torch

    with MetricsLogger(tmp_path, total_steps=1, tensorboard=False, progress=False) as logger:
        logger.log(1, {"loss": torch.tensor(0.25), "kl": np.float32(0.5), "count": np.int64(3)})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.25, "kl": 0.5, "count": 3.0}]


def test_non_finite_values_are_null(tmp_path):
    with MetricsLogger(tmp_path, total_steps=1, tensorboard=False, progress=False) as logger:
        logger.log(1, {"loss": math.nan, "grad_norm": math.inf, "kl": -math.inf, "reward_mean": 0.5})
    raw = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert raw == {"step": 1, "loss": None, "grad_norm": None, "kl": None, "reward_mean": 0.5}
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"]) and record["reward_mean"] == 0.5


@pytest.mark.parametrize("bad_value", ["0.5", None, [1.0, 2.0], {"a": 1}])
def test_non_numeric_value_raises_type_error_naming_the_key(tmp_path, bad_value):
    with MetricsLogger(tmp_path, total_steps=2, tensorboard=False, progress=False) as logger:
        with pytest.raises(TypeError, match="'rollout_note'"):
            logger.log(1, {"reward_mean": 0.5, "rollout_note": bad_value})
        logger.log(1, {"reward_mean": 0.5})  # the failed call wrote nothing
    assert read_metrics(tmp_path) == [{"step": 1, "reward_mean": 0.5}]


def test_steps_must_increase(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, tensorboard=False, progress=False) as logger:
        logger.log(2, {"a": 1.0})
        with pytest.raises(ValueError, match="step 2 is not after"):
            logger.log(2, {"a": 1.0})
        with pytest.raises(ValueError, match="'step'"):
            logger.log(3, {"step": 1.0})


def test_resume_leaves_the_file_of_an_unbroken_run(tmp_path):
    unbroken = write_run(tmp_path / "unbroken", 6)

    resumed = write_run(tmp_path / "resumed", 5)  # ran past the step-3 checkpoint, then crashed ...
    with open(resumed / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"step": 6, "reward_me')  # ... mid-write
    with pytest.warns(UserWarning, match="truncated last line"):
        logger = MetricsLogger(resumed, total_steps=6, start_step=3, tensorboard=False, progress=False)
    assert [record["step"] for record in read_metrics(resumed)] == [1, 2, 3]
    with pytest.raises(ValueError, match="step 3 is not after"):
        logger.log(3, fake_step_metrics(3))
    for step in (4, 5, 6):
        logger.log(step, fake_step_metrics(step))
    logger.close()

    assert (resumed / "metrics.jsonl").read_bytes() == (unbroken / "metrics.jsonl").read_bytes()
    assert [path.name for path in resumed.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, total_steps=5, progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward_mean": float(step), "time/rollout": 0.5 * step, "loss": math.nan})
    with MetricsLogger(tmp_path, total_steps=5, start_step=3, progress=False) as logger:
        for step in (4, 5):
            logger.log(step, {"reward_mean": 10.0 * step, "time/rollout": 0.5 * step, "loss": math.nan})

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"reward_mean", "time/rollout"}  # NaN loss skipped
    reward = [(event.step, event.value) for event in accumulator.Scalars("reward_mean")]
    assert reward == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]  # steps 4-5 of run 1 purged
    assert [event.value for event in accumulator.Scalars("time/rollout")] == [0.5, 1.0, 1.5, 2.0, 2.5]


def test_progress_bar_shows_progress_keys(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10, start_step=2, tensorboard=False) as logger:
        logger.log(3, {"reward_mean": 0.125, "accuracy": 0.5, "loss": 7.0})
        assert logger._bar.n == 3 and logger._bar.total == 10
    err = capsys.readouterr().err
    assert "3/10" in err and "reward_mean=0.125" in err and "accuracy=0.5" in err and "loss" not in err


def test_truncated_last_line_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "accuracy": 0.5}\n{"step": 2, "accuracy": null}\n{"step": 3, "accu')
    with pytest.warns(UserWarning, match="truncated last line"):
        records = read_metrics(tmp_path)
    assert [record["step"] for record in records] == [1, 2] and math.isnan(records[1]["accuracy"])

    path.write_text('{"step": 1, "accuracy": 0.5}\n{"step": 2, "accu\n{"step": 3, "accuracy": 0.7}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "config.json", {"lr": 1e-6, "steps": [1, 2]})
    assert json.loads(path.read_text()) == {"lr": 1e-6, "steps": [1, 2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_json_atomic(path, {"lr": 2e-6})
    assert json.loads(path.read_text()) == {"lr": 2e-6}
    assert [child.name for child in path.parent.iterdir()] == ["config.json"]


@pytest.fixture(scope="module")
def two_methods_two_seeds(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "SDPG-URKL": [write_run(root / "sdpg_s0", 8, offset=0.10), write_run(root / "sdpg_s1", 6, offset=0.20)],
        "GRPO": [write_run(root / "grpo_s0", 8), write_run(root / "grpo_s1", 8, offset=0.05, drop=("entropy",))],
    }


def test_plot_runs_writes_png(two_methods_two_seeds, tmp_path):
    out = plot_runs(two_methods_two_seeds, tmp_path / "plots" / "curves.png", smooth=3, title="test")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert [child.name for child in out.parent.iterdir()] == ["curves.png"]

    # A metric that no run logged: its panel says "no data" instead of failing.
    single = plot_runs({"GRPO": two_methods_two_seeds["GRPO"][:1]}, tmp_path / "one.png",
                       panels=(("accuracy", "accuracy"), ("kl", "KL"), ("entropy", "entropy")))
    assert single.read_bytes()[:8] == PNG_MAGIC

    with pytest.raises(ValueError, match="smooth"):
        plot_runs(two_methods_two_seeds, tmp_path / "x.png", smooth=0)
    with pytest.raises(ValueError, match="single path"):
        plot_runs({"GRPO": str(two_methods_two_seeds["GRPO"][0])}, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_runs({"GRPO": [tmp_path / "missing"]}, tmp_path / "x.png")


def test_summarize_runs_by_hand(tmp_path):
    def run_with_accuracy(name: str, accuracies: list[float]) -> Path:
        with MetricsLogger(tmp_path / name, total_steps=len(accuracies), tensorboard=False, progress=False) as logger:
            for step, accuracy in enumerate(accuracies, start=1):
                logger.log(step, {"accuracy": accuracy})
        return tmp_path / name

    runs = {
        "SDPG": [run_with_accuracy("a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
                 run_with_accuracy("b", [0.0, 0.1, 0.2, 0.3, 0.4, 0.9])],
        "GRPO": [run_with_accuracy("c", [0.2, math.nan, 0.4, 0.3])],
    }
    summary = summarize_runs(runs, key="accuracy", last=3)
    # SDPG seeds: mean(0.4, 0.5, 0.6) = 0.5, mean(0.3, 0.4, 0.9) = 0.5333; step means peak at (0.6 + 0.9) / 2.
    assert summary["SDPG"]["per_seed_last"] == pytest.approx([0.5, 1.6 / 3])
    assert summary["SDPG"]["mean_last"] == pytest.approx((0.5 + 1.6 / 3) / 2)
    assert summary["SDPG"]["best"] == pytest.approx(0.75)
    # GRPO: the NaN step is not a value; the last 3 finite ones are 0.2, 0.4, 0.3.
    assert summary["GRPO"]["per_seed_last"] == pytest.approx([0.3])
    assert (summary["GRPO"]["mean_last"], summary["GRPO"]["best"]) == pytest.approx((0.3, 0.4))

    missing = summarize_runs(runs, key="kl")
    assert math.isnan(missing["GRPO"]["mean_last"]) and math.isnan(missing["GRPO"]["best"])
    assert math.isnan(missing["SDPG"]["per_seed_last"][0])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_cli_end_to_end(two_methods_two_seeds, tmp_path):
    sdpg, grpo = two_methods_two_seeds["SDPG-URKL"], two_methods_two_seeds["GRPO"]
    out = tmp_path / "curves.png"
    result = run_cli("--run", f"SDPG-URKL={sdpg[0]},{sdpg[1]}", "--run", f"GRPO={grpo[0]},{grpo[1]}",
                     "--out", str(out), "--smooth", "2", "--title", "SDPG vs GRPO", "--last", "2")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    expected = summarize_runs({"SDPG-URKL": sdpg, "GRPO": grpo}, last=2)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["SDPG-URKL"][1] == "2" and rows["SDPG-URKL"][2] == f"{expected['SDPG-URKL']['mean_last']:.4f}"
    assert rows["GRPO"][3] == f"{expected['GRPO']['best']:.4f}"
    assert f"wrote {out}" in result.stdout


@pytest.mark.parametrize("bad_run, message", [
    ("SDPG", "expected LABEL=DIR"),
    ("=some_dir", "expected LABEL=DIR"),
    ("SDPG=", "expected LABEL=DIR"),
    ("SDPG=/nonexistent/run_dir", "'/nonexistent/run_dir' of 'SDPG' does not exist"),
])
def test_cli_rejects_bad_run_arguments(bad_run, message, tmp_path):
    result = run_cli("--run", bad_run, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "argument --run" in result.stderr and message in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_duplicate_labels_and_empty_dirs(two_methods_two_seeds, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    plot_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_metrics)
    grpo = two_methods_two_seeds["GRPO"]
    for argv, message in [
        (["--run", f"GRPO={grpo[0]}", "--run", f"GRPO={grpo[1]}"], "given twice"),
        (["--run", f"GRPO={tmp_path}"], "has no metrics.jsonl"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            plot_metrics.main([*argv, "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --run" in err and message in err
