"""Fused, vocab-parallel, chunked per-token statistics: log-prob, entropy, exact reverse KL.

The output-layer weight W is sharded over the tensor-parallel group by vocabulary rows
(Megatron's column-parallel output layer: rank r holds rows [r·V/tp, (r+1)·V/tp) of the
padded vocabulary). For N tokens with student hidden states h_s and (detached) teacher
hidden states h_t, this computes, without ever holding [N, V/tp] logits:

    log p(y_n)                      p = softmax(h_s Wᵀ / τ) over the true vocabulary
    H(p_n)    = −Σ_a p log p
    KL(p_n ‖ SG q_n) = Σ_a p (log p − log q),   q = softmax(h_t Wᵀ / τ), fully detached

Forward, per chunk of tokens, each rank computes its logit slice once for each view and
keeps five numbers per token, centred on its *local* maxima m (so no cancellation between
large logits): S = Σ e^{z−m}, Sₜ, A = Σ e^{zₛ−mₛ}((zₛ−mₛ) − (zₜ−mₜ)), B = Σ e^{zₛ−mₛ}(zₛ−mₛ)
and the raw target logit. After the last chunk, exactly two collectives finish the job: a
MAX over the [2N] local maxima, then — after rescaling each rank's partials to the global
maxima — a SUM over [5N]. Backward recomputes each chunk's logits and produces

    ∂/∂zₐ = g_lp (1[a=y] − pₐ) − g_H pₐ (log pₐ + H) + g_KL pₐ (log pₐ − log qₐ − KL)

then ∂h = ∂z W / τ (all-reduced over the group, as Megatron's column-parallel output
layer does for its replicated input) and ∂W = ∂zᵀ h / τ for this rank's shard only. The
teacher receives no gradient at all, not even through the shared W.

Peak extra memory is O(chunk × V/tp); saved state is O(N) besides the inputs.

Two implementations of the per-rank chunk body share everything else (`chunks.py`: input
checks, merge, collectives, ∂z coefficients; the autograd below): this torch loop — the
CPU path and the oracle — and the Triton kernels in `triton_token_stats.py`, chosen for
bf16/fp16 on a GPU (`backend="auto"`, the trainer's `model.loss_backend`). If Triton does
not import there, "auto" says so once and runs the torch loop; "triton" refuses.

`single_pass.vocab_parallel_token_loss` is the other way to use these statistics: for a
token-separable loss it takes the gradient in the forward, while each chunk's logits are
held (4 GEMMs instead of 6; the trainer's GPU default, `model.loss_mode`).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

from sdpg_megatron.parallel.chunks import (
    NUM_STATS_STUDENT_ONLY,
    NUM_STATS_WITH_TEACHER,
    TokenStats,
    chunk_logits,
    compute_weight,
    finish_stats,
    logit_coefficients,
    merge_splits,
    owned_target_rows,
    prepare,
)

logger = logging.getLogger(__name__)

CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}  # one [chunk, V/tp] fp32 buffer
BACKENDS = ("auto", "torch", "triton")


def vocab_parallel_token_stats(
    student_hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> TokenStats:
    """Per-token log-prob, entropy and exact full-vocabulary reverse KL.

    Args:
        student_hidden: [N, H] final hidden states of the student view (replicated over
            the TP group), differentiable.
        weight_shard: [V/tp, H] this rank's rows of the output weight, differentiable.
        target_ids: [N] global vocabulary ids of the sampled tokens.
        teacher_hidden: [N, H] teacher hidden states at the same response positions, or
            None for log-prob and entropy only. Always treated as detached.
        group: the tensor-parallel process group; None means TP = 1 (no collectives).
        vocab_size: the true vocabulary size; padded rows at or beyond it get no
            probability mass. Defaults to the padded size V/tp · tp.
        temperature: τ, the logits are divided by it (sampling temperature).
        chunk_size: tokens per chunk; peak extra memory is three [chunk_size, V/tp] fp32
            buffers. None picks it so one buffer is ~16 MiB on CPU, ~512 MiB on CUDA.
        mask: [N] bool/0-1, False slots return 0 and receive no gradient (their target
            ids are ignored).
        validate: check target ids against the vocabulary (one host sync).
        backend: "torch" (the chunked loop below), "triton" (the GPU kernels; on CPU only
            under TRITON_INTERPRET=1), or "auto": Triton for bf16/fp16 CUDA tensors, torch
            otherwise (see `resolve_backend`).

    Returns:
        TokenStats of [N] fp32 tensors; each is differentiable w.r.t. student_hidden and
        weight_shard.
    """
    prepared = prepare(student_hidden, weight_shard, target_ids, teacher_hidden, group=group, vocab_size=vocab_size,
                       temperature=temperature, chunk_size=chunk_size, mask=mask, validate=validate,
                       chunk_bytes=CHUNK_BYTES, buffers=1)
    backend = resolve_backend(backend, student_hidden)
    logprobs, entropy, reverse_kl = _VocabParallelTokenStats.apply(
        student_hidden, weight_shard, prepared.targets, prepared.mask,
        None if teacher_hidden is None else teacher_hidden.detach(),
        group, prepared.vocab_start, prepared.valid_rows, float(temperature), prepared.chunk_size, backend,
    )
    return TokenStats(logprobs, entropy, reverse_kl if teacher_hidden is not None else None)


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """"torch" or "triton" for these inputs; `backend` is the caller's choice (the trainer's
    `model.loss_backend`).

    "auto" picks the Triton kernels for bf16/fp16 CUDA tensors and the torch loop otherwise
    (fp32 and CPU inputs by design). If the kernels do not import on a GPU, "auto" logs that
    once, with the reason and the fix, and runs the torch loop (~6× slower there);
    "triton" raises ValueError instead."""
    if backend not in BACKENDS:
        raise ValueError(f"backend (model.loss_backend) must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if hidden.device.type != "cuda" or hidden.dtype not in (torch.bfloat16, torch.float16):
            return "torch"
        kernels, failure = _import_triton_kernels()
        if kernels is None:
            _warn_once(
                f"model.loss_backend=auto: the fused loss's Triton kernels do not import on this GPU ({failure}), "
                "so the loss runs its chunked torch loop, about 6x slower. Fix: install the GPU stack's triton "
                "(requirements/gpu.txt, the version this torch declares); or set model.loss_backend=torch to "
                "choose the torch loop, or model.loss_backend=triton to refuse to run without the kernels."
            )
            return "torch"
        return "triton"
    kernels, failure = _import_triton_kernels()
    if kernels is None:
        raise ValueError(
            f"backend='triton' (model.loss_backend=triton) needs the fused loss's Triton kernels, which do not "
            f"import ({failure}); install the GPU stack's triton (requirements/gpu.txt) or set "
            "model.loss_backend=torch"
        )
    if not kernels.available(hidden):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got "
            f"{hidden.device.type}; use backend='torch' (model.loss_backend=torch)"
        )
    return "triton"


def _import_triton_kernels():
    """(the `triton_token_stats` module, None), or (None, why it does not import)."""
    try:
        from sdpg_megatron.parallel import triton_token_stats
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return triton_token_stats, None


def _triton_kernels():
    """The Triton kernels, once `resolve_backend` has chosen them."""
    from sdpg_megatron.parallel import triton_token_stats

    return triton_token_stats


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def split_vocab_shard(full_weight: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rows [r·V/tp, (r+1)·V/tp) of a padded [V, H] output weight, as Megatron shards it."""
    if full_weight.dim() != 2:
        raise ValueError(f"full_weight must be [V, H], got shape {tuple(full_weight.shape)}")
    if tp_size < 1 or full_weight.shape[0] % tp_size != 0:
        raise ValueError(
            f"vocabulary of {full_weight.shape[0]} rows is not divisible by tp_size={tp_size}; "
            "pad it with padded_vocab_size() first"
        )
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, {tp_size})")
    rows = full_weight.shape[0] // tp_size
    return full_weight[tp_rank * rows : (tp_rank + 1) * rows]


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Megatron's padding: the smallest multiple of `multiple · tp_size` ≥ vocab_size."""
    if vocab_size < 1 or tp_size < 1 or multiple < 1:
        raise ValueError(
            f"vocab_size, tp_size and multiple must be >= 1, got {vocab_size}, {tp_size}, {multiple}"
        )
    step = multiple * tp_size
    return -(-vocab_size // step) * step


# --------------------------------------------------------------------------- autograd


class _VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student_hidden, weight_shard, targets, mask, teacher_hidden,
        group, vocab_start, valid_rows, temperature, chunk_size, backend,
    ):
        with_teacher = teacher_hidden is not None
        target_local = targets - vocab_start
        owns_target = (target_local >= 0) & (target_local < valid_rows)
        if backend == "triton":  # the kernels take the shard in the hidden states' dtype
            split_max, split_partials = _triton_kernels().local_partials(
                student_hidden, teacher_hidden, weight_shard.detach()[:valid_rows],
                owned_target_rows(target_local, owns_target), valid_rows, temperature,
            )
            local_max, partials = merge_splits(split_max, split_partials, with_teacher)
        else:
            local_max, partials = _torch_local_partials(
                student_hidden, teacher_hidden, compute_weight(weight_shard, valid_rows), target_local,
                owns_target, valid_rows, temperature, chunk_size,
            )

        logprobs, entropy, reverse_kl, student_log_z, teacher_log_z = finish_stats(
            local_max, partials, group, mask, with_teacher)

        ctx.save_for_backward(
            student_hidden, weight_shard, teacher_hidden if with_teacher else None,
            targets, mask, student_log_z, teacher_log_z, entropy, reverse_kl,
        )
        ctx.group = group
        ctx.vocab_start = vocab_start
        ctx.valid_rows = valid_rows
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.backend = backend
        if not with_teacher:
            ctx.mark_non_differentiable(reverse_kl)
        return logprobs, entropy, reverse_kl

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_reverse_kl):
        (
            student_hidden, weight_shard, teacher_hidden, targets, mask,
            student_log_z, teacher_log_z, entropy, reverse_kl,
        ) = ctx.saved_tensors
        valid_rows, temperature = ctx.valid_rows, ctx.temperature
        num_tokens = student_hidden.shape[0]
        with_teacher = teacher_hidden is not None
        zero = torch.zeros(num_tokens, device=student_hidden.device)

        def upstream(grad):
            return zero if grad is None else torch.where(mask, grad.float(), zero)

        g_lp, g_h = upstream(grad_logprobs), upstream(grad_entropy)
        g_kl = upstream(grad_reverse_kl) if with_teacher else zero
        coef_logp, constant = logit_coefficients(g_lp, g_h, g_kl, entropy, reverse_kl)
        target_local = targets - ctx.vocab_start
        owns_target = (target_local >= 0) & (target_local < valid_rows)

        if ctx.backend == "triton":
            coefficients = torch.stack([
                student_log_z, zero if teacher_log_z is None else teacher_log_z,
                coef_logp, g_kl, constant, torch.where(owns_target, g_lp, zero),
            ])
            grad_hidden, grad_weight = _triton_kernels().grads(
                student_hidden, teacher_hidden, weight_shard.detach()[:valid_rows], owned_target_rows(target_local, owns_target),
                coefficients, valid_rows, temperature, shard_rows=weight_shard.shape[0],
            )
        else:
            grad_hidden, grad_weight = _torch_local_grads(
                student_hidden, teacher_hidden, compute_weight(weight_shard, valid_rows), weight_shard.shape[0], target_local, owns_target,
                student_log_z, teacher_log_z, coef_logp, g_kl, constant, g_lp,
                valid_rows, temperature, ctx.chunk_size,
            )

        # The hidden states are replicated over the group: their gradient is the sum of
        # every rank's vocabulary slice (Megatron's copy-to-TP-region backward).
        if ctx.group is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        grad_hidden = grad_hidden.to(student_hidden.dtype)
        grad_weight = grad_weight.to(weight_shard.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- torch chunk body


def _torch_local_partials(
    student_hidden, teacher_hidden, weight, target_local, owns_target, valid_rows, temperature, chunk_size,
):
    """This rank's maxima [2 | 1, N] and partials [5 | 3, N], one [chunk, V/tp] slice at a time."""
    num_tokens = student_hidden.shape[0]
    with_teacher = teacher_hidden is not None
    device = student_hidden.device
    local_max = torch.empty(2 if with_teacher else 1, num_tokens, device=device)
    num_stats = NUM_STATS_WITH_TEACHER if with_teacher else NUM_STATS_STUDENT_ONLY
    partials = torch.zeros(num_stats, num_tokens, device=device)
    target_local = target_local.clamp(0, max(valid_rows - 1, 0))
    # Three [chunk, V/tp] fp32 buffers, allocated once: the whole extra footprint.
    workspace = _Workspace(min(chunk_size, num_tokens), weight.shape[0], device)
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        student_logits, exp, teacher_logits = workspace.views(rows.stop - rows.start)
        if with_teacher:  # teacher first, so its e^{zₜ−mₜ} can live in `exp` briefly
            chunk_logits(teacher_hidden[rows], weight, temperature, out=teacher_logits)
            local_max[1, rows] = _centre_in_place(teacher_logits)
            partials[1, rows] = torch.exp(teacher_logits, out=exp).sum(dim=1)
        chunk_logits(student_hidden[rows], weight, temperature, out=student_logits)
        local_max[0, rows] = student_max = _centre_in_place(student_logits)
        if valid_rows > 0:
            picked = student_logits.gather(1, target_local[rows, None]).squeeze(1)
            partials[-1, rows] = torch.where(owns_target[rows], picked + student_max, 0.0)
        partials[0, rows] = torch.exp(student_logits, out=exp).sum(dim=1)
        if with_teacher:
            # A = Σ e^{zₛ−mₛ}·((zₛ−mₛ) − (zₜ−mₜ)), computed in the teacher buffer.
            difference = teacher_logits.neg_().add_(student_logits)
            partials[2, rows] = difference.mul_(exp).sum(dim=1)
        # B = Σ e^{zₛ−mₛ}·(zₛ−mₛ), computed in the student buffer (last use).
        partials[-2, rows] = student_logits.mul_(exp).sum(dim=1)
    return local_max, partials


def _torch_local_grads(
    student_hidden, teacher_hidden, weight, shard_rows, target_local, owns_target,
    student_log_z, teacher_log_z, coef_logp, g_kl, constant, g_lp, valid_rows, temperature, chunk_size,
):
    """(∂h [N, H] fp32, ∂W [shard_rows, H] fp32) for this rank's shard, chunk by chunk."""
    num_tokens, device = student_hidden.shape[0], student_hidden.device
    with_teacher = teacher_hidden is not None
    weight_fp32 = weight.float()  # ∂h accumulates in fp32 (a no-op for fp32 weights)
    grad_hidden = torch.zeros(student_hidden.shape, dtype=torch.float32, device=device)
    grad_weight = torch.zeros(shard_rows, student_hidden.shape[1], dtype=torch.float32, device=device)
    if valid_rows == 0:
        return grad_hidden, grad_weight
    target_local = target_local.clamp(0, valid_rows - 1)
    coef_logp, coef_logq, constant = coef_logp[:, None], g_kl[:, None], constant[:, None]
    workspace = _Workspace(min(chunk_size, num_tokens), weight.shape[0], device)
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        logp, probs, bracket = workspace.views(rows.stop - rows.start)
        hidden = student_hidden[rows]
        chunk_logits(hidden, weight, temperature, out=logp).sub_(student_log_z[rows, None])
        torch.exp(logp, out=probs)
        if with_teacher:
            chunk_logits(teacher_hidden[rows], weight, temperature, out=bracket)
            bracket.sub_(teacher_log_z[rows, None]).mul_(coef_logq[rows])
            bracket.addcmul_(logp, coef_logp[rows])
        else:
            torch.mul(logp, coef_logp[rows], out=bracket)
        grad_logits = bracket.add_(constant[rows]).mul_(probs).neg_()
        owner_grad = torch.where(owns_target[rows], g_lp[rows], 0.0)
        grad_logits.scatter_add_(1, target_local[rows, None], owner_grad[:, None])
        grad_logits.div_(temperature)
        torch.mm(grad_logits, weight_fp32, out=grad_hidden[rows])
        valid_grad_weight = grad_weight[:valid_rows]
        torch.addmm(valid_grad_weight, grad_logits.t(), hidden.float(), out=valid_grad_weight)
    return grad_hidden, grad_weight


# --------------------------------------------------------------------------- the torch loop's buffers


class _Workspace:
    """Three reusable [chunk, V/tp] fp32 buffers (one allocation, no allocator churn)."""

    def __init__(self, chunk_size: int, shard_rows: int, device: torch.device):
        self.buffer = torch.empty(3, chunk_size, shard_rows, dtype=torch.float32, device=device)

    def views(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.buffer[i, :num_rows] for i in range(3))


def _centre_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Subtracts each row's max in place and returns the maxima (−inf for an empty shard)."""
    if logits.shape[1] == 0:
        return torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    row_max = logits.max(dim=1).values
    logits.sub_(row_max[:, None])
    return row_max
