"""Per-step training metrics: one JSON line per step, TensorBoard scalars, Weights & Biases
(optional), a progress bar.

`MetricsLogger` is the single sink the driver calls once per rollout step (on one rank):

    with MetricsLogger(run_dir, total_steps=400, start_step=resumed_step) as metrics:
        for step in range(resumed_step + 1, 401):
            ...
            metrics.log(step, {"reward_mean": 0.41, "time/rollout": 12.3})

- `run_dir/metrics.jsonl` gets `{"step": k, **metrics}` per step, flushed and fsync'd, so
  a crash loses at most the line being written (`read_metrics` skips such a torn line).
- On open, lines with step > start_step are dropped (atomically), so a run resumed from
  the checkpoint at `start_step` leaves the same file as one that was never stopped.
  TensorBoard gets the matching purge marker, so its curves do not double back either.
- Non-finite values are kept as JSON `null` (a NaN loss is a fact worth recording) and
  left out of TensorBoard and W&B, whose plots a single inf would flatten.
- W&B (`wandb=WandbSettings(...)`, imported only then) writes under `run_dir/wandb/`.
  A resumed run continues the same W&B run (its id is kept in `run_dir/wandb_run_id`);
  W&B's history only grows, so steps logged again after a resume from an earlier
  checkpoint are dropped there (metrics.jsonl and TensorBoard rewind instead).

Deliberately left out: rank handling (the driver creates the logger on one rank only) and
any aggregation across steps — each line is exactly what the driver logged.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdpg_megatron.fsio import write_text_atomic

METRICS_FILE_NAME = "metrics.jsonl"
TENSORBOARD_DIR_NAME = "tensorboard"
WANDB_RUN_ID_FILE_NAME = "wandb_run_id"


def read_metrics(path_or_dir: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (given itself or its run directory), in file order.

    `null` values (non-finite when logged) come back as NaN, so every value is a float and
    `step` an int. A torn last line — a crash mid-write — is skipped with a warning; a
    malformed line anywhere else is corruption and raises ValueError.
    """
    path = _metrics_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: pass a run directory holding "
                                f"{METRICS_FILE_NAME} or the .jsonl file itself")
    return [record for _, record in _parse_lines(path)]


@dataclass(frozen=True)
class WandbSettings:
    """Where a run's metrics go in Weights & Biases (config.py's logging.wandb_*)."""

    project: str
    mode: str = "offline"  # "offline": files under run_dir/wandb/, no network; "online": streamed
    run_config: Mapping | None = None  # shown as the W&B run's config (the resolved config tree)

    @classmethod
    def from_logging(cls, logging_config, run_config: Mapping | None = None) -> WandbSettings | None:
        """From a LoggingConfig; None unless logging.wandb is set."""
        if not logging_config.wandb:
            return None
        return cls(project=logging_config.wandb_project, mode=logging_config.wandb_mode, run_config=run_config)


class MetricsLogger:
    """Append-only per-step metrics for one run: JSONL + TensorBoard + W&B + tqdm progress bar.

    Args:
        out_dir: run directory; created if missing.
        total_steps: steps in the whole run (the progress bar's total).
        start_step: last step already done (the resumed checkpoint's step; 0 when fresh).
            Lines after it are dropped from an existing metrics.jsonl.
        tensorboard: also write scalars under `out_dir/tensorboard/`.
        progress: show a tqdm progress bar on stderr.
        progress_keys: metrics shown in the bar's postfix when present in a step.
        wandb: also log to Weights & Biases (None: not at all, and `wandb` is never imported).
    """

    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True,
                 progress_keys: Iterable[str] = ("reward_mean", "accuracy", "entropy",
                                                 "response_length"),
                 wandb: WandbSettings | None = None):
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0 (0 for a fresh run), got {start_step}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE_NAME
        self.progress_keys = tuple(progress_keys)
        self.last_step = _truncate_after(self.path, start_step) if self.path.exists() else None
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _ScalarWriter(self.out_dir / TENSORBOARD_DIR_NAME, purge_from_step=start_step + 1) \
            if tensorboard else None
        self._wandb = _WandbWriter(self.out_dir, wandb, resumed=start_step > 0) if wandb is not None else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one step: a JSON line (fsync'd), TensorBoard scalars, the progress bar."""
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.out_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} is not after the last logged step {self.last_step} "
                             f"in {self.path}; steps must increase (resume with start_step=)")
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; pass the step as the first argument")
        values = {key: _as_float(key, value) for key, value in metrics.items()}

        record = {"step": step, **{key: value if math.isfinite(value) else None
                                   for key, value in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_step = step

        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        if self._tensorboard is not None:
            self._tensorboard.add_scalars(step, finite)
        if self._wandb is not None:
            self._wandb.add_scalars(step, finite)
        if self._bar is not None:
            self._bar.set_postfix({key: f"{values[key]:.4g}" for key in self.progress_keys
                                   if key in values}, refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _ScalarWriter:
    """TensorBoard scalars through tensorboard's own event writer (no TensorFlow, no torch)."""

    def __init__(self, log_dir: Path, *, purge_from_step: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir))
        # TensorBoard drops events at step >= this one from earlier files of the same run
        # directory: a resumed run's curves then continue instead of doubling back.
        self._writer.add_event(Event(step=purge_from_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not scalars:
            return
        summary = self._summary(value=[self._summary.Value(tag=key, simple_value=value)
                                       for key, value in scalars.items()])
        self._writer.add_event(self._event(step=step, wall_time=time.time(), summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbWriter:
    """One W&B run per run directory: a fresh run gets a new id, kept in
    `out_dir/wandb_run_id`; a resumed one continues the run of that id."""

    def __init__(self, out_dir: Path, settings: WandbSettings, *, resumed: bool):
        try:
            import wandb
        except ImportError as error:
            raise ModuleNotFoundError(
                f"logging.wandb is set but the wandb package cannot be imported ({error}): pip install "
                f"wandb==0.31.0 (what requirements/cpu.txt pins), or set logging.wandb=false") from error
        if settings.mode not in ("offline", "online"):
            raise ValueError(f"logging.wandb_mode must be 'offline' or 'online', got {settings.mode!r}")
        id_path = out_dir / WANDB_RUN_ID_FILE_NAME
        run_id = id_path.read_text().strip() if resumed and id_path.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B's own ids: 8 lowercase alphanumerics
            write_text_atomic(id_path, run_id + "\n")
        self._run = wandb.init(project=settings.project, mode=settings.mode, dir=str(out_dir), id=run_id,
                               name=out_dir.resolve().name, resume="allow",
                               config=dict(settings.run_config) if settings.run_config is not None else None)

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if scalars:
            self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


def _as_float(key: str, value) -> float:
    """A metric as a Python float; 1-element tensors and arrays are accepted."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r} is not numeric: {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except (ValueError, RuntimeError) as error:
            raise TypeError(f"metric {key!r} is not a scalar: {error}") from None
        if isinstance(scalar, numbers.Real):
            return float(scalar)
    raise TypeError(f"metric {key!r} is not numeric: {type(value).__name__}")


def _metrics_path(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    return path / METRICS_FILE_NAME if path.is_dir() else path


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) for each line of a metrics file; see read_metrics for bad lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as error:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: ignoring a truncated last line "
                              f"(a run stopped mid-write): {error}", stacklevel=3)
                break
            raise ValueError(f"{path}:{number}: malformed metrics line: {error}") from None
        parsed.append((line, {key: (math.nan if value is None else value) for key, value in record.items()}))
    return parsed


def _truncate_after(path: Path, last_kept_step: int) -> int | None:
    """Keep only the lines with step <= last_kept_step; return the last kept step."""
    kept = [(line, record["step"]) for line, record in _parse_lines(path) if record["step"] <= last_kept_step]
    write_text_atomic(path, "".join(line + "\n" for line, _ in kept))
    return max((step for _, step in kept), default=None)
