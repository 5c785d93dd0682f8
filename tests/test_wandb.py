"""logging.wandb: Weights & Biases beside TensorBoard, checked offline (no network).

`MetricsLogger` writes the offline run under run_dir/wandb/. The tests read the run's own
log back (run-<id>.wandb: W&B's protobuf records in 32 KiB blocks, the file `wandb sync`
uploads) and check every logged step and value and the run config; a resumed run
continues the same W&B run. Without the wandb package: a clear error in the config's
validation and in the sink, and runs that do not ask for W&B never import it.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdpg_megatron.config import Config, apply_overrides, validate
from sdpg_megatron.metrics import MetricsLogger, WandbSettings, read_metrics

BLOCK_BYTES = 32 * 1024
HEADER_BYTES = 7  # ":W&B", magic 0xBEE1, version; then (crc32c, length, type) per record
FULL, LAST = 1, 4


def _records(log_path: Path) -> list:
    """Every record of a run-<id>.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = log_path.read_bytes()
    assert data[:4] == b":W&B", f"{log_path} is not a W&B run log"
    records, pending, position = [], b"", HEADER_BYTES
    while position + HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < HEADER_BYTES:  # block trailer
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER_BYTES])
        if kind == 0 and length == 0:  # zero padding to the block's end
            position += left_in_block
            continue
        pending += data[position + HEADER_BYTES : position + HEADER_BYTES + length]
        position += HEADER_BYTES + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _finished_records(run: Path, timeout_s: float = 60.0) -> list:
    """The offline run's records once its exit record is written: W&B's service process
    writes the log on its own after `finish()` returns."""
    (log_path,) = run.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = _records(log_path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{log_path} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def _history(run: Path) -> dict[int, dict]:
    """{step: {metric: value}} as the offline run recorded it (W&B's own `_…` keys dropped)."""
    history = {}
    for record in _finished_records(run):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {key: value for key, value in items.items() if not key.startswith("_")}
    return history


def _run_record(run: Path):
    """The offline run's W&B run record: its id, project, config."""
    (record,) = [record.run for record in _finished_records(run) if record.WhichOneof("record_type") == "run"]
    return record


def _run_config(run: Path) -> dict:
    return {item.key: json.loads(item.value_json) for item in _run_record(run).config.update}


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """W&B's settings, cache and data under the test's directory, never the user's."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)


def test_offline_run_records_every_step(tmp_path):
    run_dir = tmp_path / "run"
    settings = WandbSettings(project="sdpg-test", mode="offline", run_config={"algorithm": {"alpha": 0.001}})
    steps = {1: {"reward_mean": 0.25, "time/step": 1.5}, 2: {"reward_mean": 0.5, "loss": math.nan},
             3: {"reward_mean": torch.tensor(0.75), "time/step": 1.25}}
    with MetricsLogger(run_dir, total_steps=3, tensorboard=False, progress=False, wandb=settings) as logger:
        for step, metrics in steps.items():
            logger.log(step, metrics)

    (run,) = _offline_runs(run_dir)
    assert (_run_record(run).run_id, _run_record(run).project) == ((run_dir / "wandb_run_id").read_text().strip(),
                                                                   "sdpg-test")
    # non-finite values stay out of W&B as out of TensorBoard (the JSONL keeps them as null)
    assert _history(run) == {1: {"reward_mean": 0.25, "time/step": 1.5}, 2: {"reward_mean": 0.5},
                             3: {"reward_mean": 0.75, "time/step": 1.25}}
    assert _run_config(run)["algorithm"] == {"alpha": 0.001}
    assert math.isnan(read_metrics(run_dir)[1]["loss"])


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    settings = WandbSettings(project="sdpg-test")
    with MetricsLogger(run_dir, total_steps=4, tensorboard=False, progress=False, wandb=settings) as logger:
        logger.log(1, {"reward_mean": 0.1})
        logger.log(2, {"reward_mean": 0.2})
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    with MetricsLogger(run_dir, total_steps=4, start_step=2, tensorboard=False, progress=False,
                       wandb=settings) as logger:
        logger.log(3, {"reward_mean": 0.3})
    first, resumed = _offline_runs(run_dir)
    assert _run_record(first).run_id == _run_record(resumed).run_id == first_id  # one W&B run
    assert _history(resumed) == {3: {"reward_mean": 0.3}}

    fresh_dir = tmp_path / "fresh"  # a new run directory: a new W&B run
    with MetricsLogger(fresh_dir, total_steps=1, tensorboard=False, progress=False, wandb=settings) as logger:
        logger.log(1, {"reward_mean": 0.1})
    assert (fresh_dir / "wandb_run_id").read_text().strip() != first_id


def test_config_fields_and_their_validation():
    config = apply_overrides(Config(), ["logging.wandb=true", "logging.wandb_mode=online",
                                        "logging.wandb_project=mine"])
    assert validate(config.logging).wandb is True
    settings = WandbSettings.from_logging(config.logging, {"a": 1})
    assert (settings.project, settings.mode, settings.run_config) == ("mine", "online", {"a": 1})
    assert WandbSettings.from_logging(Config().logging) is None  # off by default
    with pytest.raises(ValueError, match="logging.wandb_mode.*'offline' or 'online'"):
        validate(apply_overrides(Config(), ["logging.wandb_mode=cloud"]).logging)
    with pytest.raises(ValueError, match="logging.wandb_project"):
        validate(apply_overrides(Config(), ["logging.wandb=true", "logging.wandb_project="]).logging)


def test_missing_wandb_is_a_clear_error_and_never_needed_otherwise(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds nothing
    with pytest.raises(ValueError, match=r"logging.wandb: the wandb package is not installed.*pip install wandb"):
        validate(apply_overrides(Config(), ["logging.wandb=true"]).logging)
    with pytest.raises(ModuleNotFoundError, match=r"logging.wandb is set.*pip install wandb.*logging.wandb=false"):
        MetricsLogger(tmp_path / "a", total_steps=1, tensorboard=False, progress=False,
                      wandb=WandbSettings(project="p"))
    with MetricsLogger(tmp_path / "b", total_steps=1, tensorboard=False, progress=False) as logger:
        logger.log(1, {"reward_mean": 1.0})  # no W&B asked for: works without the package
    assert validate(Config().logging).wandb is False

    imported = subprocess.run([sys.executable, "-c", "import sys, sdpg_megatron.metrics, sdpg_megatron.config; "
                               "print('wandb' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip() == "False", imported.stderr
