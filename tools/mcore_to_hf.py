#!/usr/bin/env python
"""Write a Megatron-Core checkpoint of this recipe as a Hugging Face Qwen3 (or Qwen3-MoE) directory.

    python tools/mcore_to_hf.py --mcore-dir runs/sdpg/checkpoints/step_00000040 --out runs/sdpg/hf
    python tools/mcore_to_hf.py --mcore-dir runs/sdpg/checkpoints --out runs/sdpg/hf   # its latest step
    python tools/mcore_to_hf.py --mcore-dir ckpt/qwen3-4b-mcore --out Qwen3-4B-back     # hf_to_mcore.py output

A training checkpoint gives its model's weights (never the optimizer state); the
architecture and tokenizer come from the run's model.hf_dir / model.tokenizer_dir, which
--hf-dir / --tokenizer-dir replace when those paths are not reachable from here. Reads one
parameter at a time from a checkpoint saved at any layout, writes size-bounded safetensors
shards plus config.json and the tokenizer files, atomically. transformers'
`from_pretrained` and vLLM load the result. Qwen3-MoE experts come out as the published
checkpoints' per-expert tensors (model.layers.{i}.mlp.experts.{e}.gate_proj.weight, ...),
whatever expert-parallel layout wrote them.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mcore-dir", required=True,
                        help="a training checkpoint (<out_dir>/checkpoints/step_XXXXXXXX), a checkpoint root "
                             "(<out_dir>/checkpoints: its latest complete step) or tools/hf_to_mcore.py output")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--hf-dir", help="training checkpoints: the Hugging Face directory the run started from "
                                         "(architecture, tokenizer), instead of the run's model.hf_dir")
    parser.add_argument("--tokenizer-dir", help="training checkpoints: instead of the run's model.tokenizer_dir")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), fp32, bf16 or fp16")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")
    args = parser.parse_args(argv)

    import time

    from sdpg_megatron.cli_paths import input_dir, output_dir
    from sdpg_megatron.export import export_to_hf, find_export_source
    from sdpg_megatron.model.convert import parse_dtype, peak_rss_bytes

    started = time.perf_counter()
    try:
        input_dir(args.mcore_dir, "--mcore-dir",
                  what="a training checkpoint, a checkpoint root or tools/hf_to_mcore.py output")
        output_dir(args.out, "--out")
        dtype = parse_dtype(args.dtype)
        source = find_export_source(args.mcore_dir, hf_dir=args.hf_dir, tokenizer_dir=args.tokenizer_dir)
        print(f"reading {source.description}", flush=True)
        for note in source.notes:
            print(f"note: {note}", flush=True)
        out = export_to_hf(source, args.out, dtype=dtype, overwrite=args.overwrite,
                           max_shard_bytes=int(args.max_shard_gib * 2**30))
    except (ValueError, OSError, KeyError) as error:
        print(f"mcore_to_hf: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
