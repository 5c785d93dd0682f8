"""Naive full-vocabulary references for `vocab_parallel_token_stats`.

These materialise [N, V] logits on one process; they are the oracle in tests (fp64) and
the baseline in benchmarks (fp32). Never use them in training.
"""

from __future__ import annotations

import torch

from sdpg_megatron.parallel.chunks import TokenStats


def naive_token_stats(
    student_hidden: torch.Tensor,
    full_weight: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    matmul_in_input_dtype: bool = False,
) -> TokenStats:
    """Same outputs as `vocab_parallel_token_stats` at TP = 1, computed on full logits.

    Args:
        student_hidden: [N, H]; full_weight: [V_padded, H]; target_ids: [N];
        teacher_hidden: [N, H] or None; mask: [N] or None.
        dtype: compute dtype (fp64 for the test oracle, fp32 for the benchmark baseline).
        matmul_in_input_dtype: form the logits with a GEMM in the inputs' dtype (bf16 on a
            GPU, as a plain PyTorch loss does) and only then cast them to `dtype`.
    """
    vocab_size = full_weight.shape[0] if vocab_size is None else vocab_size
    weight = full_weight[:vocab_size]
    if not matmul_in_input_dtype:
        weight = weight.to(dtype)

    def logits(hidden):
        hidden = hidden if matmul_in_input_dtype else hidden.to(dtype)
        return (hidden @ weight.t()).to(dtype)

    student_logp = torch.log_softmax(logits(student_hidden) / temperature, dim=-1)
    if mask is None:
        mask = torch.ones_like(target_ids, dtype=torch.bool)
    mask = mask.to(torch.bool)
    safe_targets = torch.where(mask, target_ids, torch.zeros_like(target_ids))
    logprobs = student_logp.gather(1, safe_targets[:, None]).squeeze(1)
    student_probs = student_logp.exp()
    entropy = -(student_probs * student_logp).sum(dim=-1)
    reverse_kl = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = logits(teacher_hidden.detach())
            teacher_logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
        reverse_kl = (student_probs * (student_logp - teacher_logp)).sum(dim=-1)
        reverse_kl = torch.where(mask, reverse_kl, torch.zeros_like(reverse_kl))
    zero = torch.zeros_like(logprobs)
    return TokenStats(
        torch.where(mask, logprobs, zero), torch.where(mask, entropy, zero), reverse_kl
    )
