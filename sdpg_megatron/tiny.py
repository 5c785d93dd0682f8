"""The embedded default's model: a tiny Qwen3 warm-started on the synthetic arithmetic task.

`make_tiny_policy` builds a character-level tokenizer with Qwen3's chat tokens, a random
Qwen3-architecture model (head_dim 64) over it, and fine-tunes it briefly (plain PyTorch,
one process) on worked solutions — for both prompt views, so the model has learnt to read
the privileged answer — until its greedy accuracy on (a slice of) the training problems
reaches a target. The RL run then starts from a policy that is neither always wrong nor always right.
The result is an ordinary Hugging Face directory (config, safetensors, tokenizer,
generation config), exactly what a user would convert or train from.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sdpg_megatron.data import (
    TEMPLATE_PHRASES, Problem, arithmetic_problems, build_char_tokenizer, column_addition_problems, render_prompt,
    sft_examples, student_content, write_dapo_parquet,
)
from sdpg_megatron.model.qwen3 import qwen3_moe_tiny, qwen3_tiny, to_hf_config
from sdpg_megatron.reward import extract_boxed

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TinySettings:
    seed: int = 0
    num_layers: int = 2
    max_operand: int = 99
    ops: str = "+"
    train_problems: int = 3000
    eval_problems: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    max_sft_steps: int = 1500
    eval_every: int = 100
    target_accuracy: float = 0.35  # stop once greedy accuracy on training problems reaches it
    # Qwen3's thinking layout: the tokenizer's template gets the enable_thinking switch and
    # the warm start answers "<think>\n{worked solution}\n</think>\n\n\boxed{answer}".
    thinking: bool = False
    # "sum": "a + b" with operands ≤ max_operand and ops (the answer in one line); "columns":
    # `digits`-digit additions worked column by column with carries (`column_addition_problems`)
    task: str = "sum"
    digits: int = 4
    # the teacher view of the warm start and of greedy_accuracy(teacher=True): "answer", or
    # "answer+solution" (the worked solution too), as data.privileged during RL
    privileged: str = "answer"
    # the tokenizer holds the prompt templates' fixed text as single tokens (data.TEMPLATE_PHRASES)
    phrase_tokens: bool = False
    # > 0: a Qwen3-MoE with this many experts (qwen3_moe_tiny: top-2, expert FFN 64) instead of dense
    experts: int = 0


def demo_settings(max_sft_steps: int = 1500) -> TinySettings:
    """The embedded demo's task (examples/tiny_cpu_demo.py): 3-digit additions worked column by
    column, 4000 training problems (RL draws fresh ones each step), the teacher view shows
    the worked solution, the prompt templates' fixed text is one token per phrase; warm-
    started to greedy accuracy 0.25."""
    return TinySettings(task="columns", digits=3, privileged="answer+solution", phrase_tokens=True,
                        train_problems=4000, eval_problems=200, batch_size=16, lr=2e-3,
                        max_sft_steps=max_sft_steps, eval_every=50, target_accuracy=0.25)


def sum_settings(max_sft_steps: int = 400) -> TinySettings:
    """The first demo's task, kept for the Slurm example, the tests and bench_overlap: 64
    "a + b" problems with a, b ≤ 20, warm-started to greedy accuracy 0.35."""
    return TinySettings(max_operand=20, train_problems=64, eval_problems=100, batch_size=16, lr=2e-3,
                        max_sft_steps=max_sft_steps, eval_every=50, target_accuracy=0.35)


@dataclass
class TinyResult:
    model_dir: str
    train_data: str
    eval_data: str
    sft_steps: int
    student_accuracy: float  # greedy, training problems (what the RL run samples from)
    heldout_accuracy: float  # greedy, problems never trained on
    teacher_accuracy: float  # greedy, training problems with the answer in the prompt
    seconds: float


def make_tiny_policy(out_dir: str | Path, settings: TinySettings | None = None) -> TinyResult:
    """Write tokenizer, data and warm-started model under `out_dir` (reused when present)."""
    settings = settings or TinySettings()
    out_dir = Path(out_dir)
    summary_path = out_dir / "tiny_policy.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("settings") == asdict(settings):
        cached = json.loads(summary_path.read_text())["result"]  # paths from out_dir: the directory may have moved
        return TinyResult(**{**cached, "model_dir": str(out_dir / "model"),
                             "train_data": str(out_dir / "train.parquet"), "eval_data": str(out_dir / "eval.parquet")})
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model_dir = out_dir / "model"
    tokenizer = build_char_tokenizer(model_dir, thinking=settings.thinking,
                                     phrases=TEMPLATE_PHRASES if settings.phrase_tokens else ())
    if settings.task not in ("sum", "columns") or settings.privileged not in ("answer", "answer+solution"):
        raise ValueError(f"TinySettings: task {settings.task!r} must be 'sum' or 'columns', privileged "
                         f"{settings.privileged!r} 'answer' or 'answer+solution'")
    count = settings.train_problems + settings.eval_problems
    problems = (arithmetic_problems(count, settings.seed, max_operand=settings.max_operand, ops=settings.ops)
                if settings.task == "sum" else column_addition_problems(count, settings.seed, digits=settings.digits))
    with_solution = settings.privileged == "answer+solution"
    train, held_out = problems[: settings.train_problems], problems[settings.train_problems :]
    train_data, eval_data = out_dir / "train.parquet", out_dir / "eval.parquet"
    write_dapo_parquet(train, train_data)
    write_dapo_parquet(held_out, eval_data)

    import transformers
    from transformers import GenerationConfig

    if settings.experts:
        arch = qwen3_moe_tiny(vocab_size=len(tokenizer), num_layers=settings.num_layers, num_experts=settings.experts)
        config_class, model_class = transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    else:
        arch = qwen3_tiny(vocab_size=len(tokenizer), tied_embeddings=True, num_layers=settings.num_layers)
        config_class, model_class = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    hf_config = config_class(**to_hf_config(arch), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = model_class(hf_config).float()
    examples = [_encode(tokenizer, prompt, _thinking_target(target, answer) if settings.thinking else target)
                for (prompt, target), answer in zip(sft_examples(train, with_solution=with_solution),
                                                    (p.answer for p in train for _ in range(2)))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    rng = random.Random(settings.seed)
    step = 0
    eval_slice = train[:100]
    while step < settings.max_sft_steps:
        model.train()
        batch = rng.sample(examples, settings.batch_size)
        loss = _sft_loss(model, batch, tokenizer.pad_token_id)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:  # short linear warm-up, then cosine to 10 %
            progress = step / settings.max_sft_steps
            group["lr"] = settings.lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * progress))
        optimizer.step()
        step += 1
        if step % settings.eval_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, eval_slice, teacher=False)
            logger.info("warm start step %d: loss %.3f, greedy accuracy %.2f", step, loss.item(), accuracy)
            if accuracy >= settings.target_accuracy:
                break
    student_acc = greedy_accuracy(model, tokenizer, eval_slice, teacher=False)
    heldout_acc = greedy_accuracy(model, tokenizer, held_out, teacher=False)
    teacher_acc = greedy_accuracy(model, tokenizer, eval_slice, teacher=True, with_solution=with_solution)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(model_dir, safe_serialization=True)
    result = TinyResult(str(model_dir), str(train_data), str(eval_data), step, student_acc, heldout_acc, teacher_acc,
                        time.perf_counter() - started)
    summary_path.write_text(json.dumps({"settings": asdict(settings), "result": asdict(result)}, indent=2) + "\n")
    return result


def _thinking_target(solution: str, answer: str) -> str:
    return f"<think>\n{solution}\n</think>\n\n\\boxed{{{answer}}}"


def _encode(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    prompt_ids = render_prompt(tokenizer, prompt, enable_thinking=True)  # the thinking template's own default
    target_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, len(prompt_ids)


def _sft_loss(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Token-mean NLL of the targets (prompt positions are not trained)."""
    length = max(len(ids) for ids, _ in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        tokens[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return model(input_ids=tokens, labels=labels).loss


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[Problem], *, teacher: bool, with_solution: bool = False,
                    max_new_tokens: int = 72) -> float:
    """Exact-match accuracy of greedy answers (the boxed integer); `teacher`: in the teacher
    view (the answer, and with `with_solution` the worked solution, in the prompt)."""
    from sdpg_megatron.data import teacher_content

    def content(problem: Problem) -> str:
        if not teacher:
            return student_content(problem.question)
        return teacher_content(problem.question, problem.answer, problem.solution if with_solution else None)

    model.eval()
    correct = 0
    for start in range(0, len(problems), 50):
        chunk = problems[start : start + 50]
        prompts = [render_prompt(tokenizer, content(p), enable_thinking=True) for p in chunk]
        width = max(map(len, prompts))  # left-pad for generation
        tokens = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=tokens, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for problem, row in zip(chunk, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct += extract_boxed(text.rpartition("</think>")[2]) == problem.answer
    return correct / max(1, len(problems))


def main(argv: list[str] | None = None) -> None:
    """`python -m sdpg_megatron.tiny --out DIR`: the demo's warm-started tiny model and data."""
    import argparse

    parser = argparse.ArgumentParser(prog="sdpg_megatron.tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory for model/, train.parquet, eval.parquet (reused)")
    parser.add_argument("--sft-steps", type=int, help="upper bound on warm-start steps (default 400 / 1500)")
    parser.add_argument("--thinking", action="store_true",
                        help="Qwen3's thinking layout: <think>worked solution</think> then the boxed answer")
    parser.add_argument("--task", choices=("sum", "columns"), default="sum",
                        help="sum: 'a + b' with a, b <= 20 (64 problems; the Slurm example's); columns: the "
                             "demo's, 3-digit additions worked column by column, the teacher shown the solution")
    parser.add_argument("--digits", type=int, help="operand digits of --task columns (default 3)")
    parser.add_argument("--train-problems", type=int, help="training problems (default 64 / 4000)")
    parser.add_argument("--layers", type=int, help="transformer layers (default 2)")
    parser.add_argument("--target-accuracy", type=float, help="stop the warm start at this greedy accuracy")
    parser.add_argument("--privileged", choices=("answer", "answer+solution"),
                        help="the teacher view the warm start also trains on (data.privileged of the RL run; "
                             "default answer / answer+solution)")
    parser.add_argument("--phrase-tokens", action=argparse.BooleanOptionalAction,
                        help="one token per fixed phrase of the prompt templates (default off / on)")
    args = parser.parse_args(argv)
    from sdpg_megatron.cli_paths import output_dir

    try:
        output_dir(args.out, "--out")
    except OSError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    settings = replace(sum_settings() if args.task == "sum" else demo_settings(), thinking=args.thinking)
    flags = {"max_sft_steps": args.sft_steps, "train_problems": args.train_problems, "num_layers": args.layers,
             "target_accuracy": args.target_accuracy, "digits": args.digits, "privileged": args.privileged,
             "phrase_tokens": args.phrase_tokens}
    for field_name, value in flags.items():
        if value is not None:
            settings = replace(settings, **{field_name: value})
    tiny = make_tiny_policy(args.out, settings)
    print(f"{tiny.model_dir}: {tiny.sft_steps} warm-start steps, greedy accuracy {tiny.student_accuracy:.2f} "
          f"(held-out {tiny.heldout_accuracy:.2f}, teacher view {tiny.teacher_accuracy:.2f}), {tiny.seconds:.0f} s")


if __name__ == "__main__":
    main()
