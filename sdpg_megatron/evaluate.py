"""pass@1 mean@k on AIME 2024 / AIME 2025 / AMC 2023 (docs/method.md, "Evaluation").

Per problem: the mean correctness of k samples at the training sampling settings (T = 1,
top_p 1, top_k off); per benchmark: the mean over problems. Problems are read from
DAPO-schema parquet (each eval file repeats a problem 32×: de-duplicated) and re-rendered
in the boxed student template. Used by the trainer every `evaluation.interval` steps (on
the fleet, with the weights just pushed) and standalone on a Hugging Face directory:

    python -m sdpg_megatron.evaluate --hf-dir runs/x/hf --benchmark aime24=data/eval/aime-2024.parquet \\
        --benchmark aime25=data/eval/aime25.parquet --benchmark amc23=data/eval/amc-23.parquet \\
        --k 32 --max-response-tokens 4096 --out runs/x/eval.json

Results: per benchmark pass@1 and per problem (uid, answer, correct count, verifier
statuses); `EvalHistory` keeps "Last" and "Best" per benchmark as in the paper's table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdpg_megatron.data import Problem, encode_problem, load_dapo_parquet
from sdpg_megatron.fsio import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    prompts: list[list[int]]  # student prompt token ids, one per problem


def parse_benchmark_specs(specs: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """"name=path" strings → {name: path}; ValueError naming a malformed or missing one."""
    result = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"benchmark {spec!r}: write it as name=path.parquet, e.g. aime24=aime-2024.parquet")
        if not Path(path).is_file():
            raise ValueError(f"benchmark {name}: {path} does not exist; name a DAPO-schema parquet file "
                             f"(data/eval/ holds AIME 2024, AIME 2025 and AMC 2023)")
        result[name] = Path(path)
    return result


def load_benchmarks(specs: dict[str, Path], tokenizer, *, max_prompt_tokens: int,
                    enable_thinking: bool) -> list[Benchmark]:
    """Problems whose boxed student prompt exceeds `max_prompt_tokens` are dropped with a
    warning (the benchmark's score is then over the remaining problems, and says so).
    `enable_thinking` must match training's (data.enable_thinking): see render_prompt."""
    benchmarks = []
    for name, path in specs.items():
        report = load_dapo_parquet(path)
        problems, prompts = [], []
        for problem in report.problems:
            try:
                prompts.append(encode_problem(tokenizer, problem, max_prompt_tokens=max_prompt_tokens,
                                              enable_thinking=enable_thinking).student_ids)
                problems.append(problem)
            except ValueError as error:
                logger.warning("benchmark %s: skipped %s", name, error)
        if not problems:
            raise ValueError(f"benchmark {name}: no usable problems in {path}")
        benchmarks.append(Benchmark(name, problems, prompts))
    return benchmarks


def evaluate(fleet, tokenizer, verifier, benchmarks: list[Benchmark], *, k: int, sampling, seed: int = 0,
             thinking: bool = False, answer_tail_chars: int | None = 500) -> dict:
    """pass@1 mean@k of each benchmark through the rollout fleet; each response's answer is
    read as in training (after "</think>" in thinking mode, within its last
    answer_tail_chars characters)."""
    results = {}
    for benchmark in benchmarks:
        started = time.perf_counter()
        groups = fleet.generate(benchmark.prompts, n=k, sampling=sampling, seed=seed)
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for group in groups for r in group]
        answers = [p.answer for p in benchmark.problems for _ in range(k)]
        verdicts = verifier.score(texts, answers, thinking=thinking, answer_tail_chars=answer_tail_chars)
        per_problem = []
        for i, problem in enumerate(benchmark.problems):
            mine = verdicts[i * k : (i + 1) * k]
            per_problem.append({
                "uid": problem.uid, "answer": problem.answer, "correct": sum(v.correct for v in mine), "samples": k,
                "mean_correct": sum(v.correct for v in mine) / k,
                "statuses": dict(Counter(v.status for v in mine)),
                "mean_length": sum(len(r.token_ids) for r in groups[i]) / k,
            })
        results[benchmark.name] = {
            "pass@1": sum(p["mean_correct"] for p in per_problem) / len(per_problem),
            "num_problems": len(per_problem), "k": k, "seconds": time.perf_counter() - started,
            "weight_version": groups[0][0].weight_version, "problems": per_problem,
        }
    return results


@dataclass
class EvalHistory:
    """Per benchmark: the score at every evaluated step, the last one and the best one."""

    scores: dict[str, dict[int, float]] = field(default_factory=dict)

    def add(self, step: int, results: dict) -> None:
        for name, result in results.items():
            self.scores.setdefault(name, {})[step] = result["pass@1"]

    def summary(self) -> dict:
        out = {}
        for name, by_step in self.scores.items():
            last_step = max(by_step)
            best_step = max(by_step, key=lambda s: (by_step[s], -s))
            out[name] = {"last": by_step[last_step], "last_step": last_step, "best": by_step[best_step],
                         "best_step": best_step, "history": {str(s): v for s, v in sorted(by_step.items())}}
        return out

    @classmethod
    def load(cls, path: Path, up_to_step: int) -> "EvalHistory":
        """The history saved in `path`, keeping steps ≤ up_to_step (a resumed run)."""
        history = cls()
        if path.is_file():
            for name, entry in json.loads(path.read_text()).items():
                history.scores[name] = {int(s): v for s, v in entry["history"].items() if int(s) <= up_to_step}
        return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdpg_megatron.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (e.g. tools/mcore_to_hf.py output)")
    parser.add_argument("--tokenizer-dir", help="defaults to --hf-dir")
    parser.add_argument("--benchmark", action="append", required=True, metavar="NAME=PARQUET")
    parser.add_argument("--k", type=int, default=32, help="samples per problem (mean@k)")
    parser.add_argument("--max-response-tokens", type=int, default=4096)
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True,
                        help="Qwen3 thinking mode, as in training (the answer is read after </think>)")
    parser.add_argument("--answer-tail-chars", type=int, default=500,
                        help="the answer is the last \\boxed{} within this many final characters")
    parser.add_argument("--num-engines", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20, help="explicit KV cache (CPU); 0: vLLM's sizing")
    parser.add_argument("--gpus-per-engine", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON results file")
    args = parser.parse_args(argv)
    from sdpg_megatron.cli_paths import HF_MODEL_FILES, TOKENIZER_FILES, input_dir, output_file

    try:  # every argument is checked before Ray, the engines and the verifier start
        try:
            specs = parse_benchmark_specs(args.benchmark)
        except ValueError as error:
            raise ValueError(f"--benchmark: {error}") from None
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        input_dir(args.hf_dir, "--hf-dir", holds=HF_MODEL_FILES,
                  what="a Hugging Face model directory (tools/mcore_to_hf.py writes one from a training checkpoint)")
        input_dir(args.tokenizer_dir or args.hf_dir, "--tokenizer-dir" if args.tokenizer_dir else "--hf-dir",
                  holds=TOKENIZER_FILES, what="a directory with the model's tokenizer (--tokenizer-dir)")
        output_file(args.out, "--out")
    except (ValueError, OSError) as error:
        parser.error(str(error))

    from transformers import AutoTokenizer

    from sdpg_megatron.config import RolloutConfig
    from sdpg_megatron.data import template_supports_thinking
    from sdpg_megatron.reward import VerifierPool
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings
    from sdpg_megatron.rollout.launch import running_fleet, sampling_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir or args.hf_dir)
    try:  # the sampling of training (top_p 1, top_k off) at this temperature
        sampling = sampling_settings(RolloutConfig(temperature=args.temperature), tokenizer,
                                     max_tokens=args.max_response_tokens)
    except ValueError as error:
        parser.error(f"--tokenizer-dir {args.tokenizer_dir or args.hf_dir}: {error}")
    thinking = args.enable_thinking and template_supports_thinking(tokenizer)
    benchmarks = load_benchmarks(specs, tokenizer, max_prompt_tokens=args.max_prompt_tokens, enable_thinking=thinking)
    settings = FleetSettings(
        num_engines=args.num_engines, gpus_per_engine=args.gpus_per_engine,
        engine=EngineSettings(model_dir=args.hf_dir, dtype=args.dtype, kv_cache_bytes=args.kv_cache_bytes or None,
                              max_model_len=args.max_prompt_tokens + args.max_response_tokens),
    )
    with running_fleet(settings) as fleet, VerifierPool() as verifier:
        results = evaluate(fleet, tokenizer, verifier, benchmarks, k=args.k, sampling=sampling, seed=args.seed,
                           thinking=thinking, answer_tail_chars=args.answer_tail_chars)
    write_json_atomic(args.out, {"hf_dir": args.hf_dir, "k": args.k, "benchmarks": results})
    for name, result in results.items():
        print(f"{name:<10} pass@1 mean@{args.k} = {result['pass@1']:.4f} over {result['num_problems']} problems")


if __name__ == "__main__":
    main()
