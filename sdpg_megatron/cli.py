"""The trainer's command line (`python -m sdpg_megatron.train`, `train.main`): arguments to
a validated `Config`, the dry run's launch checks, and torch.distributed from torchrun's
environment.

    torchrun --nproc-per-node 2 -m sdpg_megatron.train --preset sdpg-urkl \\
        --hf-dir ckpt/qwen3-4b --train-data dapo.parquet --out-dir runs/sdpg --tp 2 \\
        --set schedule.total_steps=400
    python -m sdpg_megatron.train --preset sdpg-urkl --hf-dir ckpt/qwen3-4b --tp 2 --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_megatron.cli_paths import input_file
from sdpg_megatron.config import Config, apply_overrides, config_from_dict, config_to_dict, validate
from sdpg_megatron.presets import ALGORITHM_PRESETS, apply_preset

DESCRIPTION = "SDPG training (Megatron-Core policy, vLLM rollout fleet); every preset of docs/method.md."


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="sdpg_megatron.train", description=DESCRIPTION)
    parser.add_argument("--config", help="a JSON config written by an earlier run (out_dir/config.json)")
    parser.add_argument("--preset", help=f"algorithm preset: {', '.join(ALGORITHM_PRESETS)}")
    parser.add_argument("--hf-dir", help="Hugging Face Qwen3 directory: initial weights, config and tokenizer")
    parser.add_argument("--train-data", action="append", help="DAPO-schema parquet (repeatable)")
    parser.add_argument("--out-dir", help="run directory: metrics, TensorBoard, checkpoints")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, help="expert-parallel size (mixture-of-experts models)")
    parser.add_argument("--etp", type=int, help="expert-tensor-parallel size (mixture-of-experts models)")
    parser.add_argument("--steps", type=int, help="schedule.total_steps")
    parser.add_argument("--seed", type=int, help="schedule.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="any config field, e.g. --set rollout.max_response_tokens=2048 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    plan = parser.add_argument_group("dry run (no GPUs needed)")
    plan.add_argument("--dry-run", action="store_true",
                      help="check config, parallel layout and per-GPU memory for --world-size ranks; print them and exit")
    plan.add_argument("--world-size", type=int,
                      help="trainer ranks (default TP × PP, or the fewest whose TP × DP holds EP × ETP)")
    plan.add_argument("--gpus-per-node", type=int, help="trainer GPUs per node (TP must stay inside one)")
    plan.add_argument("--rollout-gpus", type=int, help="GPUs for the vLLM fleet (checks engines × engine TP fit)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument("--arch", help="Qwen3 preset (qwen3-4b, ...) to plan with while --hf-dir has no config.json")
    plan.add_argument("--quiet", action="store_true", help="print nothing unless the check fails")
    args = parser.parse_args(argv)
    try:
        config = Config()
        if args.config:
            path = input_file(args.config, "--config", what="a config JSON written by an earlier run (its out_dir/config.json)")
            try:
                config = config_from_dict(json.loads(path.read_text()))
            except json.JSONDecodeError as error:
                raise ValueError(f"--config {path}: not JSON ({error}); pass a config.json written by an earlier run")
        if args.preset:
            apply_preset(config, args.preset)
        shortcuts = {
            "model.hf_dir": args.hf_dir, "logging.out_dir": args.out_dir, "parallel.tensor_parallel": args.tp,
            "parallel.pipeline_parallel": args.pp, "parallel.expert_parallel": args.ep,
            "parallel.expert_tensor_parallel": args.etp, "schedule.total_steps": args.steps, "schedule.seed": args.seed,
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
    returns the resolved config, layout and memory table; raises ValueError naming the fix.
    The parallel sizes, expert ones included, are `config.parallel`'s (--tp/--pp/--ep/--etp)."""
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
    par = config.parallel
    # the fewest ranks for the layout: TP × PP, with DP enough for EP × ETP to divide TP × DP
    fewest = par.pipeline_parallel * math.lcm(par.tensor_parallel, par.expert_parallel * par.expert_tensor_parallel)
    layout = plan_layout(config, arch, world_size=world_size or fewest, gpus_per_node=gpus_per_node,
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
