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
is not even one). Prompts come from one stream (`PromptSet`): the position after each
step is saved in the checkpoint, so a resumed run draws exactly what the original drew.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpg_megatron.config import Config, config_to_dict
from sdpg_megatron.experience import Sample, StepBatch, make_step_batch

logger = logging.getLogger("sdpg_megatron.driver")
TIMED_PHASES = ("rollout", "reward", "old_logprobs", "reference", "teacher", "train", "sync")


class PhaseTimer:
    def __init__(self):
        self.seconds = {phase: 0.0 for phase in TIMED_PHASES}

    @contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started


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


class Driver:
    """Owns the fleet (its own, or `fleet` when given: tests share one engine), the
    verifier pool, the prompt stream and the metrics sink. `prompt_position`: where the
    prompt stream stands after `start_step` (from the checkpoint; None: the position of a
    run without dynamic sampling, start_step × prompts_per_step)."""

    def __init__(self, config: Config, fleet, start_step: int, prompt_position: int | None = None):
        from transformers import AutoTokenizer

        from sdpg_megatron.data import template_supports_thinking
        from sdpg_megatron.metrics import MetricsLogger
        from sdpg_megatron.reward import VerifierPool

        self.config = config
        out_dir = Path(config.logging.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_dir or config.model.hf_dir)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {config.model.tokenizer_dir or config.model.hf_dir} has no EOS token")
        # thinking mode only where the chat template has the switch (Qwen3's; not the toy's)
        self.thinking = config.data.enable_thinking and template_supports_thinking(self.tokenizer)
        self.prompts = PromptSet(config, self.tokenizer, enable_thinking=self.thinking)
        self.prompts.position = (start_step * config.schedule.prompts_per_step if prompt_position is None
                                 else prompt_position)
        self.verifier = VerifierPool(num_workers=config.reward.num_workers, timeout_s=config.reward.timeout_s)
        self.ray_dir = None
        self.owns_fleet = fleet is None
        self.fleet = fleet if fleet is not None else self._start_fleet()
        self.metrics = MetricsLogger(
            out_dir, total_steps=config.schedule.total_steps, start_step=start_step,
            tensorboard=config.logging.tensorboard, progress=config.logging.progress,
        )
        self.eval_dir = out_dir / "eval"
        self.benchmarks = []
        if config.evaluation.benchmarks:
            from sdpg_megatron.evaluate import EvalHistory, load_benchmarks, parse_benchmark_specs

            self.benchmarks = load_benchmarks(parse_benchmark_specs(config.evaluation.benchmarks), self.tokenizer,
                                              max_prompt_tokens=config.data.max_prompt_tokens,
                                              enable_thinking=self.thinking)
            self.eval_history = EvalHistory.load(self.eval_dir / "summary.json", up_to_step=start_step)

    # ------------------------------------------------------------------ sampling settings

    def sampling(self, max_tokens: int):
        from sdpg_megatron.rollout.engine import SamplingSettings

        r = self.config.rollout
        return SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=max_tokens,
                                stop_token_ids=(self.tokenizer.eos_token_id,))

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

    def rollout(self, step: int, timer: PhaseTimer) -> tuple[StepBatch, dict[str, float]]:
        """The step's experience: one generation batch, or with dynamic sampling as many as
        it takes (at most schedule.max_generation_batches) to fill the step."""
        s = self.config.schedule
        kept, dropped, generated, verdicts = [], [], [], {}
        num_batches = s.max_generation_batches if s.dynamic_sampling else 1
        for j in range(num_batches):
            groups, counts = self._generate(step, j, timer)
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

    def _generate(self, step: int, generation_batch: int, timer: PhaseTimer) -> tuple[list[_Group], dict[str, int]]:
        """prompts_per_step prompts from the stream × G responses, scored; and the count
        of each verifier status."""
        from sdpg_megatron.reward import score_responses

        cfg, r = self.config, self.config.rollout
        group_size = cfg.algorithm.group_size
        problems = self.prompts.take(cfg.schedule.prompts_per_step)
        with timer("rollout"):
            outputs = self.fleet.generate(
                [p.student_ids for p, _ in problems], n=group_size, sampling=self.sampling(r.max_response_tokens),
                seed=rollout_seed(cfg.schedule.seed, step, generation_batch),
            )
        rollouts = [rollout for group in outputs for rollout in group]
        stale = [x.weight_version for x in rollouts if x.weight_version != self.fleet.version]
        if stale:
            raise RuntimeError(f"step {step}: rollouts from weight versions {sorted(set(stale))}, fleet is at {self.fleet.version}")
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

    # ------------------------------------------------------------------ fleet

    def _start_fleet(self):
        from sdpg_megatron.rollout.engine import EngineSettings
        from sdpg_megatron.rollout.fleet import FleetSettings, RolloutFleet, connect_ray

        r = self.config.rollout
        if r.ray_address is None:
            self.ray_dir = tempfile.mkdtemp(prefix="sdpg-ray-", dir="/tmp")  # Ray's socket paths must be short
            os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(self.ray_dir, "vllm-cache"))
        connect_ray(temp_dir=self.ray_dir, address=r.ray_address)
        engine = EngineSettings(
            model_dir=self.config.model.hf_dir, tensor_parallel=r.engine_tensor_parallel, dtype=r.dtype,
            max_model_len=self.config.data.max_prompt_tokens + r.max_response_tokens,
            max_num_seqs=r.max_num_seqs, kv_cache_bytes=r.kv_cache_bytes,
            gpu_memory_utilization=r.gpu_memory_utilization, cpu_threads_bind=r.cpu_threads_bind,
            seed=self.config.schedule.seed,
        )
        logger.info("starting %d rollout engine(s)", r.num_engines)
        return RolloutFleet(FleetSettings(
            num_engines=r.num_engines, engine=engine, cpus_per_engine=r.cpus_per_engine,
            gpus_per_engine=r.gpus_per_engine, request_timeout_s=r.request_timeout_s,
            max_restarts=r.max_restarts, ray_address=r.ray_address,
            weight_transport=r.weight_transport, weight_sync_timeout_s=r.weight_sync_timeout_s,
        ))

    def close(self) -> None:
        self.metrics.close()
        self.verifier.close()
        if self.owns_fleet:
            import ray

            self.fleet.shutdown()
            ray.shutdown()
            if self.ray_dir:
                shutil.rmtree(self.ray_dir, ignore_errors=True)


def _regroup(group: _Group, index: int) -> list[Sample]:
    """The group's samples, renumbered as the step's group `index`."""
    for sample in group.samples:
        sample.group = index
    return group.samples


class PromptSet:
    """The training prompts, loaded, validated and encoded once, read as one stream:
    `take(n)` returns the next n (the stream is a pure function of the seed: each epoch a
    permutation of the problems, see `PromptSampler`) and advances `position`."""

    def __init__(self, config: Config, tokenizer, *, enable_thinking: bool):
        from sdpg_megatron.data import PromptSampler, PromptTooLongError, encode_problem, load_dapo_parquet

        problems, self.num_invalid, self.num_too_long = [], 0, 0
        for path in config.data.train_files:
            report = load_dapo_parquet(path)
            self.num_invalid += report.num_invalid
            for reason in report.invalid:
                logger.warning("%s: skipped %s", path, reason)
            problems.extend(report.problems)
        items = []  # (EncodedPrompt, Problem); uids need not be unique across files
        for problem in problems:
            try:
                encoded = encode_problem(tokenizer, problem, max_prompt_tokens=config.data.max_prompt_tokens,
                                         privileged=config.data.privileged, enable_thinking=enable_thinking)
            except PromptTooLongError as error:
                self.num_too_long += 1
                logger.warning("skipped: %s", error)
                continue
            items.append((encoded, problem))
        if len(items) < config.schedule.prompts_per_step:
            raise ValueError(
                f"data.train_files {list(config.data.train_files)} give {len(items)} usable problems "
                f"({self.num_invalid} invalid rows, {self.num_too_long} prompts over data.max_prompt_tokens); "
                f"a step needs schedule.prompts_per_step={config.schedule.prompts_per_step}"
            )
        logger.info("training data: %d problems (%d invalid rows, %d too long)", len(items), self.num_invalid, self.num_too_long)
        self.sampler = PromptSampler(items, config.schedule.seed)
        self.position = 0

    def take(self, count: int) -> list:
        """[(EncodedPrompt, Problem)] × count, the next ones of the stream."""
        batch = self.sampler.slice(self.position, count)
        self.position += count
        return batch
