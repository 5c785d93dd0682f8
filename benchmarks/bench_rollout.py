"""Rollout fleet: weight-push time against model size, and fleet overhead on throughput.

For each model size (random-weight Qwen3 shapes, tiny up to ~100M parameters, fp32) one
engine is started in a Ray fleet, and in the same run:

- push: the whole model from the trainer's tensors to a committed version, in 64 MiB
  buckets, as a ratio to a plain in-process copy of the same bytes, for both wires: the
  same-node one (`weight_transport=auto` → shm: the buckets are written once into the
  fleet's /dev/shm buffers, the worker reads them in place) and gloo (buckets packed into
  fresh tensors, broadcast over TCP into the worker). Either way the worker validates and
  stages, and commits with the model's in-place `load_weights` plus the CPU repack. Phases
  per push: write (packing the buckets), start, send, commit (of which: the in-place load
  and the CPU repack, timed in the worker); the fastest of 5 pushes;
- throughput: generated tokens/s through `fleet.generate` against one bare `vllm.LLM` with
  the same settings and exactly the fleet's requests (one seeded
  single-sample request per response) in its own process; both stay alive, and after a
  warm-up pair 9 batch pairs run back to back, alternating which side goes first; the
  overhead is 1 − the median of the pairs' ratios. Plus the latency of a 1-token request
  both ways, which isolates the fleet's fixed per-call cost (Ray round trip, result
  conversion).

    .venv/bin/python benchmarks/bench_rollout.py            # 3 sizes, ~10 minutes
    .venv/bin/python benchmarks/bench_rollout.py --quick    # smallest size only (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (hidden, ffn, layers, heads, kv heads, vocab)
    "4M": (128, 384, 4, 4, 2, 4096),
    "25M": (384, 1152, 6, 6, 2, 16384),
    "100M": (768, 2304, 10, 12, 4, 32000),
}
NUM_PROMPTS, N, MAX_TOKENS, PROMPT_LEN = 32, 4, 64, 16
NUM_PAIRS = 9  # timed fleet/bare batch pairs per size, after one untimed warm-up pair each
NUM_PUSHES = 5  # per wire and size; the fastest counts (the first two touch fresh pages)
PHASES = ("write_s", "start_s", "send_s", "commit_s", "commit_load_s", "commit_repack_s")

BARE = r"""
import sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model={model!r}, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes={kv}, max_model_len=512, max_num_seqs=128, seed=0,
              gpu_memory_utilization=0.3, logprobs_mode="processed_logprobs")
    prompts = {prompts!r}
    llm.generate([{{"prompt_token_ids": [0, 1, 2]}}], SamplingParams(max_tokens=2), use_tqdm=False)
    print("READY", flush=True)
    for command in sys.stdin:  # the benchmark alternates: one fleet batch, one bare batch, ...
        if command.strip() == "latency":
            start = time.perf_counter()
            for _ in range(10):
                llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=1), use_tqdm=False)
            print("LATENCY", (time.perf_counter() - start) / 10, flush=True)
        elif command.strip() == "batch":
            # exactly the fleet's requests: sample k of prompt p is its own request seeded
            # 7 * 1_000_003 + p * n + k (one seeded n-sample request would repeat one sample)
            requests, params = [], []
            for p, prompt in enumerate(prompts):
                for k in range({n}):
                    requests.append({{"prompt_token_ids": prompt}})
                    params.append(SamplingParams(n=1, seed=7 * 1_000_003 + p * {n} + k, max_tokens={max_tokens},
                                                 ignore_eos=True, logprobs=0, top_k=-1, detokenize=False))
            start = time.perf_counter()
            out = llm.generate(requests, params, use_tqdm=False)
            tokens = sum(len(s.token_ids) for o in out for s in o.outputs)
            print("RATE", tokens / (time.perf_counter() - start), flush=True)
        else:
            break
"""


class BareEngine:
    """One `vllm.LLM` in its own process, driven line by line so batches can alternate."""

    def __init__(self, script: str):
        self.process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"bare engine exited (code {self.process.wait()}) before printing {prefix}")

    def ask(self, command: str, prefix: str) -> float:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return float(self._expect(prefix).split()[1])

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=120)


def make_model(size: str, path: Path):
    import torch

    from sdpg_megatron.model.hf_io import expected_hf_shapes, write_hf_checkpoint
    from sdpg_megatron.model.qwen3 import Qwen3Arch

    hidden, ffn, layers, heads, groups, vocab = SIZES[size]
    arch = Qwen3Arch(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                     num_query_groups=groups, kv_channels=64, vocab_size=vocab, tied_embeddings=True,
                     max_position_embeddings=2048)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in expected_hf_shapes(arch).items()}
    write_hf_checkpoint(path, arch, iter(tensors.items()), extra_config={"eos_token_id": 2})
    return arch, tensors


def in_process_copy_seconds(tensors: dict) -> float:
    import torch

    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
        best = min(best, time.perf_counter() - start)
    return best


def fastest_push(fleet, tensors: dict) -> dict:
    """The fastest of NUM_PUSHES pushes of `tensors`, timed from packing to commit."""
    from sdpg_megatron.rollout.buckets import pack_buckets

    pushes = []
    for _ in range(NUM_PUSHES):
        start = time.perf_counter()
        buckets = list(pack_buckets(tensors.items(), 64 * 2**20, fleet.bucket_allocator()))
        written = time.perf_counter()
        stats = fleet.push_weights(buckets, version=fleet.version + 1)
        pushes.append(dict(stats, write_s=written - start, wall_s=time.perf_counter() - start))
    return min(pushes, key=lambda p: p["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="only these sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout_cpu.json")
    args = parser.parse_args()

    import ray

    from sdpg_megatron.rollout.engine import EngineSettings, SamplingSettings
    from sdpg_megatron.rollout.fleet import FleetSettings, RolloutFleet, connect_ray

    run_dir = Path(tempfile.mkdtemp(prefix="sdpg-bench-", dir="/tmp"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(run_dir / "vllm-cache"))
    connect_ray(temp_dir=run_dir / "ray", num_cpus=2)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(PROMPT_LEN)] for i in range(NUM_PROMPTS)]
    kv_bytes = 256 * 2**20
    rows = []
    for size in args.sizes or (["4M"] if args.quick else list(SIZES)):
        model_dir = run_dir / f"model-{size}"
        arch, tensors = make_model(size, model_dir)
        num_params = sum(t.numel() for t in tensors.values())
        num_bytes = 4 * num_params
        copy_s = in_process_copy_seconds(tensors)

        engine = EngineSettings(model_dir=str(model_dir), kv_cache_bytes=kv_bytes, max_model_len=512, max_num_seqs=128)
        gloo = RolloutFleet(FleetSettings(name="sdpg-gloo", num_engines=1, cpus_per_engine=1, engine=engine,
                                          weight_transport="gloo"))
        gloo_push = fastest_push(gloo, tensors)
        gloo.shutdown()
        time.sleep(2)
        fleet = RolloutFleet(FleetSettings(num_engines=1, cpus_per_engine=1, engine=engine))
        assert fleet.transports == ["shm"], fleet.transports
        fastest = fastest_push(fleet, tensors)
        push_s = fastest["wall_s"]

        # Both engines stay alive and batches alternate, so drift on the shared cores hits
        # both sides alike; an idle vLLM engine waits without spinning.
        bare = BareEngine(BARE.format(model=str(model_dir), kv=kv_bytes, prompts=prompts, n=N, max_tokens=MAX_TOKENS))
        sampling = SamplingSettings(max_tokens=MAX_TOKENS, ignore_eos=True)
        one_token = SamplingSettings(max_tokens=1)
        fleet.generate([[1, 2, 3]], n=1, sampling=one_token)
        start = time.perf_counter()
        for _ in range(10):
            fleet.generate([[1, 2, 3]], n=1, sampling=one_token)
        fleet_latency = (time.perf_counter() - start) / 10
        bare_latency = bare.ask("latency", "LATENCY")
        def fleet_rate() -> float:
            start = time.perf_counter()
            rollouts = fleet.generate(prompts, n=N, sampling=sampling, seed=7)
            return sum(len(r.token_ids) for g in rollouts for r in g) / (time.perf_counter() - start)

        fleet_rate(), bare.ask("batch", "RATE")  # warm-up, untimed
        fleet_rates, bare_rates = [], []
        for pair in range(3 if args.quick else NUM_PAIRS):  # adjacent pairs, alternating which side goes first
            if pair % 2:
                bare_rates.append(bare.ask("batch", "RATE"))
                fleet_rates.append(fleet_rate())
            else:
                fleet_rates.append(fleet_rate())
                bare_rates.append(bare.ask("batch", "RATE"))
        bare.close()
        fleet.shutdown()
        time.sleep(2)
        row = {
            "size": size, "parameters": num_params, "bytes": num_bytes,
            "push_s": push_s, "copy_s": copy_s, "push_over_copy": push_s / copy_s,
            "push_phases_s": {k: fastest[k] for k in PHASES},
            "gloo_push_s": gloo_push["wall_s"], "gloo_push_over_copy": gloo_push["wall_s"] / copy_s,
            "gloo_push_phases_s": {k: gloo_push[k] for k in PHASES},
            "fleet_tokens_per_s": statistics.median(fleet_rates), "bare_tokens_per_s": statistics.median(bare_rates),
            "fleet_rates": fleet_rates, "bare_rates": bare_rates,
            "fleet_call_latency_s": fleet_latency, "bare_call_latency_s": bare_latency,
        }
        # the median of the paired ratios: each pair ran back to back, so slow drift on the
        # shared cores cancels within a pair
        row["fleet_overhead"] = 1 - statistics.median(f / b for f, b in zip(fleet_rates, bare_rates))
        rows.append(row)
        print(f"{size}: {num_params / 1e6:.1f}M params, shm push {push_s:.3f} s vs copy {copy_s:.4f} s "
              f"({row['push_over_copy']:.1f}x; write/start/send/commit "
              f"{'/'.join(f'{fastest[k]:.3f}' for k in PHASES)} s); gloo push {gloo_push['wall_s']:.3f} s "
              f"({row['gloo_push_over_copy']:.1f}x; {'/'.join(f'{gloo_push[k]:.3f}' for k in PHASES)} s); fleet {row['fleet_tokens_per_s']:.0f} tok/s vs bare "
              f"{row['bare_tokens_per_s']:.0f} tok/s (overhead {100 * row['fleet_overhead']:+.1f}%); 1-token call "
              f"{1000 * fleet_latency:.1f} ms vs {1000 * bare_latency:.1f} ms", flush=True)
    ray.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)

    print(f"\n{'model':>6s} {'params':>8s} {'shm push':>9s} {'gloo push':>10s} {'copy':>9s} {'shm/copy':>9s} "
          f"{'gloo/copy':>10s} {'fleet tok/s':>12s} {'bare tok/s':>11s} {'overhead':>9s} {'call fleet/bare':>16s}")
    for row in rows:
        print(f"{row['size']:>6s} {row['parameters'] / 1e6:7.1f}M {row['push_s']:8.3f}s {row['gloo_push_s']:9.3f}s "
              f"{row['copy_s']:8.4f}s {row['push_over_copy']:8.1f}x {row['gloo_push_over_copy']:9.1f}x "
              f"{row['fleet_tokens_per_s']:12.0f} {row['bare_tokens_per_s']:11.0f} "
              f"{100 * row['fleet_overhead']:+8.1f}% {1000 * row['fleet_call_latency_s']:7.1f}/{1000 * row['bare_call_latency_s']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "num_prompts": NUM_PROMPTS, "n": N, "max_tokens": MAX_TOKENS,
                                    "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
