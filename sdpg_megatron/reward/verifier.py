"""The verifier: math-verify in worker processes, a hard wall-clock limit per call.

math-verify bounds its own work with `signal.alarm`, which only works in a process's main
thread and, when the resulting error is swallowed, silently scores every answer 0. Here
it runs with those alarms switched off (`parsing_timeout=None`, `timeout_seconds=None`)
in the main thread of spawned worker processes — never forked from the trainer, which
holds torch/gloo threads — and the pool enforces the limit from outside: a worker that
has not answered within `timeout_s` is killed and replaced, and the answer is recorded
as a "timeout". A worker that dies is an "error"; so is an exception raised while
verifying. Both count as wrong and are reported in `RewardBatch.counts`, never hidden.

Before a worker is asked, each response is judged in the trainer process where that is
cheap and certain: no answer region ("unfinished_thinking": thinking mode without
`</think>`), no box in it ("no_answer"), the same normal form as the gold ("correct"), or
an answer too costly to verify ("refused", see `guard.py`), which would otherwise hold
its whole batch up to the timeout.

Model output is untrusted: the trainer process only runs the linear-time extraction,
normalisation and guard of `boxed.py` and `guard.py`; anything that parses or
simplifies runs in a worker.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, get_args

from sdpg_megatron.config import RewardScheme

from sdpg_megatron.reward.boxed import (
    DEFAULT_ANSWER_TAIL_CHARS,
    answer_region,
    extract_boxed,
    normalize_answer,
    overlong_penalty,
)
from sdpg_megatron.reward.guard import answer_too_complex

logger = logging.getLogger(__name__)

# Every outcome of scoring one response; all but "correct" count as wrong. "no_answer":
# no box in the answer region; "unfinished_thinking": thinking mode and no "</think>";
# "refused": an answer too costly to verify (guard.py); "timeout"/"error": the worker.
VERDICT_STATUSES = (
    "correct", "wrong", "no_answer", "unfinished_thinking", "refused", "timeout", "error"
)
# "signed": +1 correct, -1 otherwise (the authors'); "binary": 1 / 0 (config.RewardScheme).
REWARD_SCHEMES = get_args(RewardScheme)

# A spawned worker imports math-verify (sympy, antlr) before it reports ready; that
# start-up is not charged to any answer's timeout_s, but it is bounded too.
_STARTUP_TIMEOUT_S = 120.0
_STOP_GRACE_S = 1.0
_LOGGED_TEXT_CHARS = 200


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: str  # one of VERDICT_STATUSES

    def __post_init__(self) -> None:
        if self.status not in VERDICT_STATUSES:
            raise ValueError(f"Verdict status={self.status!r} is not one of {VERDICT_STATUSES}")
        if self.correct != (self.status == "correct"):
            raise ValueError(f"Verdict correct={self.correct} contradicts status={self.status!r}")


_CORRECT = Verdict(correct=True, status="correct")
_NO_ANSWER = Verdict(correct=False, status="no_answer")
_UNFINISHED_THINKING = Verdict(correct=False, status="unfinished_thinking")
_REFUSED = Verdict(correct=False, status="refused")


def _judge_in_process(
    response: str, gold_answer: str, *, thinking: bool, answer_tail_chars: int | None
) -> Verdict | str:
    """The verdict when it is cheap and certain here, else the prediction for a worker.

    The exact-match fast path comes before the guard: an answer spelled like the gold is
    correct however costly it would be to verify, and only predictions are guarded.
    """
    region = answer_region(response, thinking=thinking, tail_chars=answer_tail_chars)
    if region is None:
        return _UNFINISHED_THINKING
    predicted_answer = extract_boxed(region)
    if predicted_answer is None or not predicted_answer.strip():
        return _NO_ANSWER
    normalized_prediction = normalize_answer(predicted_answer)
    if normalized_prediction and normalized_prediction == normalize_answer(gold_answer):
        return _CORRECT
    reason = answer_too_complex(predicted_answer)
    if reason is not None:
        logger.debug("refused prediction %s: %s", _clip(predicted_answer), reason)
        return _REFUSED
    return predicted_answer


def verify_with_math_verify(gold_answer: str, predicted_answer: str) -> bool:
    """math-verify on two bare answers, gold first; runs inside a worker process.

    Both sides are wrapped as `\\boxed{...}` (math-verify's highest-priority extraction,
    and immune to `$` inside the answer). math-verify's own signal-based timeouts are
    off: the pool's deadline replaces them. Its `raise_on_error=False` default would turn
    exceptions into False; instead every (gold, prediction) parse pair is tried and, if
    none matches and any raised, the first exception propagates (status "error").
    """
    from math_verify import parse, verify

    gold_parses = parse(f"\\boxed{{{gold_answer}}}", parsing_timeout=None, raise_on_error=True)
    pred_parses = parse(
        f"\\boxed{{{predicted_answer}}}", parsing_timeout=None, raise_on_error=True
    )
    first_error: Exception | None = None
    for gold in gold_parses:
        for pred in pred_parses:
            try:
                if verify(gold, pred, timeout_seconds=None, raise_on_error=True):
                    return True
            except Exception as exc:  # noqa: BLE001 — re-raised below unless another pair matches
                first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return False


def _resolve_verify_fn(spec: str | None) -> Callable[[str, str], bool]:
    if spec is None:
        return verify_with_math_verify
    module_name, _, function_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _worker_main(
    conn: multiprocessing.connection.Connection, verify_fn_spec: str | None
) -> None:
    """Worker loop: answer (task_id, gold, prediction) requests until None or EOF."""
    # Ctrl-C reaches the whole process group; the pool, not the worker, decides shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        verify_fn = _resolve_verify_fn(verify_fn_spec)
        # math-verify warns once that its timeouts are off; that is deliberate here.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        import math_verify  # noqa: F401 — pay the import before reporting ready
    except BaseException as exc:  # noqa: BLE001 — reported to the pool, which raises
        conn.send(("startup_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the pool went away
        if request is None:
            return
        task_id, gold_answer, predicted_answer = request
        try:
            status = "correct" if verify_fn(gold_answer, predicted_answer) else "wrong"
            detail = ""
        except Exception as exc:  # noqa: BLE001 — becomes an "error" verdict, counted
            status, detail = "error", f"{type(exc).__name__}: {exc}"
        conn.send((task_id, status, detail))


class _Task(NamedTuple):
    index: int  # position in the batch
    gold_answer: str
    predicted_answer: str


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context, verify_fn_spec: str | None) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main,
            args=(child_conn, verify_fn_spec),
            name="sdpg-verifier",
            daemon=True,
        )
        self.process.start()
        # Only the child may hold its end, so the child's death reads as EOF here.
        child_conn.close()
        self.ready = False
        self.task: _Task | None = None
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    @property
    def waiting(self) -> bool:
        return not self.ready or self.task is not None

    def kill(self) -> None:
        self.process.terminate()
        self.process.join(_STOP_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_STOP_GRACE_S)
        self.conn.close()
        if not self.process.is_alive():
            self.process.close()


class VerifierPool:
    """Scores boxed answers with math-verify in `num_workers` spawned processes.

    Each verification call runs under a hard `timeout_s` wall-clock limit; the pool kills
    and replaces a worker that overruns (verdict "timeout") or dies (verdict "error").
    A batch therefore takes at most about ceil(n / num_workers) · timeout_s, plus worker
    start-up after a replacement. Concurrent calls from several threads are serialised.

    Args:
        num_workers: worker processes, each verifying one answer at a time.
        timeout_s: wall-clock limit for one verification call.
        verify_fn: "module:function" naming an importable `fn(gold_answer,
            predicted_answer) -> bool` that replaces math-verify in the workers (tests use
            it to simulate hangs and crashes); None means math-verify.
    """

    def __init__(
        self, num_workers: int = 2, timeout_s: float = 5.0, verify_fn: str | None = None
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be at least 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        if verify_fn is not None and not all(verify_fn.partition(":")[::2]):
            raise ValueError(f'verify_fn={verify_fn!r} must look like "package.module:function"')
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._verify_fn_spec = verify_fn
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._closed = False
        # Started now, so the math-verify imports overlap with the caller's own set-up.
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def score(
        self,
        responses: list[str],
        answers: list[str],
        *,
        thinking: bool = False,
        answer_tail_chars: int | None = DEFAULT_ANSWER_TAIL_CHARS,
    ) -> list[Verdict]:
        """One Verdict per (response, gold answer) pair, in order.

        The prediction is the last box in `answer_region(response, thinking=thinking,
        tail_chars=answer_tail_chars)`: with `thinking`, after the last `</think>`.
        """
        answer_region("", thinking=False, tail_chars=answer_tail_chars)  # validate first
        if len(responses) != len(answers):
            raise ValueError(
                f"score needs one gold answer per response, got {len(responses)} responses "
                f"and {len(answers)} answers"
            )
        if self._closed:
            raise RuntimeError("VerifierPool.score called after close()")
        verdicts: list[Verdict | None] = [None] * len(responses)
        tasks: deque[_Task] = deque()
        for index, (response, gold_answer) in enumerate(zip(responses, answers)):
            judged = _judge_in_process(
                response, gold_answer, thinking=thinking, answer_tail_chars=answer_tail_chars
            )
            if isinstance(judged, Verdict):
                verdicts[index] = judged
            else:
                tasks.append(_Task(index, gold_answer, judged))
        if tasks:
            with self._lock:
                self._run(tasks, verdicts)
        assert all(verdict is not None for verdict in verdicts)
        return verdicts  # type: ignore[return-value]

    def wait_ready(self) -> None:
        """Block until every worker has started; optional, `score` waits when it must."""
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool.wait_ready called after close()")
            self._run(deque(), [], until_all_ready=True)

    def _run(
        self, tasks: deque[_Task], verdicts: list[Verdict | None], until_all_ready: bool = False
    ) -> None:
        """Keep every worker busy until all tasks have a verdict, enforcing deadlines."""
        while (
            tasks
            or any(worker.task is not None for worker in self._workers)
            or (until_all_ready and not all(worker.ready for worker in self._workers))
        ):
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and tasks:
                    self._dispatch(slot, tasks)
            waiting = [worker for worker in self._workers if worker.waiting]
            assert waiting, "tasks remain but no worker is starting or busy"
            earliest_deadline = min(worker.deadline for worker in waiting)
            readable = multiprocessing.connection.wait(
                [worker.conn for worker in waiting],
                timeout=max(0.0, earliest_deadline - time.monotonic()),
            )
            for slot, worker in enumerate(self._workers):
                if worker.conn in readable:
                    self._receive(slot, verdicts)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.waiting and worker.deadline <= now:
                    self._expire(slot, verdicts)

    def _dispatch(self, slot: int, tasks: deque[_Task]) -> None:
        worker = self._workers[slot]
        task = tasks.popleft()
        try:
            worker.conn.send((task.index, task.gold_answer, task.predicted_answer))
        except (BrokenPipeError, ConnectionError, OSError):
            # The worker died while idle: not this answer's fault, so it is retried.
            logger.warning("verifier worker %d died while idle; restarting it", slot)
            tasks.appendleft(task)
            self._replace(slot)
            return
        worker.task = task
        worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, slot: int, verdicts: list[Verdict | None]) -> None:
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._on_worker_death(slot, verdicts)
            return
        if not worker.ready:
            kind, detail = message
            if kind != "ready":
                self._fail_startup(f"verifier worker failed to start: {detail}")
            worker.ready = True
            return
        task_id, status, detail = message
        task = worker.task
        assert task is not None and task_id == task.index, (task, task_id)
        worker.task = None
        verdicts[task.index] = Verdict(correct=status == "correct", status=status)
        if status == "error":
            logger.warning(
                "verifier raised %s on gold %s, prediction %s",
                detail,
                _clip(task.gold_answer),
                _clip(task.predicted_answer),
            )

    def _on_worker_death(self, slot: int, verdicts: list[Verdict | None]) -> None:
        worker = self._workers[slot]
        worker.process.join(_STOP_GRACE_S)
        exit_code = worker.process.exitcode
        if not worker.ready:
            self._fail_startup(f"verifier worker exited with code {exit_code} before it was ready")
        task = worker.task
        if task is not None:
            verdicts[task.index] = Verdict(correct=False, status="error")
            logger.warning(
                "verifier worker died (exit code %s) on gold %s, prediction %s; restarting it",
                exit_code,
                _clip(task.gold_answer),
                _clip(task.predicted_answer),
            )
        self._replace(slot)

    def _expire(self, slot: int, verdicts: list[Verdict | None]) -> None:
        worker = self._workers[slot]
        if not worker.ready:
            self._fail_startup(
                f"verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s"
            )
        task = worker.task
        assert task is not None
        verdicts[task.index] = Verdict(correct=False, status="timeout")
        logger.warning(
            "verifier timed out after %.1f s on gold %s, prediction %s; restarting the worker",
            self.timeout_s,
            _clip(task.gold_answer),
            _clip(task.predicted_answer),
        )
        self._replace(slot)

    def _start_worker(self) -> _Worker:
        return _Worker(self._context, self._verify_fn_spec)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = self._start_worker()

    def _fail_startup(self, message: str) -> None:
        self.close()
        raise RuntimeError(
            f"{message}. Check that math-verify imports in this Python environment "
            f"(and that verify_fn={self._verify_fn_spec!r} is importable)."
        )

    def close(self) -> None:
        """Stop every worker: a polite request first, then terminate, then kill."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers, self._workers = self._workers, []
            for worker in workers:
                try:
                    worker.conn.send(None)
                except (BrokenPipeError, ConnectionError, OSError):
                    pass
            deadline = time.monotonic() + _STOP_GRACE_S
            for worker in workers:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                worker.kill()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # May run at interpreter shutdown or after a failed __init__: best effort only.
        try:
            if getattr(self, "_lock", None) is not None:
                self.close()
        except Exception:  # noqa: BLE001
            pass


def _clip(text: str) -> str:
    return repr(text if len(text) <= _LOGGED_TEXT_CHARS else text[:_LOGGED_TEXT_CHARS] + "...")


@dataclass
class RewardBatch:
    rewards: list[float]  # scheme's reward plus the overlong penalty, per response
    correct: list[bool]
    counts: dict[str, int]  # each verdict status, plus "overlong" and "truncated"


def score_responses(
    pool: VerifierPool,
    responses: list[str],
    answers: list[str],
    lengths: list[int],
    *,
    max_response_tokens: int,
    overlong_buffer: int | None,
    truncated: list[bool] | None = None,
    thinking: bool = False,
    answer_tail_chars: int | None = DEFAULT_ANSWER_TAIL_CHARS,
    scheme: str = "signed",
) -> RewardBatch:
    """R = (+1 if correct else −1) (+ overlong_penalty(length) when overlong_buffer is set).

    The authors' reward (`compute_score_boxed`): the last `\\boxed{}` in the response's
    last 500 characters is the prediction, +1 right and −1 otherwise, DAPO's overlong
    penalty added on top. Every way of being wrong — a wrong answer, none, unfinished
    thinking, a refused answer, a verifier timeout or error — gets the same −1, so the
    policy gains nothing by hiding in one of them.

    Args:
        responses: decoded response texts (an empty response is scored "no_answer").
        answers: gold answers, one per response.
        lengths: response lengths in tokens.
        max_response_tokens: the rollout's response-length limit L_max.
        overlong_buffer: DAPO's soft-penalty buffer (512 by default in METHOD.md); None
            turns the penalty off.
        truncated: whether each response hit the length limit; None infers it from
            length >= max_response_tokens.
        thinking: responses think first (Qwen3's enable_thinking, data.enable_thinking):
            the answer must follow the last `</think>`; without one the response is
            "unfinished_thinking". Decode with `</think>` kept (Qwen3's is not a special
            token, so skip_special_tokens keeps it).
        answer_tail_chars: the prediction's box must start within the answer region's
            last this-many characters (reward.answer_tail_chars, the authors' 500); None
            reads the whole region.
        scheme: "signed" (+1 / −1, the authors') or "binary" (1 / 0), before the penalty.

    Returns:
        RewardBatch whose counts hold every status in VERDICT_STATUSES, "overlong"
        (responses with a negative penalty) and "truncated".
    """
    if scheme not in REWARD_SCHEMES:
        raise ValueError(
            f"reward scheme={scheme!r} is not one of {REWARD_SCHEMES}: use 'signed' for "
            "+1 / -1 (the authors') or 'binary' for 1 / 0"
        )
    sizes = {"responses": len(responses), "answers": len(answers), "lengths": len(lengths)}
    if truncated is not None:
        sizes["truncated"] = len(truncated)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"score_responses needs lists of equal length, got {sizes}")
    if overlong_buffer is not None:
        overlong_penalty(0, max_response_tokens, overlong_buffer)  # validate before scoring
    if truncated is None:
        truncated = [length >= max_response_tokens for length in lengths]
    wrong_reward = -1.0 if scheme == "signed" else 0.0

    verdicts = pool.score(
        responses, answers, thinking=thinking, answer_tail_chars=answer_tail_chars
    )
    counts = dict.fromkeys(VERDICT_STATUSES, 0) | {"overlong": 0, "truncated": sum(truncated)}
    rewards = []
    for verdict, length in zip(verdicts, lengths):
        counts[verdict.status] += 1
        reward = 1.0 if verdict.correct else wrong_reward
        if overlong_buffer is not None:
            penalty = overlong_penalty(length, max_response_tokens, overlong_buffer)
            counts["overlong"] += penalty < 0
            reward += penalty
        rewards.append(reward)
    return RewardBatch(
        rewards=rewards, correct=[verdict.correct for verdict in verdicts], counts=counts
    )
