"""The SDPG training loop (docs/design.md, "One training step"), for every preset of
docs/method.md.

Launch with torchrun (srun + torchrun on Slurm; the arguments are `cli.py`'s); global rank 0
is the driver (`driver.py`): it owns the data, the verifier pool and the rollout fleet, and
broadcasts each step's experience.

    torchrun --nproc-per-node 2 -m sdpg_megatron.train --preset sdpg-urkl \\
        --hf-dir ckpt/qwen3-4b --train-data dapo.parquet --out-dir runs/sdpg --tp 2 \\
        --set schedule.total_steps=400

Each step: prompts from a seeded stream → fleet generates G responses → verifier rewards
[→ more prompts while dynamic sampling drops uninformative groups] → [π_old forward]
[→ reference forward] → advantages → per PPO mini-batch: [teacher forward] then student
forward/backward with the fused vocab-parallel loss and an optimizer step → weight push →
metrics, evaluation, checkpoint. With rollout.mode=one_step_off the next step's rollout runs
on the driver beside this step's passes, and the push waits for it (driver.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_megatron.algo import current_beta, group_relative_advantages, teacher_sample_mask
from sdpg_megatron.cli import init_distributed, parse_args
from sdpg_megatron.config import Config, config_to_dict, validate
from sdpg_megatron.driver import Driver, PhaseTimer
from sdpg_megatron.experience import StepBatch, gated_token_scale, micro_batches, minibatch_sample_ids
from sdpg_megatron.model.training import set_rollout_step
from sdpg_megatron.parallel.groups import ParallelGroups, destroy_parallel, initialize_parallel
from sdpg_megatron.passes import ModelPasses
from sdpg_megatron.rollout.routing import RoutingMismatchMeter

logger = logging.getLogger("sdpg_megatron.train")


class Trainer:
    """One training run on this rank. Collective: every rank constructs it and calls
    `run()`; rank 0 additionally drives the fleet (its own, or `fleet` when given, which is
    how tests share one engine between runs)."""

    def __init__(self, config: Config, groups: ParallelGroups, *, fleet=None):
        from sdpg_megatron.checkpoint import load_checkpoint
        from sdpg_megatron.layout import plan_layout
        from sdpg_megatron.model.hf_io import HFCheckpoint

        self.config = validate(config)
        self.groups = groups
        self.is_driver = dist.get_rank() == 0
        self.out_dir = Path(config.logging.out_dir)
        self.checkpoint_dir = Path(config.checkpoint.dir or self.out_dir / "checkpoints")
        source = HFCheckpoint(config.model.hf_dir)
        self.arch = source.arch
        # the dry run's divisibility checks, at this world size (memory is not judged here)
        plan_layout(config, self.arch, world_size=dist.get_world_size(), allow_overflow=True)
        self.passes = ModelPasses(config, groups, source)
        self.start_step = 0
        state = load_checkpoint(self.checkpoint_dir, self.passes.policy, groups)
        if state is not None:  # model, optimizer, LR schedule position and RNG restored
            self.start_step = int(state["step"])
            if self.is_driver:
                logger.info("resuming after step %d from %s", self.start_step, self.checkpoint_dir)
        self.driver = None

        def start_driver():
            self.driver = Driver(config, fleet, self.start_step, prompt_position=(state or {}).get("prompt_position"),
                                 ahead=(state or {}).get("driver_state"))

        self._from_driver(start_driver)
        self._push_weights()  # the engines serve exactly the trainer's weights from the first step

    # ------------------------------------------------------------------ the loop

    def run(self, stop_after: int | None = None) -> None:
        """Train to schedule.total_steps (or stop after step `stop_after`, as a preempted
        job would; a new Trainer on the same out_dir resumes from the last checkpoint)."""
        total = self.config.schedule.total_steps
        last = total if stop_after is None else min(total, stop_after)
        try:
            if self.is_driver and self.start_step == 0 and self.driver.evaluation_due(0):
                self.driver.metrics.log(0, self.driver.maybe_evaluate(0))  # the starting point of Last/Best
            for step in range(self.start_step + 1, last + 1):
                metrics = self.step(step)
                if self.is_driver:
                    metrics.update(self.driver.maybe_evaluate(step))
                    self.driver.metrics.log(step, metrics)
                interval = self.config.checkpoint.interval
                if step == total or (interval and step % interval == 0):
                    self._save(step)
        finally:
            self.close()

    def step(self, step: int) -> dict[str, float]:
        """One rollout step k = `step` (1-based), numbered as in docs/design.md, "One training
        step"; returns the driver's metrics (other ranks: {})."""
        cfg, timer, started = self.config, PhaseTimer(), time.perf_counter()
        # 1-5. prompts, rollouts, rewards, dynamic sampling on the driver; every rank gets the batch
        # (one_step_off: the batch generated during the last step, and the next one starts generating)
        batch, rollout_metrics = self._from_driver(lambda: self.driver.next_batch(step, timer))
        set_rollout_step(self.passes.policy, step)
        num_minibatches = batch.num_groups * cfg.schedule.minibatches_per_step // cfg.schedule.prompts_per_step
        plan = minibatch_sample_ids(batch, num_minibatches, self.groups.dp_size, self.groups.dp_rank)
        # 6-7. π_old and π_ref forwards, before any update of the step (GRPO: k1 KL into the rewards)
        old, reference, rewards, mismatch = self._forward_passes(batch, plan, timer)
        # 8. advantages, and the samples the loss uses the teacher for (A > 0 under the gate)
        advantages = group_relative_advantages(rewards, batch.group_size, cfg.algorithm.advantage_eps).float()
        needed = teacher_sample_mask(cfg.algorithm, advantages, step, cfg.schedule.total_steps)
        # 9. per PPO mini-batch: teacher forward, student forward/backward, optimizer step
        results = []
        for m, ids in enumerate(plan):
            mbs = self._micro_batches(batch, ids, advantages)
            teacher = None
            if cfg.algorithm.uses_teacher:
                with timer("teacher"):
                    teacher = self.passes.teacher_states(batch, mbs, needed)
            scale = gated_token_scale(batch, advantages, m, num_minibatches) if cfg.algorithm.loss_tokens == "gated" \
                else 1.0
            with timer("train"):
                results.append(self.passes.train(batch, mbs, step, teacher, None if reference is None else reference[m],
                                                 first_minibatch=m == 0, old=None if old is None else old[m],
                                                 gated_token_scale=scale))
        # 10. push (once the batch generated ahead is complete: the engines keep their weights till then)
        self._from_driver(lambda: self.driver.finish_generation(timer))
        with timer("sync"):
            push = self._push_weights()
        # 11. record (run() evaluates and checkpoints)
        metrics = self.passes.reduce_metrics(results)
        if not self.is_driver:
            return {}
        grad_norms = [r.grad_norm for r in results if r.update_successful]
        return {
            **metrics, **rollout_metrics, **mismatch,
            "beta": current_beta(cfg.algorithm, step, cfg.schedule.total_steps),
            "lr": results[-1].lr,  # every update's with the rollout-step warm-up; else the last one's
            "updates": len(results),
            "advantage_abs_mean": advantages.abs().mean().item(),
            # groups whose rewards were all equal: no outcome signal, OPD gated off
            "zero_advantage_groups": (advantages.reshape(-1, batch.group_size).abs().amax(1) == 0).float().mean().item(),
            **({"teacher_samples_frac": needed.float().mean().item()} if cfg.algorithm.uses_teacher else {}),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "skipped_updates": sum(not r.update_successful for r in results),
            "weights/version": self.driver.fleet.version,
            "weights/push_seconds": push["seconds"],
            "weights/push_bytes": push["bytes"],
            "time/step": time.perf_counter() - started,
            **{f"time/{phase}": seconds for phase, seconds in timer.seconds.items()},
        }

    def _micro_batches(self, batch: StepBatch, ids: list[int], advantages: torch.Tensor):
        s = self.config.schedule
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return micro_batches(batch, ids, s.micro_batch_size, advantages, 0, device, max_tokens=s.max_tokens_per_micro_batch)

    def _forward_passes(self, batch: StepBatch, plan: list[list[int]], timer: PhaseTimer):
        """The forward-only passes over every mini-batch before any update: per mini-batch
        log π_old (old_logprobs=recompute, else None) and log π_ref (when needed, else None),
        the rewards (less GRPO's k1 KL) and the engine-vs-trainer mismatch metrics."""
        cfg = self.config
        rewards = torch.tensor([s.reward for s in batch.samples], dtype=torch.float64)
        recompute, uses_reference = cfg.algorithm.old_logprobs == "recompute", self.passes.reference is not None
        if not (recompute or uses_reference):
            return None, None, rewards, {}
        # advantages are not known yet, nor needed by these passes
        shapes = [self._micro_batches(batch, ids, torch.zeros(len(batch.samples))) for ids in plan]
        old, reference, mismatch = None, None, {}
        if recompute:
            # mixture of experts: the engine's routing of each response against the trainer's
            routing = RoutingMismatchMeter(self.arch.num_layers) if self.arch.is_moe and all(
                s.rollout_routed_experts is not None for s in batch.samples) else None
            with timer("old_logprobs"):
                old = [self.passes.old_logprobs(batch, mbs, routing) for mbs in shapes]
            mismatch = self.passes.mismatch_metrics(shapes, old)
            if routing is not None:
                groups = self.groups
                mismatch.update(routing.reduce(tp_rank=groups.tp_rank, is_last_stage=groups.is_last_stage,
                                               pp_group=groups.pp_group))
        if uses_reference:
            with timer("reference"):
                reference = [self.passes.reference_logprobs(batch, mbs) for mbs in shapes]
            if cfg.algorithm.kl_in_reward_coef > 0:
                rewards = rewards - cfg.algorithm.kl_in_reward_coef * self._k1_per_sample(batch, shapes, old, reference)
        return old, reference, rewards, mismatch

    def _k1_per_sample(self, batch: StepBatch, shapes, old, reference) -> torch.Tensor:
        """Σ_t (log π_old − log π_ref) per sample: GRPO's k1 KL folded into the reward."""
        if old is None:
            return self.passes.sum_per_sample(batch, shapes, reference, lambda mb, ref: mb.rollout_logprobs - ref)
        paired = [list(zip(o, r)) for o, r in zip(old, reference)]
        return self.passes.sum_per_sample(batch, shapes, paired, lambda mb, pair: pair[0] - pair[1])

    def _from_driver(self, produce):
        """Rank 0 runs `produce()` and every rank gets its result; if it raises, every rank
        raises too (instead of waiting forever in the next collective)."""
        box = [None]
        if self.is_driver:
            try:
                box = [("ok", produce())]
            except BaseException as error:
                dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise RuntimeError(f"the driver (rank 0) failed: {value}")
        return value

    # ------------------------------------------------------------------ weights, checkpoints

    def _push_weights(self) -> dict:
        """Collective: gather, rename and bucket the weights; the driver pushes them."""
        from sdpg_megatron.rollout.buckets import hf_buckets

        buckets = hf_buckets(
            self.passes.policy.module, self.arch, self.groups,
            bucket_bytes=self.config.rollout.bucket_bytes, dtype=getattr(torch, self.config.rollout.dtype),
            allocate=self.driver.fleet.bucket_allocator() if self.is_driver else None,
        )
        if not self.is_driver:
            for _ in buckets:  # non-driver ranks take part in the gathers and sends
                pass

        def push():
            try:
                return self.driver.fleet.push_weights(buckets, self.driver.fleet.version + 1)
            finally:
                # A failed push leaves the loop early; the other ranks still wait in the bucket
                # gathers, so finish them (nothing is sent) before the failure is broadcast.
                for _ in buckets:
                    pass

        return self._from_driver(push)

    def _save(self, step: int) -> None:
        from sdpg_megatron.checkpoint import save_checkpoint

        state, ahead = {"step": step, "config": config_to_dict(self.config)}, None
        if self.driver is not None:  # rank 0 writes the trainer state (and one_step_off's next batch)
            state["prompt_position"] = self.driver.trained_prompt_position
            ahead = self.driver.saved_ahead()
        path = save_checkpoint(self.checkpoint_dir, step, self.passes.policy, self.groups, state,
                               keep_last=self.config.checkpoint.keep_last, driver_state=ahead)
        if self.is_driver:
            logger.info("step %d: checkpoint %s", step, path)

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver = None


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    # SIGTERM (torchrun tearing a failed job down, Slurm preempting it) unwinds through the
    # `finally` blocks, so the driver stops its engines and its local Ray instance.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
        format=f"[rank {dist.get_rank()}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-bucket parameter listings
    groups = initialize_parallel(
        tensor_parallel=config.parallel.tensor_parallel, pipeline_parallel=config.parallel.pipeline_parallel,
        expert_parallel=config.parallel.expert_parallel,
        expert_tensor_parallel=config.parallel.expert_tensor_parallel, seed=config.schedule.seed,
    )
    try:
        Trainer(config, groups).run()
    finally:
        destroy_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

