#!/usr/bin/env python
"""Convert a Hugging Face Qwen3 or Qwen3-MoE directory into a Megatron-Core distributed checkpoint.

    python tools/hf_to_mcore.py --hf-dir Qwen3-4B --out ckpt/qwen3-4b-mcore --tp 2 --pp 1
    python tools/hf_to_mcore.py --hf-dir Qwen3-30B-A3B --out ckpt/qwen3-30b-a3b-mcore --tp 2 --ep 4

Streams one tensor at a time (peak memory ≈ the largest tensor), validates names and
shapes against config.json before writing, and writes atomically: on any failure nothing
is left at --out. The checkpoint loads at the given layout and, through
dist_checkpointing, at any layout whose TP size divides its padded vocabulary; a Qwen3-MoE
checkpoint holds every expert under its global index, so --ep / --etp are checked against
num_experts / moe_intermediate_size and recorded, and any EP dividing num_experts loads it.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size the checkpoint is for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size the checkpoint is for")
    parser.add_argument("--ep", type=int, default=1,
                        help="Qwen3-MoE: expert parallel size the checkpoint is for (must divide num_experts)")
    parser.add_argument("--etp", type=int, default=None,
                        help="Qwen3-MoE: expert tensor parallel size (must divide moe_intermediate_size; "
                             "default: --tp at --ep 1, else 1)")
    parser.add_argument("--dtype", default="auto", help="auto (the HF config's), fp32, bf16 or fp16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    args = parser.parse_args(argv)

    from sdpg_megatron.cli_paths import input_dir, output_dir
    from sdpg_megatron.model.convert import hf_to_mcore, parse_dtype

    try:
        input_dir(args.hf_dir, "--hf-dir", what="a Hugging Face Qwen3 directory (config.json + safetensors)")
        output_dir(args.out, "--out")
        stats = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                            dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    except (ValueError, OSError, KeyError) as error:
        print(f"hf_to_mcore: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {stats['tensors']} chunks, {stats['bytes'] / 2**20:.1f} MiB in "
          f"{stats['seconds']:.1f} s, peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
