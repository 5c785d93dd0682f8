"""One full SDPG training step of a Qwen3-0.6B-shaped Megatron model on one GPU:
the fused loss's Triton kernels (statistics, then autograd), its single pass (gradient in the
forward), and the naive full-logits loss.

A randomly initialised Qwen3-0.6B (28 layers, hidden 1024, vocabulary 151,936; Megatron's
local layer spec, bf16 parameters, distributed Adam) runs the trainer's own passes
(`ModelPasses`): π_ref log-probs, the teacher's hidden states on the privileged view, and
the student forward/backward with the SDPG-URKL loss plus one optimizer step. The only
difference between the runs is how hidden states become the loss: `ModelPasses._stats`
(kernel, naive) or `vocab_parallel_token_loss` (single_pass, `model.loss_mode`). Reports response tokens per second (median step) and
peak GPU memory for each.

    python benchmarks/gpu/bench_train_step.py --out step.json

Without a GPU it runs as a smoke test of the script (`--arch qwen3-tiny`, the torch loss in
place of the kernels); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdpg_megatron.algo import teacher_sample_mask  # noqa: E402
from sdpg_megatron.config import Config  # noqa: E402
from sdpg_megatron.presets import sdpg_urkl  # noqa: E402
from sdpg_megatron.experience import Sample, make_step_batch, micro_batches  # noqa: E402
from sdpg_megatron.model.qwen3 import qwen3_preset  # noqa: E402
from sdpg_megatron.parallel import TokenStats  # noqa: E402
from sdpg_megatron.parallel.groups import initialize_parallel  # noqa: E402
from sdpg_megatron.parallel.reference import naive_token_stats  # noqa: E402
from sdpg_megatron.passes import ModelPasses  # noqa: E402


class NaiveLossPasses(ModelPasses):
    """The same passes with the loss on full [N, V] fp32 logits (TP = 1 only)."""

    def _stats(self, hidden, weight, targets, teacher=None) -> TokenStats:
        return naive_token_stats(hidden, weight, targets, teacher, vocab_size=self.arch.vocab_size,
                                 temperature=self.config.rollout.temperature, dtype=torch.float32,
                                 matmul_in_input_dtype=True)


def synthetic_batch(num_prompts: int, group_size: int, prompt: int, hint: int, response: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for g in range(num_prompts):
        student_prompt = torch.randint(0, vocab, (prompt,), generator=generator).tolist()
        teacher_prompt = student_prompt + torch.randint(0, vocab, (hint,), generator=generator).tolist()
        for i in range(group_size):
            tokens = torch.randint(0, vocab, (response,), generator=generator).tolist()
            samples.append(Sample(group=g, student_prompt=student_prompt, teacher_prompt=teacher_prompt,
                                  response=tokens, rollout_logprobs=[-11.0] * response,
                                  reward=float(i % 2), correct=bool(i % 2)))
    batch = make_step_batch(1, samples, group_size)
    advantages = torch.tensor([1.0 if s.correct else -1.0 for s in samples])
    return batch, advantages


CUDA = torch.cuda.is_available()


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def one_step(passes: ModelPasses, batch, mbs, step: int, needed=None) -> float:
    synchronize()
    start = time.perf_counter()
    reference = passes.reference_logprobs(batch, mbs)
    teacher = passes.teacher_states(batch, mbs, needed)
    result = passes.train(batch, mbs, step, teacher, reference, first_minibatch=True)
    synchronize()
    if not result.update_successful:
        raise RuntimeError(f"step {step}: the optimizer skipped the update (non-finite gradients)")
    return time.perf_counter() - start


# name: (passes class, model.loss_mode)
LOSSES = {"kernel": (ModelPasses, "stats"), "single_pass": (ModelPasses, "single_pass"),
          "naive": (NaiveLossPasses, "stats")}


def run_each_in_its_own_process(args) -> None:
    """This script once per loss, merged into one report. In one process a later loss would
    start with the earlier models still allocated: Megatron's DDP keeps its parameters alive
    through the gradient hooks it registers (H100 run 11: ~10 GiB per model left behind)."""
    passthrough, skip = [], False
    for token in sys.argv[1:]:
        if token.startswith("--"):
            skip = token in ("--losses", "--out")
        if not skip:
            passthrough.append(token)
    report = None
    for offset, name in enumerate(args.losses):
        part = args.out.with_name(f"{args.out.stem}.{name}.json")
        part.unlink(missing_ok=True)
        port = int(os.environ.get("MASTER_PORT", "29517")) + 1 + offset
        subprocess.run([sys.executable, __file__, *passthrough, "--losses", name, "--out", str(part)],
                       env={**os.environ, "MASTER_PORT": str(port)}, check=False)
        piece = json.loads(part.read_text()) if part.exists() else \
            {"losses": {name: {"error": "its process ended without a report (see the output above)"}}}
        part.unlink(missing_ok=True)
        if report is None:
            report = {key: value for key, value in piece.items() if key != "losses"} | {"losses": {}}
        report["losses"].update(piece["losses"])
        args.out.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--hint-tokens", type=int, default=128)
    parser.add_argument("--response-tokens", type=int, default=760)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loss (after one warm-up step)")
    parser.add_argument("--arch", default="qwen3-0.6b", help="model shape (qwen3-tiny for a CPU smoke run)")
    parser.add_argument("--teacher-scope", choices=["all", "needed"], default="all",
                        help="algorithm.teacher_scope: 'needed' runs the teacher on the half of the "
                             "samples with A > 0 only (both losses alike)")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES),
                        help="several: each in a process of its own (a clean GPU for its memory figures)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.losses) > 1:
        run_each_in_its_own_process(args)
        return

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if CUDA:
        torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl" if CUDA else "gloo", rank=0, world_size=1)
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    arch = qwen3_preset(args.arch)
    config = Config()
    config.algorithm = sdpg_urkl()
    config.algorithm.teacher_scope = args.teacher_scope
    config.model.params_dtype = "bfloat16"
    config.schedule.micro_batch_size = args.micro_batch_size

    batch, advantages = synthetic_batch(args.prompts, args.group_size, args.prompt_tokens, args.hint_tokens,
                                        args.response_tokens, arch.vocab_size, seed=0)
    ids = list(range(len(batch.samples)))
    mbs = micro_batches(batch, ids, args.micro_batch_size, advantages, 0, "cuda" if CUDA else "cpu")
    # at a step with β(k) > 0 the gate decides: the samples with A > 0 (under teacher_scope=needed)
    needed = teacher_sample_mask(config.algorithm, advantages, 100, 400)
    response_tokens = sum(mb.num_tokens for mb in mbs)
    report = {"card": torch.cuda.get_device_name() if CUDA else "cpu (smoke run)",
              "date": datetime.date.today().isoformat(),
              "model": f"{args.arch} shape, random init, local spec, bf16", "samples": len(batch.samples),
              "teacher_scope": args.teacher_scope, "teacher_samples": int(needed.sum()),
              "student_length": batch.student_length, "teacher_length": batch.teacher_length,
              "response_tokens_per_step": response_tokens, "micro_batches": len(mbs), "losses": {}}

    for name in args.losses:
        cls, mode = LOSSES[name]
        config.model.loss_backend = "torch" if name == "naive" or not CUDA else "triton"
        config.model.loss_mode = mode
        passes = cls(config, groups, None, arch=arch)
        synchronize()
        try:
            warm = one_step(passes, batch, mbs, 1, needed)
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated() if CUDA else 0
            times = [one_step(passes, batch, mbs, 2 + k, needed) for k in range(args.steps)]
            median = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() if CUDA else 0
            report["losses"][name] = {
                "step_s": median, "steps_s": times, "warmup_step_s": warm,
                "response_tokens_per_s": response_tokens / median,
                "peak_memory_gib": peak / 2**30,
                "peak_over_resident_gib": (peak - allocated) / 2**30,  # above weights/grads/Adam
            }
        except torch.OutOfMemoryError as error:
            report["losses"][name] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        except Exception as error:  # report it and still measure the other loss
            import traceback

            report["losses"][name] = {"error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc()[-3000:]}
        print(name, report["losses"][name], flush=True)
        del passes
        args.out.write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
