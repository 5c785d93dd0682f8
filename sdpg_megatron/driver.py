"""Rank 0's side of a step: prompts, rollouts, rewards, evaluation and the metrics sink.

The trainer (`train.py`) owns the model passes on every rank; the driver owns what only
one process should: the prompt stream, the rollout fleet, the verifier pool, the metrics
files. Its `rollout(step)` returns the step's `StepBatch`, which the trainer broadcasts.

Dynamic sampling (DAPO's group filter, `schedule.dynamic_sampling`): a generation batch
is `prompts_per_step` prompts × G responses; groups whose G answers are all right or all
wrong carry no outcome signal and are dropped, and further generation batches are drawn
until `prompts_per_step` informative groups are kept or `max_generation_batches` batches
were generated. Short of a full step, the step trains on as many whole PPO mini-batches
of kept groups as there are (topped up with dropped groups to one mini-batch when there
is not even one). Prompts come from one stream (`data.prompt_set.PromptSet`): the position after each
step is saved in the checkpoint, so a resumed run draws exactly what the original drew.

One step off (`rollout.mode=one_step_off`, docs/rollout.md): `next_batch(k)` hands over
batch k, generated during step k − 1, and starts generating batch k + 1 — the whole
generate / score / refill loop above — on a thread of its own, from the engines' current
weights (one version behind the trainer's by the time it trains on them), while every rank
trains on batch k. The trainer calls `finish_generation` before it pushes new weights (and
so before it evaluates or checkpoints). Batch k + 1 uses the prompt stream and seeds it
would use in sync mode, so the batches do not depend on timing; a checkpoint keeps the
finished batch k + 1, so a resumed run trains on exactly what the original did.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdpg_megatron.config import Config, config_to_dict
from sdpg_megatron.experience import Sample, StepBatch, make_step_batch

logger = logging.getLogger("sdpg_megatron.driver")
TIMED_PHASES = ("rollout", "reward", "old_logprobs", "reference", "teacher", "train", "sync")


class PhaseTimer:
    """Seconds per phase of one step: TIMED_PHASES always, others (one_step_off's
    `rollout_wait`: the trainer blocked on generation) once timed."""

    def __init__(self):
        self.seconds = {phase: 0.0 for phase in TIMED_PHASES}

    @contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

    def add(self, seconds: dict[str, float]) -> None:
        for phase, value in seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + value


def rollout_seed(seed: int, step: int, generation_batch: int) -> int:
    """The engines' sampling seed for generation batch j (0-based) of step k."""
    return seed * 1_000_003 + step + 100_003 * generation_batch


@dataclass
class _Group:
    """One prompt's G scored responses."""

    prompt: object  # EncodedPrompt
    samples: list[Sample]

    @property
    def informative(self) -> bool:
        """Some answers right and some wrong: the group-relative advantage is not all zero."""
        return 0 < sum(s.correct for s in self.samples) < len(self.samples)


class _RolloutAhead:
    """Step `step`'s batch, generated on a thread of its own from engine weight version
    `weight_version` while the trainer trains the step before (rollout.mode=one_step_off).
    One restored from a checkpoint has its result and `versions_behind` instead (the
    trainer's version minus the samples' when it was saved) and no thread."""

    def __init__(self, step: int, weight_version: int | None, position_before: int):
        self.step, self.weight_version = step, weight_version
        self.position_before = position_before  # the prompt stream's, before this batch
        self.position_after: int | None = None
        self.versions_behind: int | None = None
        self.timer = PhaseTimer()
        self.result: tuple[StepBatch, dict[str, float]] | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, produce) -> None:
        """Run `produce(self)` on a thread; `wait` returns its result or raises its error."""

        def run():
            try:
                self.result = produce(self)
            except BaseException as error:  # noqa: BLE001 - raised again by wait(), in the trainer's thread
                self.error = error

        self.thread = threading.Thread(target=run, name=f"rollout-step-{self.step}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> tuple[StepBatch, dict[str, float]]:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class Driver:
    """Owns the fleet (its own, or `fleet` when given: tests share one engine), the
    verifier pool, the prompt stream and the metrics sink. `prompt_position`: where the
    prompt stream stands after `start_step` (from the checkpoint; None: the position of a
    run without dynamic sampling, start_step × prompts_per_step). `ahead`: the checkpoint's
    batch for step start_step + 1, generated ahead under rollout.mode=one_step_off."""

    def __init__(self, config: Config, fleet, start_step: int, prompt_position: int | None = None,
                 ahead: dict | None = None):
        from transformers import AutoTokenizer

        from sdpg_megatron.data import template_supports_thinking
        from sdpg_megatron.data.prompt_set import PromptSet
        from sdpg_megatron.metrics import MetricsLogger, WandbSettings
        from sdpg_megatron.reward import VerifierPool
        from sdpg_megatron.rollout.launch import fleet_settings, running_fleet

        self.config = config
        out_dir = Path(config.logging.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_dir or config.model.hf_dir)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {config.model.tokenizer_dir or config.model.hf_dir} has no EOS token: "
                             "responses would never end; set model.tokenizer_dir to the model's own tokenizer")
        # thinking mode only where the chat template has the switch (Qwen3's; not the toy's)
        self.thinking = config.data.enable_thinking and template_supports_thinking(self.tokenizer)
        self.prompts = PromptSet(
            config.data.train_files, self.tokenizer, max_prompt_tokens=config.data.max_prompt_tokens,
            privileged=config.data.privileged, enable_thinking=self.thinking, seed=config.schedule.seed,
            min_problems=config.schedule.prompts_per_step, privileged_from=config.data.privileged_from)
        self.prompts.position = (start_step * config.schedule.prompts_per_step if prompt_position is None
                                 else prompt_position)
        self._resources = ExitStack()  # close() stops them: metrics sink, fleet (when its own), verifier
        self.verifier = self._resources.enter_context(
            VerifierPool(num_workers=config.reward.num_workers, timeout_s=config.reward.timeout_s))
        try:
            if fleet is None:
                logger.info("starting %d rollout engine(s)", config.rollout.num_engines)
                fleet = self._resources.enter_context(running_fleet(fleet_settings(config)))
            self.fleet = fleet
            self.metrics = MetricsLogger(
                out_dir, total_steps=config.schedule.total_steps, start_step=start_step,
                tensorboard=config.logging.tensorboard, progress=config.logging.progress,
                wandb=WandbSettings.from_logging(config.logging, config_to_dict(config)),
            )
            self._resources.callback(self.metrics.close)
            self._ahead: _RolloutAhead | None = None
            self._closing = threading.Event()
            self._resume_ahead(start_step, ahead)
            self.eval_dir = out_dir / "eval"
            self.benchmarks = []
            if config.evaluation.benchmarks:
                from sdpg_megatron.evaluate import EvalHistory, load_benchmarks, parse_benchmark_specs

                self.benchmarks = load_benchmarks(parse_benchmark_specs(config.evaluation.benchmarks), self.tokenizer,
                                                  max_prompt_tokens=config.data.max_prompt_tokens,
                                                  enable_thinking=self.thinking)
                self.eval_history = EvalHistory.load(self.eval_dir / "summary.json", up_to_step=start_step)
        except BaseException:
            self._resources.close()  # a driver that did not start stops what it started
            raise

    # ------------------------------------------------------------------ sampling settings

    def sampling(self, max_tokens: int):
        """rollout's sampling settings (`rollout.launch.sampling_settings`), up to max_tokens."""
        from sdpg_megatron.rollout.launch import sampling_settings

        return sampling_settings(self.config.rollout, self.tokenizer, max_tokens=max_tokens)

    # ------------------------------------------------------------------ evaluation

    def evaluation_due(self, step: int) -> bool:
        """Step 0 (before training, evaluation.at_start), every evaluation.interval steps and
        the last step; a step already in the history (a resumed run) is not evaluated again."""
        e = self.config.evaluation
        if not self.benchmarks or not e.interval:
            return False
        if step == 0:
            return e.at_start and not any(0 in scores for scores in self.eval_history.scores.values())
        return step % e.interval == 0 or step == self.config.schedule.total_steps

    def maybe_evaluate(self, step: int) -> dict[str, float]:
        """pass@1 mean@k on the benchmarks when `evaluation_due(step)`; per-problem results in
        eval/step_XXXXXXXX.json, Last/Best over every evaluated step in eval/summary.json."""
        from sdpg_megatron.evaluate import evaluate
        from sdpg_megatron.fsio import write_json_atomic

        if not self.evaluation_due(step):
            return {}
        # the trainer evaluates after its push, which waited for the batch generated ahead
        assert self._ahead is None or not self._ahead.running, "evaluation while a rollout is in flight"
        e, r = self.config.evaluation, self.config.rollout
        started = time.perf_counter()
        results = evaluate(self.fleet, self.tokenizer, self.verifier, self.benchmarks, k=e.k,
                           sampling=self.sampling(e.max_response_tokens or r.max_response_tokens),
                           seed=self.config.schedule.seed, thinking=self.thinking,
                           answer_tail_chars=self.config.reward.answer_tail_chars)
        self.eval_history.add(step, results)
        write_json_atomic(self.eval_dir / f"step_{step:08d}.json", {"step": step, "k": e.k, "benchmarks": results})
        write_json_atomic(self.eval_dir / "summary.json", self.eval_history.summary())
        metrics = {f"eval/{name}/pass@1": result["pass@1"] for name, result in results.items()}
        metrics["time/eval"] = time.perf_counter() - started
        return metrics

    # ------------------------------------------------------------------ rollouts

    def next_batch(self, step: int, timer: PhaseTimer) -> tuple[StepBatch, dict[str, float]]:
        """Step `step`'s experience and metrics, with the samples' staleness: how many weight
        versions they are behind the trainer (whose weights the engines hold right now).

        sync: generated now. one_step_off: the batch generated during the previous step (at
        a run's first step, or a resume from a checkpoint without it: generated now), and
        the next step's batch starts generating (`finish_generation` waits for it)."""
        if self.config.rollout.mode == "sync":
            batch, metrics = self.rollout(step, timer)
        else:
            batch, metrics = self._take_ahead(step, timer)
            if step < self.config.schedule.total_steps:
                self._start_ahead(step + 1)
        staleness = [self.fleet.version - sample.weight_version for sample in batch.samples]
        metrics.update({"rollout/staleness_mean": sum(staleness) / len(staleness),
                        "rollout/staleness_max": max(staleness)})
        return batch, metrics

    def finish_generation(self, timer: PhaseTimer) -> None:
        """Wait for the batch being generated ahead, raising its error: the engines must
        keep their weights until it is complete, so the trainer calls this before a push."""
        if self._ahead is not None and self._ahead.thread is not None:
            with timer("rollout_wait"):
                self._ahead.wait()

    @property
    def trained_prompt_position(self) -> int:
        """The prompt stream's position after the batches handed to the trainer (a batch
        generated ahead is not among them): what a checkpoint records."""
        return self.prompts.position if self._ahead is None else self._ahead.position_before

    def saved_ahead(self) -> dict | None:
        """For the checkpoint (after the trainer's push, so complete): the batch generated
        ahead, its metrics, where it leaves the prompt stream and how many weight versions
        it is behind the trainer; None when there is none (sync mode, the last step)."""
        if self._ahead is None:
            return None
        batch, metrics = self._ahead.wait()
        (version,) = {sample.weight_version for sample in batch.samples}  # one version per batch
        return {
            "step": self._ahead.step, "group_size": batch.group_size, "metrics": dict(metrics),
            "samples": [asdict(sample) for sample in batch.samples], "seconds": dict(self._ahead.timer.seconds),
            "prompt_position_after": self._ahead.position_after, "versions_behind": self.fleet.version - version,
        }

    def _resume_ahead(self, start_step: int, saved: dict | None) -> None:
        """Take over the checkpoint's batch generated ahead (one_step_off), so the resumed run
        trains on what the original did; without one, the first step's batch is generated
        from the restored weights (staleness 0)."""
        one_step_off = self.config.rollout.mode == "one_step_off"
        if saved is None:
            if one_step_off and start_step > 0:
                logger.warning("rollout.mode=one_step_off: the checkpoint of step %d holds no batch generated "
                               "ahead (a sync run wrote it, or it was the run's last step); step %d's batch is "
                               "generated from the restored weights (staleness 0)", start_step, start_step + 1)
            return
        if not one_step_off:
            logger.info("rollout.mode=sync: the checkpoint's batch for step %d, generated ahead by a one_step_off "
                        "run, is not used; it is generated again from the restored weights", saved["step"])
            return
        if saved["step"] != start_step + 1 or saved["group_size"] != self.config.algorithm.group_size:
            raise ValueError(f"the checkpoint of step {start_step} holds a batch for step {saved['step']} of group "
                             f"size {saved['group_size']}; this run needs step {start_step + 1}, algorithm.group_size="
                             f"{self.config.algorithm.group_size}: resume with the config the run was started with")
        ahead = _RolloutAhead(saved["step"], None, self.prompts.position)
        samples = [Sample(**fields) for fields in saved["samples"]]
        ahead.result = (make_step_batch(saved["step"], samples, saved["group_size"]), dict(saved["metrics"]))
        ahead.timer.add(saved["seconds"])
        ahead.position_after, ahead.versions_behind = saved["prompt_position_after"], saved["versions_behind"]
        self.prompts.position = ahead.position_after
        self._ahead = ahead

    def _start_ahead(self, step: int) -> None:
        ahead = _RolloutAhead(step, self.fleet.version, self.prompts.position)
        ahead.start(self._generate_ahead)
        self._ahead = ahead

    def _generate_ahead(self, ahead: _RolloutAhead) -> tuple[StepBatch, dict[str, float]]:
        """On the rollout thread: the whole sync-mode rollout, from the version `ahead` names."""
        result = self.rollout(ahead.step, ahead.timer, weight_version=ahead.weight_version)
        ahead.position_after = self.prompts.position
        return result

    def _take_ahead(self, step: int, timer: PhaseTimer) -> tuple[StepBatch, dict[str, float]]:
        """The batch generated ahead for `step` (its generation time counted in this step's
        rollout phases), or one generated now when there is none."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            with timer("rollout_wait"):
                return self.rollout(step, timer)
        assert ahead.step == step, f"the batch generated ahead is for step {ahead.step}, not {step}"
        with timer("rollout_wait"):
            batch, metrics = ahead.wait()
        timer.add(ahead.timer.seconds)
        if ahead.versions_behind is not None:  # from a checkpoint: the versions of this run's fleet
            for sample in batch.samples:
                sample.weight_version = self.fleet.version - ahead.versions_behind
        return batch, metrics

    def rollout(self, step: int, timer: PhaseTimer, *,
                weight_version: int | None = None) -> tuple[StepBatch, dict[str, float]]:
        """The step's experience: one generation batch, or with dynamic sampling as many as
        it takes (at most schedule.max_generation_batches) to fill the step; every response
        from engine weight version `weight_version` (None: the fleet's current one)."""
        s = self.config.schedule
        kept, dropped, generated, verdicts = [], [], [], {}
        num_batches = s.max_generation_batches if s.dynamic_sampling else 1
        for j in range(num_batches):
            if self._closing.is_set():  # close() while a rollout runs ahead: stop at a batch boundary
                raise RuntimeError(f"step {step}: rollout stopped, the driver is closing")
            groups, counts = self._generate(step, j, timer, weight_version)
            generated += groups
            for status, count in counts.items():
                verdicts[status] = verdicts.get(status, 0) + count
            kept += [g for g in groups if g.informative or not s.dynamic_sampling]
            dropped += [g for g in groups if s.dynamic_sampling and not g.informative]
            if len(kept) >= s.prompts_per_step:
                break
        trained = self._fill(kept, dropped)
        samples = [sample for index, group in enumerate(trained) for sample in _regroup(group, index)]
        metrics = self._rollout_metrics(generated, verdicts)
        if s.dynamic_sampling:
            metrics.update({
                "dynamic_sampling/generation_batches": j + 1,
                "dynamic_sampling/filtered_frac": len(dropped) / len(generated),
                "dynamic_sampling/groups_trained": len(trained),
                "dynamic_sampling/uninformative_trained": sum(not g.informative for g in trained),
            })
        return make_step_batch(step, samples, self.config.algorithm.group_size), metrics

    def _fill(self, kept: list[_Group], dropped: list[_Group]) -> list[_Group]:
        """The groups the step trains on: prompts_per_step of the kept ones, else as many
        whole PPO mini-batches of them as there are, else one mini-batch topped up with
        dropped groups (the step still runs: the anchor and the schedules go on)."""
        s = self.config.schedule
        if len(kept) >= s.prompts_per_step:
            return kept[:s.prompts_per_step]
        per_minibatch = s.prompts_per_step // s.minibatches_per_step
        whole = len(kept) // per_minibatch * per_minibatch
        if whole:
            logger.warning("dynamic sampling: %d informative groups after %d generation batches; training on %d",
                           len(kept), s.max_generation_batches, whole)
            return kept[:whole]
        logger.warning("dynamic sampling: %d informative groups after %d generation batches; one mini-batch "
                       "topped up with %d uninformative groups", len(kept), s.max_generation_batches,
                       per_minibatch - len(kept))
        return kept + dropped[:per_minibatch - len(kept)]

    def _generate(self, step: int, generation_batch: int, timer: PhaseTimer,
                  weight_version: int | None) -> tuple[list[_Group], dict[str, int]]:
        """prompts_per_step prompts from the stream × G responses, scored; and the count
        of each verifier status."""
        from sdpg_megatron.reward import score_responses

        cfg, r = self.config, self.config.rollout
        group_size = cfg.algorithm.group_size
        expected = self.fleet.version if weight_version is None else weight_version
        # sync mode leaves the check to the fleet's own version (as before this option existed)
        pinned = {} if weight_version is None else {"expected_version": weight_version}
        problems = self.prompts.take(cfg.schedule.prompts_per_step)
        with timer("rollout"):
            outputs = self.fleet.generate(
                [p.student_ids for p, _ in problems], n=group_size, sampling=self.sampling(r.max_response_tokens),
                seed=rollout_seed(cfg.schedule.seed, step, generation_batch), **pinned,
            )
        rollouts = [rollout for group in outputs for rollout in group]
        stale = [x.weight_version for x in rollouts if x.weight_version != expected]
        if stale:
            raise RuntimeError(f"step {step}: rollouts from weight versions {sorted(set(stale))}, expected {expected}")
        with timer("reward"):
            texts = [self.tokenizer.decode(x.token_ids, skip_special_tokens=True) for x in rollouts]
            scored = score_responses(
                self.verifier, texts, [problems[x.prompt_index][1].answer for x in rollouts],
                [len(x.token_ids) for x in rollouts], max_response_tokens=r.max_response_tokens,
                overlong_buffer=cfg.reward.overlong_buffer, truncated=[x.finish_reason == "length" for x in rollouts],
                thinking=self.thinking, scheme=cfg.reward.scheme, answer_tail_chars=cfg.reward.answer_tail_chars,
            )
        groups = [_Group(prompt, []) for prompt, _ in problems]
        for x, reward, correct in zip(rollouts, scored.rewards, scored.correct):
            prompt = problems[x.prompt_index][0]
            groups[x.prompt_index].samples.append(Sample(
                group=x.prompt_index, student_prompt=prompt.student_ids, teacher_prompt=prompt.teacher_ids,
                response=list(x.token_ids), rollout_logprobs=list(x.logprobs), reward=reward, correct=correct,
                weight_version=x.weight_version, rollout_routed_experts=x.routed_experts,
            ))
        return groups, scored.counts

    def _rollout_metrics(self, groups: list[_Group], verdicts: dict[str, int]) -> dict[str, float]:
        """Over every generated response of the step (with dynamic sampling: also those of
        dropped groups, so accuracy is the policy's, not the filter's)."""
        samples = [s for g in groups for s in g.samples]
        total = len(samples)
        lengths = torch.tensor([len(s.response) for s in samples], dtype=torch.float64)
        correct = torch.tensor([s.correct for s in samples], dtype=torch.float64).reshape(len(groups), -1)
        return {
            "reward_mean": sum(s.reward for s in samples) / total,
            "accuracy": correct.mean().item(),
            "pass_at_group": (correct.amax(dim=1)).mean().item(),
            "response_length": lengths.mean().item(),
            "response_length_max": lengths.max().item(),
            **{f"verifier/{status}": count / total for status, count in verdicts.items()},
            "data/invalid_rows": self.prompts.num_invalid,
            "data/too_long": self.prompts.num_too_long,
        }

    def close(self) -> None:
        self._closing.set()
        if self._ahead is not None and self._ahead.running:  # it uses the fleet and the verifier
            logger.info("waiting for the rollout of step %d to stop at its generation batch's end", self._ahead.step)
            self._ahead.thread.join()
        self._resources.close()


def _regroup(group: _Group, index: int) -> list[Sample]:
    """The group's samples, renumbered as the step's group `index`."""
    for sample in group.samples:
        sample.group = index
    return group.samples
