"""The vocab-parallel loss on one GPU: naive, torch chunked, Triton kernels, Liger, GEMM bounds.

Forward + backward of log-prob, entropy and exact reverse KL (student + detached teacher)
at N tokens, H hidden, V/tp vocabulary rows (one TP shard on one GPU: the per-rank work;
TP collectives are [2N] and [5N] floats and are not timed here), bf16 inputs:

- naive: full logits (bf16 GEMM, then fp32) and log-softmax over [N, V/tp];
- torch: `vocab_parallel_token_stats(backend="torch")`, the chunked oracle;
- triton: `vocab_parallel_token_stats(backend="triton")`;
- single_pass: `vocab_parallel_token_loss`, the loss's gradient taken in the forward: per
  token chunk two cuBLAS logit GEMMs into fp32 buffers, Triton row kernels for the
  statistics and ∂z, cuBLAS ∂h and ∂W per two chunks (4 GEMMs), ∂W added up in bf16 (one
  rounding per stage; chunk 1024); `single_pass_fp32`: ∂W in an fp32 accumulator (chunk
  512); `@C` sets the chunk to C tokens;
- liger_jsd: Liger-Kernel's Triton `LigerFusedLinearJSD(jsd_beta=1)` = mean KL(p‖q) only;
- liger_chunked: Liger-Kernel's chunked `LigerFusedLinearJSDLoss(beta=1)` (torch.compile);
- gemm4 / gemm6: the lower bound, cuBLAS GEMMs of shape (N, H, V/tp) timed in the same
  run — 2 logit GEMMs + ∂h + ∂W, and the same with the 2 logit GEMMs recomputed.

Time: median of `--repeats` fwd+bwd runs (CUDA events) after warm-up. Peak extra memory:
max allocated during one fwd+bwd minus what was allocated before, minus the two bf16
gradients every method must return. Results go to `--out` as JSON after each method.

    python benchmarks/gpu/bench_fused_loss.py --tp 1 --out results.json

Without a GPU it runs as a smoke test of the script itself (TRITON_INTERPRET=1, tiny
sizes: `--tokens 64 --hidden 32 --vocab 512 --repeats 1`); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdpg_megatron.parallel import vocab_parallel_token_loss, vocab_parallel_token_stats  # noqa: E402
from sdpg_megatron.parallel.reference import naive_token_stats  # noqa: E402

QWEN3_4B = {"hidden": 2560, "vocab": 151936}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(num_tokens: int, hidden: int, rows: int, seed: int):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    student = torch.randn(num_tokens, hidden, device=DEVICE, generator=generator)
    teacher = (student + 0.3 * torch.randn(num_tokens, hidden, device=DEVICE, generator=generator)).bfloat16()
    # logits of standard deviation ~2, as a trained LM head gives on normalised states
    weight = (2 * torch.randn(rows, hidden, device=DEVICE, generator=generator) / hidden**0.5).bfloat16()
    targets = torch.randint(0, rows, (num_tokens,), device=DEVICE, generator=generator)
    upstream = torch.randn(3, num_tokens, device=DEVICE, generator=generator) / num_tokens
    return student.bfloat16().requires_grad_(True), teacher, weight.requires_grad_(True), targets, upstream


def weighted(stats, upstream, rows=slice(None)) -> torch.Tensor:
    """Σ upstream · (log-prob, entropy, KL) over `rows`: the loss every method backpropagates."""
    return (stats.logprobs * upstream[0, rows] + stats.entropy * upstream[1, rows]
            + stats.reverse_kl * upstream[2, rows]).sum()


def method(name: str):
    """A closure (student, teacher, weight, targets, upstream) → scalar to backpropagate."""
    if name in ("torch", "triton"):
        def run(student, teacher, weight, targets, upstream):
            return weighted(vocab_parallel_token_stats(student, weight, targets, teacher, backend=name, validate=False),
                            upstream)
        return run
    if name.startswith("single_pass"):  # single_pass[_fp32][@chunk]
        chunk_size = int(name.split("@")[1]) if "@" in name else None
        fp32_grad_weight = name.split("@")[0].endswith("_fp32")

        def run(student, teacher, weight, targets, upstream):
            token_loss = lambda stats, rows: weighted(stats, upstream, rows)  # noqa: E731
            return vocab_parallel_token_loss(student, weight, targets, teacher, token_loss=token_loss,
                                             chunk_size=chunk_size, fp32_grad_weight=fp32_grad_weight,
                                             validate=False)[0]
        return run
    if name == "naive":
        def run(student, teacher, weight, targets, upstream):
            return weighted(naive_token_stats(student, weight, targets, teacher, dtype=torch.float32,
                                              matmul_in_input_dtype=True), upstream)
        return run
    if name == "liger_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=1.0, temperature=1.0, accum_dtype=torch.float32)
        return lambda student, teacher, weight, targets, upstream: loss(student, weight, teacher, weight, targets)
    if name == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # A fresh compile per use: after the 4096-token precision run, recompiling for the
        # timed shape failed inside dynamo's dynamic-shape guards (torch 2.11, H100 run 5).
        torch._dynamo.reset()
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=True, chunk_size=1024)
        return lambda student, teacher, weight, targets, upstream: loss(student, weight, teacher, weight, targets)
    raise ValueError(name)


def time_cuda(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":  # smoke run
        return [_wall_ms(fn) for _ in range(repeats)]
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _memory(fn) -> tuple[int, int]:
    """(allocated before, peak allocated) around fn()."""
    if DEVICE == "cpu":
        fn()
        return 0, 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return before, torch.cuda.max_memory_allocated()


def measure(name: str, inputs, repeats: int, warmup: int) -> dict:
    student, teacher, weight, targets, upstream = inputs
    run = method(name)

    def step():
        student.grad = weight.grad = None
        run(student, teacher, weight, targets, upstream).backward()

    times = time_cuda(step, repeats, warmup)
    student.grad = weight.grad = None
    before, peak = _memory(step)
    gradient_bytes = (student.numel() + weight.numel()) * 2
    extra = peak - before - gradient_bytes
    result = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
              "peak_extra_gib": extra / 2**30, "repeats": repeats}
    if name in ("torch", "triton"):  # the split between forward and backward
        def forward():
            with torch.no_grad():
                run(student, teacher, weight, targets, upstream)

        result["forward_ms"] = statistics.median(time_cuda(forward, repeats, 1))
    return result


def gemm_bounds(num_tokens: int, hidden: int, rows: int, repeats: int) -> dict:
    a = torch.randn(num_tokens, hidden, device=DEVICE).bfloat16()
    w = torch.randn(rows, hidden, device=DEVICE).bfloat16()
    dz = torch.randn(num_tokens, rows, device=DEVICE).bfloat16()
    out_logits = torch.empty(num_tokens, rows, device=DEVICE, dtype=torch.bfloat16)
    out_h = torch.empty(num_tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    out_w = torch.empty(rows, hidden, device=DEVICE, dtype=torch.bfloat16)
    logits = statistics.median(time_cuda(lambda: torch.mm(a, w.t(), out=out_logits), repeats, 3))
    grad_h = statistics.median(time_cuda(lambda: torch.mm(dz, w, out=out_h), repeats, 3))
    grad_w = statistics.median(time_cuda(lambda: torch.mm(dz.t(), a, out=out_w), repeats, 3))
    flops = 2 * num_tokens * hidden * rows
    del a, w, dz, out_logits, out_h, out_w
    _empty_cache()
    return {
        "logits_ms": logits, "grad_hidden_ms": grad_h, "grad_weight_ms": grad_w,
        "tflops": {k: flops / (v * 1e-3) / 1e12 for k, v in
                   {"logits": logits, "grad_hidden": grad_h, "grad_weight": grad_w}.items()},
        "gemm4_ms": 2 * logits + grad_h + grad_w,
        "gemm6_ms": 4 * logits + grad_h + grad_w,
    }


def agreement(num_tokens: int, hidden: int, rows: int) -> dict:
    """Triton against the torch oracle on the same bf16 inputs (fresh draw)."""
    inputs = make_inputs(num_tokens, hidden, rows, seed=1)
    student, teacher, weight, targets, upstream = inputs
    got = {}
    for name in ("torch", "triton", "single_pass"):
        student.grad = weight.grad = None
        if name == "single_pass":
            loss, stats = vocab_parallel_token_loss(student, weight, targets, teacher,
                                                    token_loss=lambda st, rows: weighted(st, upstream, rows))
        else:
            stats = vocab_parallel_token_stats(student, weight, targets, teacher, backend=name)
            loss = weighted(stats, upstream)
        loss.backward()
        got[name] = [stats.logprobs.detach(), stats.entropy.detach(), stats.reverse_kl.detach(),
                     student.grad.float(), weight.grad.float()]
    names = ["logprobs", "entropy", "reverse_kl", "grad_hidden", "grad_weight"]
    # fp32 statistics agree to rounding; gradients carry one bf16 rounding of ∂z
    bounds = {"logprobs": 1e-5, "entropy": 1e-5, "reverse_kl": 1e-4, "grad_hidden": 1e-2, "grad_weight": 1e-2}
    result = {}
    for fast_name in ("triton", "single_pass"):
        prefix = "" if fast_name == "triton" else "single_pass_"
        for key, oracle, fast in zip(names, got["torch"], got[fast_name]):
            result[prefix + key] = ((fast.double() - oracle.double()).norm() / oracle.double().norm()).item()
            result[prefix + key + "_finite"] = bool(torch.isfinite(fast).all())
        result[prefix + "within_bounds"] = all(
            result[prefix + k] <= v and result[prefix + k + "_finite"] for k, v in bounds.items())
        if not result[prefix + "within_bounds"]:
            print(f"!!! {fast_name} DISAGREES with the torch oracle:", result, flush=True)
    from sdpg_megatron.parallel.chunks import fp32_output_gemms

    result["fp32_output_gemms"] = fp32_output_gemms()
    return result


def precision(num_tokens: int, hidden: int, rows: int) -> dict:
    """How exact each fast method is on the one loss they all compute, mean KL(p ‖ SG q).

    Liger's chunked loss with β = 1 is exactly that loss (checked on CPU in fp64 against
    `vocab_parallel_token_stats`: gradients agree to 2e-6). Every method gets the same bf16
    inputs; the reference is the torch path in fp32 on the same values upcast (no TF32).
    Liger keeps bf16 logits and adds each chunk's ∂W into a bf16 accumulator; naive forms
    bf16 logits; the Triton kernels keep fp32 logits and round ∂z once to bf16."""
    student, teacher, weight, targets, _ = make_inputs(num_tokens, hidden, rows, seed=2)

    def run(loss_fn, hidden_states, weight_values):
        hidden_states = hidden_states.detach().clone().requires_grad_(True)
        weight_values = weight_values.detach().clone().requires_grad_(True)
        loss = loss_fn(hidden_states, weight_values)
        loss.backward()
        return [loss.detach().double(), hidden_states.grad.double(), weight_values.grad.double()]

    def ours(backend, teacher_states):
        return lambda h, w: vocab_parallel_token_stats(h, w, targets, teacher_states, backend=backend,
                                                      validate=False).reverse_kl.mean()

    def single_pass(**options):
        return lambda h, w: vocab_parallel_token_loss(
            h, w, targets, teacher, token_loss=lambda st, rows: st.reverse_kl.sum() / num_tokens, validate=False,
            **options)[0]

    reference = run(ours("torch", teacher.float()), student.float(), weight.float())
    candidates = {
        "triton": ours("triton", teacher),
        # as many ∂W stages (2 chunks each) as at the timed 16384 tokens: 8, and 16 with fp32
        "single_pass": single_pass(chunk_size=num_tokens // 16, fp32_grad_weight=False),
        "single_pass_fp32": single_pass(chunk_size=num_tokens // 32, fp32_grad_weight=True),
        "naive": lambda h, w: naive_token_stats(h, w, targets, teacher, dtype=torch.float32,
                                                matmul_in_input_dtype=True).reverse_kl.mean(),
        "liger_chunked": lambda h, w: method("liger_chunked")(h, teacher, w, targets, None),
    }
    result = {}
    for name, loss_fn in candidates.items():
        try:
            got = run(loss_fn, student, weight)
        except Exception as error:
            result[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        result[name] = {key: ((a - b).norm() / b.norm()).item()
                        for key, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, reference)}
        _empty_cache()
    return result


def profile(name: str, inputs) -> dict:
    """CUDA time per kernel family over one fwd+bwd (torch profiler): where the time goes."""
    student, teacher, weight, targets, upstream = inputs
    run = method(name)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run(student, teacher, weight, targets, upstream).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    student.grad = weight.grad = None
    families: dict[str, float] = {}
    others: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:  # kernels only: ops would count them again
            continue
        device_ms = event.device_time_total / 1e3
        name = event.key.lower()
        family = ("cuBLAS GEMM" if any(k in name for k in ("gemm", "xmma", "cutlass", "nvjet")) else
                  event.key if event.key.startswith("_row_") else "other")
        families[family] = families.get(family, 0.0) + device_ms
        if family == "other":
            others[event.key[:80]] = device_ms
    top = dict(sorted(others.items(), key=lambda item: -item[1])[:8])
    return {"device_ms": families, "other_top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=QWEN3_4B["hidden"])
    parser.add_argument("--vocab", type=int, default=QWEN3_4B["vocab"])
    parser.add_argument("--tp", type=int, default=1, help="time one shard of V/tp rows")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["triton", "single_pass", "single_pass_fp32", "single_pass_fp32@768", "torch", "naive",
                                                         "liger_jsd", "liger_chunked"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from sdpg_megatron.parallel import triton_token_stats

    rows = args.vocab // args.tp
    report = {
        "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "tp": args.tp, "rows": rows},
        "methods": {},
    }

    def save():
        report["triton_configs"] = triton_token_stats.chosen_configs()
        report["triton_tuning"] = triton_token_stats.tuning_report()
        args.out.write_text(json.dumps(report, indent=2))

    try:
        report["agreement_4096_tokens"] = agreement(4096, args.hidden, rows)
    except Exception as error:  # keep timing the baselines even if the kernel is broken here
        report["agreement_4096_tokens"] = {"error": f"{type(error).__name__}: {error}",
                                           "traceback": traceback.format_exc()[-3000:]}
    print("triton vs torch oracle (4096 tokens):", report["agreement_4096_tokens"], flush=True)
    save()
    try:
        report["precision_4096_tokens"] = precision(4096, args.hidden, rows)
    except Exception as error:
        report["precision_4096_tokens"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    print("mean KL vs fp32 oracle (4096 tokens):", report["precision_4096_tokens"], flush=True)
    save()
    report["gemm"] = gemm_bounds(args.tokens, args.hidden, rows, args.repeats)
    print("cuBLAS:", report["gemm"], flush=True)
    save()
    inputs = make_inputs(args.tokens, args.hidden, rows, seed=0)
    for name in args.methods:
        try:
            result = measure(name, inputs, args.repeats, warmup=2)
        except torch.OutOfMemoryError as error:
            result = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        except Exception as error:  # a baseline that does not run here is reported, not fatal
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        for t in inputs[:3]:
            t.grad = None
        _empty_cache()
        report["methods"][name] = result
        print(name, {k: v for k, v in result.items() if k != "traceback"}, flush=True)
        save()
    if "error" not in report["methods"].get("single_pass", {"error": "not run"}):
        try:
            report["profile_single_pass"] = profile("single_pass", inputs)
        except Exception as error:
            report["profile_single_pass"] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print("single_pass profile:", report["profile_single_pass"], flush=True)
        save()
    # the kernels timed a second time: the spread between two runs of the same code
    for name in ("triton", "single_pass"):
        if "error" not in report["methods"].get(name, {"error": "not run"}):
            report["methods"][name + "_again"] = measure(name, inputs, args.repeats, warmup=1)
            save()


if __name__ == "__main__":
    main()
