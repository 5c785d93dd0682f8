"""The SDPG training loop (docs/design.md, "One training step"), for every preset of
docs/method.md.

Launch with torchrun (srun + torchrun on Slurm); global rank 0 is the driver (`driver.py`):
it owns the data, the verifier pool and the rollout fleet, and broadcasts each step's
experience.

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

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_megatron.algo import current_beta, group_relative_advantages, teacher_sample_mask
from sdpg_megatron.config import Config, apply_overrides, config_from_dict, config_to_dict, validate
from sdpg_megatron.driver import Driver, PhaseTimer
from sdpg_megatron.presets import ALGORITHM_PRESETS, apply_preset
from sdpg_megatron.experience import StepBatch, micro_batches, minibatch_sample_ids
from sdpg_megatron.model.training import set_rollout_step
from sdpg_megatron.parallel.groups import ParallelGroups, destroy_parallel, initialize_parallel
from sdpg_megatron.passes import ModelPasses

logger = logging.getLogger("sdpg_megatron.train")


class Trainer:
    """One training run on this rank. Collective: every rank constructs it and calls
    `run()`; rank 0 additionally drives the fleet (its own, or `fleet` when given, which is
    how tests share one engine between runs)."""

    def __init__(self, config: Config, groups: ParallelGroups, *, fleet=None):
        from sdpg_megatron.checkpoint import load_checkpoint
        from sdpg_megatron.model.hf_io import HFCheckpoint

        self.config = validate(config)
        self.groups = groups
        self.is_driver = dist.get_rank() == 0
        self.out_dir = Path(config.logging.out_dir)
        self.checkpoint_dir = Path(config.checkpoint.dir or self.out_dir / "checkpoints")
        from sdpg_megatron.layout import plan_layout

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
        """One rollout step k = `step` (1-based); returns the driver's metrics (others: {})."""
        cfg, timer = self.config, PhaseTimer()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        started = time.perf_counter()
        driver_metrics = {}

        def rollout():  # one_step_off: also starts generating the next step's batch
            batch, metrics = self.driver.next_batch(step, timer)
            driver_metrics.update(metrics)
            return batch

        batch = self._from_driver(rollout)
        set_rollout_step(self.passes.policy, step)

        num_minibatches = batch.num_groups * cfg.schedule.minibatches_per_step // cfg.schedule.prompts_per_step
        plan = minibatch_sample_ids(batch, num_minibatches, self.groups.dp_size, self.groups.dp_rank)
        rewards = torch.tensor([s.reward for s in batch.samples], dtype=torch.float64)
        # the forward-only passes' micro-batches (advantages are not known yet, nor needed)
        shapes = [micro_batches(batch, ids, cfg.schedule.micro_batch_size, torch.zeros(len(batch.samples)), 0, device,
                                max_tokens=cfg.schedule.max_tokens_per_micro_batch) for ids in plan] if cfg.algorithm.old_logprobs == "recompute" or self.passes.reference is not None else []
        old, mismatch = None, {}
        if cfg.algorithm.old_logprobs == "recompute":  # before any update of this step
            with timer("old_logprobs"):
                old = [self.passes.old_logprobs(batch, mbs) for mbs in shapes]
            mismatch = self.passes.mismatch_metrics(shapes, old)
        reference = None
        if self.passes.reference is not None:
            with timer("reference"):
                reference = [self.passes.reference_logprobs(batch, mbs) for mbs in shapes]
            if cfg.algorithm.kl_in_reward_coef > 0:
                rewards = rewards - cfg.algorithm.kl_in_reward_coef * self._k1_per_sample(batch, shapes, old, reference)
        advantages = group_relative_advantages(rewards, batch.group_size, cfg.algorithm.advantage_eps).float()
        # the samples the loss uses the teacher for (A > 0 under the gate): the teacher pass skips the rest
        needed = teacher_sample_mask(cfg.algorithm, advantages, step, cfg.schedule.total_steps)

        results = []
        for m, ids in enumerate(plan):
            mbs = micro_batches(batch, ids, cfg.schedule.micro_batch_size, advantages, 0, device,
                                max_tokens=cfg.schedule.max_tokens_per_micro_batch)
            teacher = None
            if cfg.algorithm.uses_teacher:
                with timer("teacher"):
                    teacher = self.passes.teacher_states(batch, mbs, needed)
            with timer("train"):
                results.append(self.passes.train(
                    batch, mbs, step, teacher, None if reference is None else reference[m], first_minibatch=m == 0,
                    old=None if old is None else old[m],
                    gated_token_scale=_gated_token_scale(batch, advantages, m, num_minibatches)
                    if cfg.algorithm.loss_tokens == "gated" else 1.0))
        self._from_driver(lambda: self.driver.finish_generation(timer))  # before the engines change weights
        with timer("sync"):
            push = self._push_weights()

        metrics = self.passes.reduce_metrics(results)
        if not self.is_driver:
            return {}
        grad_norms = [r.grad_norm for r in results if r.update_successful]
        metrics.update(driver_metrics)
        metrics.update(mismatch)
        metrics.update({
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
        })
        return metrics

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


def _gated_token_scale(batch: StepBatch, advantages: torch.Tensor, minibatch: int, num_minibatches: int) -> float:
    """(all response tokens) / (tokens of samples with A > 0) of PPO mini-batch `minibatch`,
    over every data-parallel rank: turns the token-mean over all tokens into one over the
    gated tokens (algorithm.loss_tokens="gated")."""
    per_minibatch = len(batch.samples) // num_minibatches
    ids = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
    lengths = [len(batch.samples[i].response) for i in ids]
    gated = sum(length for i, length in zip(ids, lengths) if advantages[i] > 0)
    return sum(lengths) / gated if gated else 0.0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="sdpg_megatron.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a JSON config written by an earlier run (out_dir/config.json)")
    parser.add_argument("--preset", help=f"algorithm preset: {', '.join(ALGORITHM_PRESETS)}")
    parser.add_argument("--hf-dir", help="Hugging Face Qwen3 directory: initial weights, config and tokenizer")
    parser.add_argument("--train-data", action="append", help="DAPO-schema parquet (repeatable)")
    parser.add_argument("--out-dir", help="run directory: metrics, TensorBoard, checkpoints")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--steps", type=int, help="schedule.total_steps")
    parser.add_argument("--seed", type=int, help="schedule.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="any config field, e.g. --set rollout.max_response_tokens=2048 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    plan = parser.add_argument_group("dry run (no GPUs needed)")
    plan.add_argument("--dry-run", action="store_true",
                      help="check config, parallel layout and per-GPU memory for --world-size ranks; print them and exit")
    plan.add_argument("--world-size", type=int, help="trainer ranks (default TP × PP)")
    plan.add_argument("--gpus-per-node", type=int, help="trainer GPUs per node (TP must stay inside one)")
    plan.add_argument("--rollout-gpus", type=int, help="GPUs for the vLLM fleet (checks engines × engine TP fit)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument("--arch", help="Qwen3 preset (qwen3-4b, ...) to plan with while --hf-dir has no config.json")
    plan.add_argument("--quiet", action="store_true", help="print nothing unless the check fails")
    args = parser.parse_args(argv)
    try:
        config = config_from_dict(json.loads(Path(args.config).read_text())) if args.config else Config()
        if args.preset:
            apply_preset(config, args.preset)
        shortcuts = {
            "model.hf_dir": args.hf_dir, "logging.out_dir": args.out_dir, "parallel.tensor_parallel": args.tp,
            "parallel.pipeline_parallel": args.pp, "schedule.total_steps": args.steps, "schedule.seed": args.seed,
        }
        apply_overrides(config, [f"{key}={value}" for key, value in shortcuts.items() if value is not None])
        if args.train_data:
            config.data.train_files = tuple(args.train_data)
        apply_overrides(config, args.overrides)
        validate(config)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        sys.exit(0)
    if args.dry_run:
        try:
            report = dry_run(config, world_size=args.world_size, gpus_per_node=args.gpus_per_node,
                             rollout_gpus=args.rollout_gpus, gpu_memory_gib=args.gpu_memory_gib, arch_name=args.arch)
        except (ValueError, OSError) as error:
            parser.exit(2, f"{parser.prog}: dry run: {error}\n")
        if not args.quiet:
            print(report)
        sys.exit(0)
    return config


def dry_run(config: Config, *, world_size: int | None, gpus_per_node: int | None, rollout_gpus: int | None,
            gpu_memory_gib: float = 80.0, arch_name: str | None = None) -> str:
    """The launch checks of `layout.plan_layout` on this machine (no GPUs, no torch.distributed):
    returns the resolved config, layout and memory table; raises ValueError naming the fix."""
    from sdpg_megatron.layout import plan_layout
    from sdpg_megatron.model.convert import read_model_info
    from sdpg_megatron.model.mcore_checkpoint import is_checkpoint
    from sdpg_megatron.model.qwen3 import from_hf_config, qwen3_preset

    notes = []
    hf_config = Path(config.model.hf_dir) / "config.json"
    if hf_config.is_file():
        arch = from_hf_config(json.loads(hf_config.read_text()), source=str(hf_config))
    elif arch_name:
        arch = qwen3_preset(arch_name)
        notes.append(f"{hf_config} not found here: planned with the {arch_name} preset")
    else:
        raise FileNotFoundError(f"{hf_config} not found; pass --arch (e.g. qwen3-4b) to plan without it")
    padded_vocab = None
    mcore_dir = config.model.mcore_dir
    if mcore_dir and is_checkpoint(mcore_dir):
        saved_arch, padded_vocab, _ = read_model_info(mcore_dir)
        if saved_arch != arch:
            raise ValueError(f"model.mcore_dir={mcore_dir} holds another model than {hf_config}; convert it again")
    elif mcore_dir:
        notes.append(f"model.mcore_dir={mcore_dir} does not exist yet: the job converts {config.model.hf_dir} into it")
    benchmarks = [spec.partition("=")[2] for spec in config.evaluation.benchmarks]
    notes += [f"not found here: {path}" for path in (*config.data.train_files, *benchmarks) if not Path(path).exists()]
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    layout = plan_layout(config, arch, world_size=world_size or tp * pp, gpus_per_node=gpus_per_node,
                         gpu_memory_gib=gpu_memory_gib, rollout_gpus=rollout_gpus, padded_vocab=padded_vocab)
    algo, sched = config.algorithm, config.schedule
    header = (f"{algo.name}: {sched.total_steps} steps, lr {config.optimizer.lr}, β_base {algo.beta_base}, "
              f"anchor {algo.anchor} α {algo.alpha}, out_dir {config.logging.out_dir}")
    return "\n".join([header, layout.describe(), *(f"note: {note}" for note in notes), "dry run: OK"])


def init_distributed() -> None:
    """torch.distributed from torchrun's environment (or a world of one without it)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        seed=config.schedule.seed,
    )
    try:
        Trainer(config, groups).run()
    finally:
        destroy_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

