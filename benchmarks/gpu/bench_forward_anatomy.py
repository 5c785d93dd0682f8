"""Where the forward kernel's time goes: its GEMM loop alone against the whole kernel.

Three timings on the same inputs (N tokens, H, V/tp rows, bf16), one GPU:
- cuBLAS: the two logit GEMMs (student, teacher) of shape (N, H, V/tp);
- loop: the forward kernel's own tiling, program order and two `tl.dot`s per weight tile,
  with the softmax statistics replaced by one row sum (so the dots stay live);
- kernel: `triton_token_stats.local_partials`, the real forward.
loop / cuBLAS is what Triton's GEMM loop costs; kernel / loop is the epilogue's share.

    python benchmarks/gpu/bench_forward_anatomy.py --out anatomy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdpg_megatron.parallel import triton_token_stats as tts  # noqa: E402
from sdpg_megatron.parallel.triton_token_stats import _grouped_program, _logit_tiles  # noqa: E402


@triton.jit
def _loop_only_kernel(
    hs, ht, w, out_ptr, num_tokens, hidden_size, valid_rows, cols_per_split, num_splits,
    stride_h, stride_w,
    TMA: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, split = _grouped_program(tl.cdiv(num_tokens, BLOCK_M), num_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_tokens
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, valid_rows)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in tl.range(col_begin, col_end, BLOCK_N, flatten=FLATTEN):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc_s, acc_t = _logit_tiles(hs, ht, w, pid_m * BLOCK_M, n0, offs_m, offs_n, mask_m, offs_n < col_end,
                                    hidden_size, stride_h, stride_w, True, False, TMA, BLOCK_M, BLOCK_N, BLOCK_K)
        total += tl.sum(acc_s + acc_t, axis=1)
    tl.store(out_ptr + split * num_tokens + offs_m, total, mask=mask_m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--rows", type=int, default=151936)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    n, h, v = args.tokens, args.hidden, args.rows
    hs = torch.randn(n, h, device="cuda").bfloat16()
    ht = (hs.float() + 0.3 * torch.randn(n, h, device="cuda")).bfloat16()
    w = (2 * torch.randn(v, h, device="cuda") / h**0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", dtype=torch.int32)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")  # noqa: E731

    logits = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    cublas = bench(lambda: (torch.mm(hs, w.t(), out=logits), torch.mm(ht, w.t(), out=logits)))
    del logits
    torch.cuda.empty_cache()
    report = {"card": torch.cuda.get_device_name(), "shape": [n, h, v], "cublas_2gemm_ms": cublas,
              "configs": {}}
    tts.local_partials(hs, ht, w, targets, v, 1.0)  # tunes and picks the kernel's configuration
    chosen = next(iter(tts._chosen.values()))
    contenders = [c for c in tts.GPU_CONFIGS + tts.EXPERIMENTAL_CONFIGS if (c.block_m, c.block_n) == (128, 128)]
    for cfg in contenders:
        splits, cols = tts._vocab_splits(n, v, cfg, hs.device)
        out = torch.empty(splits, n, device="cuda")
        grid = (triton.cdiv(n, cfg.block_m) * splits,)

        def loop(cfg=cfg, splits=splits, cols=cols, out=out, grid=grid):
            _loop_only_kernel[grid](*tts._operands(cfg, hs, ht, w), out, n, h, v, cols, splits, hs.stride(0),
                                    w.stride(0), FLATTEN=cfg.flatten, **cfg.launch_options())

        try:
            loop_ms = bench(loop)
            kernel_ms = bench(lambda cfg=cfg: tts.local_partials(hs, ht, w, targets, v, 1.0, config=cfg))
        except Exception as error:  # a tile shape that does not compile here
            report["configs"][str(cfg)] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        report["configs"][str(cfg)] = {"loop_ms": loop_ms, "kernel_ms": kernel_ms,
                                       "loop_over_cublas": loop_ms / cublas, "kernel_over_loop": kernel_ms / loop_ms,
                                       "chosen": cfg == chosen}
        print(cfg, report["configs"][str(cfg)], flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"cuBLAS 2 GEMMs: {cublas:.2f} ms", flush=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
