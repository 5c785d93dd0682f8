"""HF → Megatron conversion: the streaming tools against a plain in-memory conversion.

Builds a random-weight Hugging Face checkpoint of a real Qwen3 shape (default Qwen3-1.7B,
bf16), then, each in a fresh process, measures wall time and peak RSS (VmHWM) of:

- `tools/hf_to_mcore.py` (streaming, one tensor at a time);
- plain: build the Megatron model, copy every HF tensor in, `dist_checkpointing.save`;
- `tools/mcore_to_hf.py` (streaming back);
- an import-only process, the baseline every peak is measured above.

    .venv/bin/python benchmarks/bench_conversion.py              # Qwen3-1.7B shape, ~3.4 GB
    .venv/bin/python benchmarks/bench_conversion.py --quick      # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAIN = r"""
import sys, time, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from megatron.core import dist_checkpointing
from sdpg_megatron.model.convert import _megatron_process_group
from sdpg_megatron.model.hf_io import HFCheckpoint
from sdpg_megatron.model.hf_mapping import load_hf_weights
from sdpg_megatron.model.provider import model_provider, transformer_config
from sdpg_megatron.parallel import padded_vocab_size
start = time.perf_counter()
source = HFCheckpoint({hf!r})
arch = source.arch
with _megatron_process_group():
    model = model_provider(arch, transformer_config(arch, params_dtype=torch.bfloat16))
    load_hf_weights(model, arch, source.read, padded_vocab=padded_vocab_size(arch.vocab_size, 1),
                    tp_size=1, tp_rank=0, pp_size=1, pp_rank=0)
    import os; os.makedirs({out!r})
    dist_checkpointing.save(model.sharded_state_dict(), {out!r})
print("seconds", time.perf_counter() - start)
print("peak", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""

BASELINE = r"""
import sys; sys.path.insert(0, {root!r})
import torch, megatron.core, sdpg_megatron.model.convert
print("peak", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def make_hf_checkpoint(arch, path: Path) -> int:
    """Random bf16 weights written shard by shard; returns the number of parameters."""
    import torch

    from sdpg_megatron.model.hf_io import expected_hf_shapes, write_hf_checkpoint

    shapes = expected_hf_shapes(arch)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    write_hf_checkpoint(path, arch, tensors(), max_shard_bytes=2**30, dtype=torch.bfloat16)
    return sum(torch.Size(s).numel() for s in shapes.values())


def run(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conversion_cpu.json")
    args = parser.parse_args()

    from sdpg_megatron.model.qwen3 import qwen3_preset, qwen3_tiny

    arch = qwen3_tiny(vocab_size=4096) if args.quick else qwen3_preset(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="sdpg-bench-", dir=args.workdir))
    try:
        hf_dir, mcore_dir, plain_dir, back_dir = (workdir / n for n in ("hf", "mcore", "plain", "back"))
        started = time.perf_counter()
        num_params = make_hf_checkpoint(arch, hf_dir)
        model_bytes = 2 * num_params
        largest = 2 * max(arch.vocab_size * arch.hidden_size, 2 * arch.ffn_hidden_size * arch.hidden_size)
        print(f"{'quick' if args.quick else args.model}: {num_params / 1e6:.0f}M parameters, "
              f"{model_bytes / 2**30:.2f} GiB bf16 (written in {time.perf_counter() - started:.0f} s)", flush=True)
        python = sys.executable
        _, out = run([python, "-c", BASELINE.format(root=str(ROOT))])
        baseline = int(re.search(r"peak (\d+)", out).group(1)) * 1024
        rows = {}
        seconds, out = run([python, str(ROOT / "tools" / "hf_to_mcore.py"), "--hf-dir", str(hf_dir), "--out", str(mcore_dir)])
        rows["hf_to_mcore (streaming)"] = (seconds, _parse_mib(out) * 2**20)
        seconds, out = run([python, "-c", PLAIN.format(root=str(ROOT), hf=str(hf_dir), out=str(plain_dir))])
        rows["plain (model in memory + save)"] = (seconds, int(re.search(r"peak (\d+)", out).group(1)) * 1024)
        seconds, out = run([python, str(ROOT / "tools" / "mcore_to_hf.py"), "--mcore-dir", str(mcore_dir), "--out", str(back_dir)])
        rows["mcore_to_hf (streaming)"] = (seconds, _parse_mib(out) * 2**20)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nimport-only baseline RSS {baseline / 2**20:.0f} MiB; model {model_bytes / 2**20:.0f} MiB; "
          f"largest tensor {largest / 2**20:.0f} MiB")
    print(f"{'path':34s} {'wall':>8s} {'peak RSS':>10s} {'above base':>11s} {'÷ model':>8s}")
    record = {"model": "quick" if args.quick else args.model, "parameters": num_params, "model_bytes": model_bytes,
              "largest_tensor_bytes": largest, "baseline_rss_bytes": baseline, "rows": {}, "date": time.strftime("%Y-%m-%d")}
    for name, (seconds, peak) in rows.items():
        above = peak - baseline
        print(f"{name:34s} {seconds:7.1f}s {peak / 2**20:8.0f}Mi {above / 2**20:9.0f}Mi {above / model_bytes:8.2f}")
        record["rows"][name] = {"seconds": seconds, "peak_rss_bytes": peak, "above_baseline_bytes": above}
    stream = rows["hf_to_mcore (streaming)"][1] - baseline
    plain = rows["plain (model in memory + save)"][1] - baseline
    print(f"streaming / plain peak above baseline: {stream / plain:.3f}")
    record["streaming_over_plain"] = stream / plain
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def _parse_mib(output: str) -> float:
    return float(re.search(r"peak RSS (\d+) MiB", output).group(1))


if __name__ == "__main__":
    main()
