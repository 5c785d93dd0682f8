#!/usr/bin/env python
"""Write a Megatron-Core checkpoint of this recipe back as a Hugging Face Qwen3 directory.

    python tools/mcore_to_hf.py --mcore-dir ckpt/qwen3-4b-mcore --out Qwen3-4B-sdpg

Reads one parameter at a time from a checkpoint saved at any layout, writes
size-bounded safetensors shards plus config.json (and the tokenizer files the checkpoint
carried), atomically. transformers' `from_pretrained` loads the result.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mcore-dir", required=True, help="Megatron distributed checkpoint directory")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), fp32, bf16 or fp16")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")
    args = parser.parse_args(argv)

    import time

    from sdpg_megatron.model.convert import mcore_to_hf, parse_dtype, peak_rss_bytes

    started = time.perf_counter()
    try:
        out = mcore_to_hf(args.mcore_dir, args.out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite,
                          max_shard_bytes=int(args.max_shard_gib * 2**30))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"mcore_to_hf: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
