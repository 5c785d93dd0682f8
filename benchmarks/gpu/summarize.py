"""Tables from the JSON files of `benchmarks/gpu/run.sh` (printed and written as markdown).

    python benchmarks/gpu/summarize.py DIR    # reads DIR/fused_tp*.json, train_step*.json, anatomy.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["naive", "torch", "triton", "triton_again", "single_pass", "single_pass_again", "liger_jsd", "liger_chunked"]


def _ordered(methods: dict) -> list[str]:
    """ORDER first, then anything else the run timed (single_pass@C ...)."""
    return [n for n in ORDER if n in methods] + [n for n in methods if n not in ORDER]


def fused_table(report: dict) -> list[str]:
    shape, gemm, methods = report["shape"], report.get("gemm", {}), report["methods"]
    naive = methods.get("naive", {})
    lines = [
        f"### N = {shape['tokens']}, H = {shape['hidden']}, V/tp = {shape['rows']} (tp {shape['tp']}), bf16, fwd+bwd — "
        f"{report['card']}, {report['date']}",
        "",
        "| method | ms (median) | min–max | peak extra GiB | memory / naive | time / 6-GEMM bound | time / 4-GEMM bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(methods):
        result = methods[name]
        if "error" in result:
            lines.append(f"| {name} | {result['error'][:90]} | | | | | |")
            continue
        memory = f"{result['peak_extra_gib'] / naive['peak_extra_gib']:.3f}" if "peak_extra_gib" in naive else "n/a"
        lines.append(
            f"| {name} | {result['ms']:.1f} | {result['ms_min']:.1f}–{result['ms_max']:.1f} | "
            f"{result['peak_extra_gib']:.2f} | {memory} | "
            f"{result['ms'] / gemm['gemm6_ms']:.2f} | {result['ms'] / gemm['gemm4_ms']:.2f} |"
        )
    if gemm:
        lines += ["", f"cuBLAS bf16 (N, H, V/tp): logits {gemm['logits_ms']:.2f} ms, ∂h {gemm['grad_hidden_ms']:.2f} ms, "
                  f"∂W {gemm['grad_weight_ms']:.2f} ms ({', '.join(f'{k} {v:.0f}' for k, v in gemm['tflops'].items())} TFLOP/s); "
                  f"4-GEMM bound {gemm['gemm4_ms']:.1f} ms, 6-GEMM bound {gemm['gemm6_ms']:.1f} ms."]
    agreement = report.get("agreement_4096_tokens", {})
    if agreement and "error" not in agreement:
        lines += ["", "Triton and single_pass vs the torch oracle (4096 tokens, same bf16 inputs), relative error: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items() if isinstance(v, float))
                  + f"; within bounds: {agreement.get('within_bounds')} / {agreement.get('single_pass_within_bounds')}"]
    precision = report.get("precision_4096_tokens", {})
    if precision and "error" not in precision:
        lines += ["", "Mean KL(p ‖ SG q) from the same bf16 inputs vs the fp32 torch path (4096 tokens), "
                  "relative error of loss / ∂h / ∂W: " + "; ".join(
                      f"{name} {r['loss']:.1e} / {r['grad_hidden']:.1e} / {r['grad_weight']:.1e}"
                      if "error" not in r else f"{name}: {r['error'][:60]}" for name, r in precision.items())]
    split = [f"{name} forward {methods[name]['forward_ms']:.1f} ms of {methods[name]['ms']:.1f}"
             for name in ("triton", "torch") if "forward_ms" in methods.get(name, {})]
    if split:
        lines += ["", "Forward alone: " + "; ".join(split) + "."]
    elif agreement:
        lines += ["", f"Triton vs torch: {agreement['error']}"]
    if report.get("triton_configs"):
        lines += ["", "Tuned configurations: " + "; ".join(f"{k}: {v}" for k, v in report["triton_configs"].items())]
    for key, tuning in report.get("triton_tuning", {}).items():
        lines += ["", *tuning_lines(key, tuning)]
    return lines


def tuning_lines(key: str, tuning: dict) -> list[str]:
    """The tuner's timings of every candidate for one shape, fastest first."""
    timed = sorted(tuning["ms"].items(), key=lambda item: item[1])
    lines = [f"Tuner, {key}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in timed) + " ms"]
    if tuning.get("failed"):
        lines.append("  failed: " + "; ".join(f"{name} ({error[:80]})" for name, error in tuning["failed"].items()))
    if tuning.get("disagreed"):
        lines.append("  disagreed with the reference: " + ", ".join(
            f"{name} ({error:.1e})" for name, error in tuning["disagreed"].items()))
    return lines


def step_table(report: dict) -> list[str]:
    lines = [
        f"### One SDPG step, {report['model']}, {report['samples']} samples × "
        f"{report['student_length']} tokens ({report['response_tokens_per_step']} response tokens)"
        + (f", teacher on {report['teacher_samples']} of {report['samples']} samples ({report['teacher_scope']})"
           if "teacher_scope" in report else "")
        + f" — {report['card']}, {report['date']}",
        "",
        "| loss | step s (median) | min–max (steps) | response tokens/s | peak GiB | peak over resident GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in report["losses"].items():
        if "error" in result:
            lines.append(f"| {name} | {result['error'][:100]} | | | | |")
        else:
            steps = result["steps_s"]
            lines.append(f"| {name} | {result['step_s']:.3f} | {min(steps):.3f}–{max(steps):.3f} ({len(steps)}) | "
                         f"{result['response_tokens_per_s']:.0f} | "
                         f"{result['peak_memory_gib']:.2f} | {result['peak_over_resident_gib']:.2f} |")
    return lines


def anatomy_table(report: dict) -> list[str]:
    """The forward kernel's GEMM loop alone against the whole kernel, per configuration."""
    tokens, hidden, rows = report["shape"]
    lines = [
        f"### Forward kernel anatomy, N = {tokens}, H = {hidden}, V/tp = {rows}, bf16 — {report['card']}",
        "",
        f"cuBLAS, the two logit GEMMs: {report['cublas_2gemm_ms']:.2f} ms.",
        "",
        "| configuration | loop ms | loop / cuBLAS | kernel ms | kernel / loop | tuner's pick |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in report["configs"].items():
        if "error" in result:
            lines.append(f"| {name} | {result['error'][:90]} | | | | |")
        else:
            lines.append(f"| {name} | {result['loop_ms']:.1f} | {result['loop_over_cublas']:.2f} | "
                         f"{result['kernel_ms']:.1f} | {result['kernel_over_loop']:.2f} | "
                         f"{'yes' if result['chosen'] else ''} |")
    return lines


def main() -> None:
    directory = Path(sys.argv[1])
    lines = []
    for path in sorted(directory.glob("fused_tp*.json")):
        lines += fused_table(json.loads(path.read_text())) + [""]
    for step in sorted(directory.glob("train_step*.json")):
        lines += step_table(json.loads(step.read_text())) + [""]
    anatomy = directory / "anatomy.json"
    if anatomy.exists():
        lines += anatomy_table(json.loads(anatomy.read_text()))
    text = "\n".join(lines) + "\n"
    (directory / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
