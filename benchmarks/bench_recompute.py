"""Activation recomputation on CPU: the student's training pass under each setting,
against no recomputation in the same run.

A randomly initialised small Qwen3 (8 layers, hidden 512, local spec, fp32, TP1) runs the
trainer's own passes (`ModelPasses`, SDPG-URKL) on a synthetic batch. The π_ref and
teacher passes run once, untimed: they are forward-only and store no activations under
any setting. Each setting of `parallel.recompute_*` then times the training pass
(`ModelPasses.train`: forward, backward and one Adam step over all micro-batches). It
also tracks what autograd holds for backward while that pass runs, with saved-tensor
hooks: bytes of distinct storages, parameters excluded, live and at their peak,
recomputed units included. The peak is the activation memory that recomputation trades
for time. The step's loss and gradient norm must match the setting without recomputation.

    .venv/bin/python benchmarks/bench_recompute.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_recompute.py --quick    # tiny shape, seconds

Writes benchmarks/results/recompute_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

from bench_train_step import synthetic_batch  # noqa: E402

from sdpg_megatron.config import Config  # noqa: E402
from sdpg_megatron.presets import sdpg_urkl  # noqa: E402
from sdpg_megatron.experience import micro_batches  # noqa: E402
from sdpg_megatron.model.qwen3 import Qwen3Arch, qwen3_tiny  # noqa: E402
from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel  # noqa: E402
from sdpg_megatron.passes import ModelPasses  # noqa: E402

# name → (recompute_granularity, recompute_method, recompute_num_layers)
SETTINGS = {
    "none": ("none", "uniform", 1),
    "selective": ("selective", "uniform", 1),
    "full, uniform 1": ("full", "uniform", 1),
    "full, uniform 4": ("full", "uniform", 4),
    "full, block 4": ("full", "block", 4),
}


class SavedActivations:
    """Bytes autograd holds for backward (distinct storages, parameters excluded), live
    and at their peak, while the context is open."""

    def __init__(self, parameters):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.live: dict[int, list[int]] = {}  # storage pointer → [references, bytes]
        self.bytes = self.peak = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.parameter_storages or storage.nbytes() == 0:
            return tensor
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    @contextlib.contextmanager
    def track(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def bench_arch(quick: bool) -> Qwen3Arch:
    if quick:
        return qwen3_tiny(vocab_size=512, num_layers=4)
    return dataclasses.replace(
        qwen3_tiny(vocab_size=4096, num_layers=8), hidden_size=512, ffn_hidden_size=1536,
        num_attention_heads=8, num_query_groups=4, kv_channels=64,
    )


def measure(name: str, setting, arch, batch, mbs, steps: int) -> dict:
    granularity, method, num_layers = setting
    # Megatron's parallel state and RNG tracker afresh: the same random initialisation each time
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    config = Config()
    config.algorithm = sdpg_urkl()
    config.schedule.micro_batch_size = mbs[0].tokens.shape[0]
    config.model.loss_backend = "torch"
    config.parallel.recompute_granularity = granularity
    config.parallel.recompute_method = method
    config.parallel.recompute_num_layers = num_layers
    passes = ModelPasses(config, groups, None, arch=arch)
    reference = passes.reference_logprobs(batch, mbs)
    teacher = passes.teacher_states(batch, mbs)
    tracker = SavedActivations(passes.policy.module.parameters())
    times, first = [], None
    for step in range(1, steps + 2):  # the first step warms up and is the one compared
        start = time.perf_counter()
        with tracker.track():
            result = passes.train(batch, mbs, step, teacher, reference, first_minibatch=True)
        elapsed = time.perf_counter() - start
        if not result.update_successful:
            raise RuntimeError(f"{name}: step {step} was skipped (non-finite gradients)")
        if first is None:
            first = {"grad_norm": float(result.grad_norm), "loss": sum(float(r["loss"]) for r in result.losses)}
        else:
            times.append(elapsed)
    destroy_parallel()
    return {"setting": list(setting), "train_pass_s": statistics.median(times), "train_pass_all_s": times,
            "peak_saved_mib": tracker.peak / 2**20, "first_step": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape (a smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="timed training passes per setting (after one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recompute_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    arch = bench_arch(args.quick)
    prompts, response = (2, 48) if args.quick else (2, 384)
    batch, advantages = synthetic_batch(prompts, 4, 32 if args.quick else 128, 16 if args.quick else 32,
                                        response, arch.vocab_size, seed=0)
    mbs = micro_batches(batch, list(range(len(batch.samples))), 4, advantages, 0)
    report = {
        "date": datetime.date.today().isoformat(), "device": f"cpu, {torch.get_num_threads()} threads",
        "model": {"layers": arch.num_layers, "hidden": arch.hidden_size, "ffn": arch.ffn_hidden_size,
                  "heads": arch.num_attention_heads, "kv_heads": arch.num_query_groups, "vocab": arch.vocab_size,
                  "spec": "local (unfused attention)", "dtype": "float32"},
        "batch": {"samples": len(batch.samples), "micro_batches": len(mbs), "micro_batch_size": 4,
                  "student_length": batch.student_length, "response_tokens": sum(mb.num_tokens for mb in mbs)},
        "settings": {},
    }
    for name, setting in SETTINGS.items():
        if args.quick and setting[2] > arch.num_layers:
            continue
        result = measure(name, setting, arch, batch, mbs, args.steps)
        report["settings"][name] = result
        print(f"{name:<16} train pass {result['train_pass_s']:.3f} s, peak saved {result['peak_saved_mib']:.1f} MiB",
              flush=True)
    base = report["settings"]["none"]
    rows = ["| setting | train pass s | time / none | peak saved MiB | memory / none | grad norm rel. diff |",
            "|---|---|---|---|---|---|"]
    for name, result in report["settings"].items():
        result["time_ratio"] = result["train_pass_s"] / base["train_pass_s"]
        result["memory_ratio"] = result["peak_saved_mib"] / base["peak_saved_mib"]
        result["grad_norm_rel_diff"] = abs(result["first_step"]["grad_norm"] / base["first_step"]["grad_norm"] - 1)
        rows.append(f"| {name} | {result['train_pass_s']:.3f} | {result['time_ratio']:.2f} | "
                    f"{result['peak_saved_mib']:.1f} | {result['memory_ratio']:.3f} | {result['grad_norm_rel_diff']:.1e} |")
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()
    bad = {n: r["grad_norm_rel_diff"] for n, r in report["settings"].items() if r["grad_norm_rel_diff"] > 1e-5}
    bad.update({n + " (loss)": r["first_step"]["loss"] for n, r in report["settings"].items()
                if abs(r["first_step"]["loss"] - base["first_step"]["loss"]) > 1e-6 * abs(base["first_step"]["loss"])})
    if bad:
        raise SystemExit(f"recomputation changed the step's gradient norm: {bad}")


if __name__ == "__main__":
    main()
