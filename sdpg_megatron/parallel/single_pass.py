"""The fused loss in one pass: a token-separable loss's gradient taken in the forward.

`vocab_parallel_token_stats` returns per-token statistics whose upstream gradients arrive
later, so its backward forms every logit again: 6 GEMMs of (N, H, V/tp) with a teacher. When
the loss is a sum of per-token terms, each a function of its own token's statistics (SDPG's
is: `algo.token_terms`), the gradient can be taken while a chunk's logits are still there:

    per chunk: cuBLAS fp32 logits of each view → row reductions (the statistics; two
    collectives at TP > 1) → the chunk's loss and its gradient w.r.t. the statistics
    (autograd on [chunk] tensors) → ∂z (row kernel) into a stage buffer;
    per stage of chunks: ∂h = ∂z W / τ and ∂W += ∂zᵀ h / τ (cuBLAS).

4 GEMMs, at the price of holding a chunk's logits. The row reductions run as Triton kernels
on the GPU (`triton_rows.py`) and in torch elsewhere (`_TorchRows`, also their oracle); the
statistics' merge, collectives and ∂z coefficients are `chunks.py`'s, the backend choice
`vocab_parallel.resolve_backend`'s.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from sdpg_megatron.parallel.chunks import (
    TokenStats,
    accumulate_fp32,
    chunk_logits,
    compute_weight,
    finish_stats,
    logit_coefficients,
    owned_target_rows,
    prepare,
    product_fp32,
)
from sdpg_megatron.parallel.vocab_parallel import resolve_backend


# The single pass's chunk on CUDA: a fixed token count, so that its [chunk, V/tp] buffers are
# the same fraction of the naive loss's [N, V/tp] logits at every TP size — 1024 tokens with ∂W
# accumulated in the weight's dtype, 512 with the fp32 accumulator [V/tp, H] (both under 5% of
# naive's memory at N = 16384, H = 2560; benchmarks/gpu/NOTES.md). On CPU: both views' fp32
# logits of a chunk in 32 MiB. ∂z of _STAGE_CHUNKS chunks is staged for each ∂h / ∂W GEMM.
_SINGLE_PASS_CHUNK_TOKENS = {False: 1024, True: 512}  # by fp32_grad_weight
_SINGLE_PASS_CHUNK_BYTES = {"cpu": 32 * 2**20}
_STAGE_CHUNKS = 2


def vocab_parallel_token_loss(
    student_hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    *,
    token_loss: Callable[[TokenStats, slice], torch.Tensor],
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
    fp32_grad_weight: bool = False,
) -> tuple[torch.Tensor, TokenStats]:
    """A token-separable loss of the per-token statistics, with its gradient taken in the
    forward: four GEMMs of (N, H, V/tp) instead of the six of `vocab_parallel_token_stats`
    followed by a loss.

    Each chunk of tokens forms its fp32 logits of both views once (cuBLAS), reduces them to
    the statistics (two collectives per chunk at TP > 1), asks `token_loss` for that
    chunk's loss and takes its gradient with respect to the statistics, and turns it into ∂z
    while the logits are still there. Every two chunks, ∂h = ∂z W / τ and ∂W += ∂zᵀ h / τ
    finish the staged ∂z. Backward only scales the stored gradients. The statistics and ∂z
    are those of `vocab_parallel_token_stats` to rounding; ∂W too with fp32_grad_weight.

    Args:
        token_loss: (stats of a chunk, the chunk's slice of the N tokens) → that chunk's
            scalar loss, differentiable in stats.logprobs, stats.entropy and
            stats.reverse_kl. It must be token-separable — a sum of per-token terms, each a
            function of its own token's statistics (constants such as the normaliser
            fixed) — so that the chunks' gradients are those of the whole loss. Masked
            tokens get statistics 0 and no gradient.
        chunk_size: tokens per chunk (None: on CUDA 1024, or 512 with fp32_grad_weight; on
            CPU both views' fp32 logits of a chunk in ~32 MiB). Peak extra memory: the
            chunk's fp32 logits of each view, the staged ∂z of two chunks in the weight's
            dtype, fp32 ∂h [N, H], and with fp32_grad_weight the fp32 ∂W [V/tp, H]. The
            other arguments are `vocab_parallel_token_stats`'.
        fp32_grad_weight: accumulate ∂W over the token stages in fp32 (one rounding at the
            end, as `vocab_parallel_token_stats`), at 4·V/tp·H bytes; otherwise each
            stage's GEMM accumulates in fp32 and adds into ∂W in the weight's dtype (one
            rounding per stage: N / (2·chunk) of them).
        backend: the per-chunk row reductions: "triton" (row kernels; on CPU only under
            TRITON_INTERPRET=1), "torch", or "auto" as in `vocab_parallel_token_stats`. The
            GEMMs are torch's (cuBLAS) either way.

    Returns:
        (Σ over chunks of token_loss, differentiable w.r.t. student_hidden and
        weight_shard; TokenStats of [N] fp32 tensors, detached).
    """
    if chunk_size is None and student_hidden.device.type == "cuda":
        chunk_size = _SINGLE_PASS_CHUNK_TOKENS[bool(fp32_grad_weight)]
    prepared = prepare(student_hidden, weight_shard, target_ids, teacher_hidden, group=group, vocab_size=vocab_size,
                       temperature=temperature, chunk_size=chunk_size, mask=mask, validate=validate,
                       chunk_bytes=_SINGLE_PASS_CHUNK_BYTES, buffers=1 if teacher_hidden is None else 2)
    backend = resolve_backend(backend, student_hidden)
    loss, logprobs, entropy, reverse_kl = _SinglePassTokenLoss.apply(
        student_hidden, weight_shard, prepared.targets, prepared.mask,
        None if teacher_hidden is None else teacher_hidden.detach(), token_loss,
        group, prepared.vocab_start, prepared.valid_rows, float(temperature), prepared.chunk_size, backend,
        bool(fp32_grad_weight),
    )
    return loss, TokenStats(logprobs, entropy, reverse_kl if teacher_hidden is not None else None)


class _SinglePassTokenLoss(torch.autograd.Function):
    """Loss and gradient in one sweep over token chunks (see `vocab_parallel_token_loss`)."""

    @staticmethod
    def forward(
        ctx, student_hidden, weight_shard, targets, mask, teacher_hidden, token_loss,
        group, vocab_start, valid_rows, temperature, chunk_size, backend, fp32_grad_weight,
    ):
        with_teacher = teacher_hidden is not None
        num_tokens, hidden_size = student_hidden.shape
        device = student_hidden.device
        target_local = targets - vocab_start
        owns_target = (target_local >= 0) & (target_local < valid_rows)
        target_rows = owned_target_rows(target_local, owns_target)
        weight = compute_weight(weight_shard, valid_rows)
        row_ops = _triton_rows() if backend == "triton" else _TorchRows

        grad_hidden = torch.empty(num_tokens, hidden_size, dtype=torch.float32, device=device)
        grad_weight = torch.zeros(weight_shard.shape[0], hidden_size, device=device,
                                  dtype=torch.float32 if fp32_grad_weight else weight.dtype)
        stats = [torch.zeros(num_tokens, dtype=torch.float32, device=device) for _ in range(3)]  # log p, H, KL
        loss = torch.zeros((), dtype=torch.float32, device=device)
        chunk_size = min(chunk_size, max(num_tokens, 1))
        stage_size = min(chunk_size * _STAGE_CHUNKS, max(num_tokens, 1))
        logits = torch.empty(2 if with_teacher else 1, chunk_size, valid_rows, dtype=torch.float32, device=device)
        staged_grads = torch.empty(stage_size, valid_rows, dtype=weight.dtype, device=device)

        def finish_stage(first: int, last: int) -> None:
            """∂h of the staged tokens [first, last), and their share of ∂W."""
            grad_logits = staged_grads[: last - first]
            product_fp32(grad_logits, weight, out=grad_hidden[first:last])
            hidden = student_hidden[first:last].detach().to(weight.dtype)
            if fp32_grad_weight:
                accumulate_fp32(grad_weight[:valid_rows], grad_logits.t(), hidden)
            else:  # fp32 inside the GEMM, one rounding to the weight's dtype per stage
                torch.addmm(grad_weight[:valid_rows], grad_logits.t(), hidden, out=grad_weight[:valid_rows])

        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, num_tokens))
            count = rows.stop - rows.start
            student_logits = chunk_logits(student_hidden[rows], weight, temperature, out=logits[0, :count])
            teacher_logits = None
            if with_teacher:
                teacher_logits = chunk_logits(teacher_hidden[rows], weight, temperature, out=logits[1, :count])
            local_max, partials = row_ops.row_partials(student_logits, teacher_logits, target_rows[rows])
            logprobs, entropy, reverse_kl, student_log_z, teacher_log_z = finish_stats(
                local_max, partials, group, mask[rows], with_teacher)

            # the caller's loss on this chunk, and its gradient w.r.t. the statistics
            leaves = [t.detach().requires_grad_(True) for t in (logprobs, entropy, reverse_kl)]
            with torch.enable_grad():
                chunk_loss = token_loss(TokenStats(leaves[0], leaves[1], leaves[2] if with_teacher else None), rows)
                if not (isinstance(chunk_loss, torch.Tensor) and chunk_loss.dim() == 0):
                    raise ValueError(f"token_loss must return a scalar tensor, got {type(chunk_loss).__name__} "
                                     f"{tuple(getattr(chunk_loss, 'shape', ()))}")
                upstream = torch.autograd.grad(chunk_loss, leaves, allow_unused=True) if chunk_loss.requires_grad \
                    else (None, None, None)
            zero = torch.zeros_like(logprobs)
            g_lp, g_h, g_kl = (zero if g is None else torch.where(mask[rows], g.float(), zero) for g in upstream)
            if not with_teacher:
                g_kl = zero
            coef_logp, constant = logit_coefficients(g_lp, g_h, g_kl, entropy, reverse_kl)
            coefficients = torch.stack([
                student_log_z, zero if teacher_log_z is None else teacher_log_z, coef_logp, g_kl, constant,
                torch.where(owns_target[rows], g_lp, zero),
            ])
            stage_start = start - start % stage_size  # stage_size is a multiple of chunk_size
            row_ops.row_grads(student_logits, teacher_logits, target_rows[rows], coefficients, temperature,
                              out=staged_grads[start - stage_start : rows.stop - stage_start])
            if rows.stop - stage_start == stage_size or rows.stop == num_tokens:
                finish_stage(stage_start, rows.stop)
            loss += chunk_loss.detach().float()
            for out, values in zip(stats, (logprobs, entropy, reverse_kl)):
                out[rows] = values

        if group is not None:  # replicated hidden states: every rank's vocabulary slice adds up
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        # kept on ctx rather than saved: backward scales them in place, once
        ctx.grads = [grad_hidden.to(student_hidden.dtype), grad_weight.to(weight_shard.dtype)]
        ctx.mark_non_differentiable(*stats)
        return loss, *stats

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stats_grads):
        if ctx.grads is None:
            raise RuntimeError("vocab_parallel_token_loss: the loss can be backpropagated once (its gradient "
                               "was computed in the forward and is handed out on the first backward)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss.to(grad_weight.dtype)), \
            *([None] * 11)


class _TorchRows:
    """The single pass's per-chunk row reductions in torch (the CPU path and the oracle of
    the Triton row kernels): same layouts as `triton_rows.row_partials/row_grads`."""

    @staticmethod
    def row_partials(student_logits, teacher_logits, target_rows):
        """Maxima [2 | 1, c] and partials [5 | 3, c] of fp32 logits [c, V/tp] (already / τ)."""
        with_teacher = teacher_logits is not None
        count, cols = student_logits.shape
        device = student_logits.device
        maxima = torch.full((2 if with_teacher else 1, count), float("-inf"), device=device)
        partials = torch.zeros(5 if with_teacher else 3, count, device=device)
        if cols == 0:
            return maxima, partials
        maxima[0] = student_logits.max(dim=1).values
        centred = student_logits - maxima[0, :, None]
        exp = centred.exp()
        partials[0] = exp.sum(dim=1)
        partials[-2] = (exp * centred).sum(dim=1)
        owned = target_rows >= 0
        picked = student_logits.gather(1, target_rows.clamp_min(0).long()[:, None]).squeeze(1)
        partials[-1] = torch.where(owned, picked, 0.0)
        if with_teacher:
            maxima[1] = teacher_logits.max(dim=1).values
            centred_teacher = teacher_logits - maxima[1, :, None]
            partials[1] = centred_teacher.exp().sum(dim=1)
            partials[2] = (exp * (centred - centred_teacher)).sum(dim=1)
        return maxima, partials

    @staticmethod
    def row_grads(student_logits, teacher_logits, target_rows, coefficients, temperature, *, out):
        """out [c, V/tp] ← ∂z from the logits and the coefficient rows (log Z_s, log Z_t,
        g_H − g_KL, g_KL, constant, the owned target's g_lp)."""
        log_z, log_z_teacher, coef_logp, coef_logq, constant, g_target = coefficients[:, :, None]
        log_p = student_logits - log_z
        bracket = coef_logp * log_p + constant
        if teacher_logits is not None:
            bracket = bracket + coef_logq * (teacher_logits - log_z_teacher)
        grad = -log_p.exp() * bracket
        if grad.shape[1] > 0:
            owned = target_rows >= 0
            grad.scatter_add_(1, target_rows.clamp_min(0).long()[:, None], torch.where(owned, g_target[:, 0], 0.0)[:, None])
        return out.copy_(grad / temperature)


def _triton_rows():
    from sdpg_megatron.parallel import triton_rows

    return triton_rows
