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

Two implementations of the per-rank chunk body share everything else (merge, collectives,
autograd): this torch loop — the CPU path and the oracle — and the Triton kernels in
`triton_token_stats.py`, chosen automatically for bf16/fp16 on a GPU (`backend="auto"`;
`SDPG_LOSS_BACKEND=torch` or `model.loss_backend=torch` turns them off).

`single_pass.vocab_parallel_token_loss` is the other way to use these statistics: for a
token-separable loss it takes the gradient in the forward, while each chunk's logits are
held (4 GEMMs instead of 6; the trainer's GPU default, `model.loss_mode`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

_NUM_STATS_WITH_TEACHER = 5  # S_s, S_t, A (KL), B (entropy), target logit
_NUM_STATS_STUDENT_ONLY = 3  # S_s, B, target logit
_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}  # one [chunk, V/tp] fp32 buffer
BACKENDS = ("auto", "torch", "triton")


class TokenStats(NamedTuple):
    logprobs: torch.Tensor  # [N] log p(target), fp32
    entropy: torch.Tensor  # [N] H(p), fp32
    reverse_kl: torch.Tensor | None  # [N] KL(p ‖ SG q), fp32; None without a teacher


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
            under TRITON_INTERPRET=1), or "auto": Triton for bf16/fp16 CUDA tensors when
            Triton imports, torch otherwise. The environment variable SDPG_LOSS_BACKEND,
            when set, replaces "auto".

    Returns:
        TokenStats of [N] fp32 tensors; each is differentiable w.r.t. student_hidden and
        weight_shard.
    """
    prepared = _prepare(student_hidden, weight_shard, target_ids, teacher_hidden, group=group, vocab_size=vocab_size,
                        temperature=temperature, chunk_size=chunk_size, mask=mask, validate=validate, backend=backend,
                        chunk_bytes=_CHUNK_BYTES, buffers=1)
    logprobs, entropy, reverse_kl = _VocabParallelTokenStats.apply(
        student_hidden, weight_shard, prepared.targets, prepared.mask,
        None if teacher_hidden is None else teacher_hidden.detach(),
        group, prepared.vocab_start, prepared.valid_rows, float(temperature), prepared.chunk_size, prepared.backend,
    )
    return TokenStats(logprobs, entropy, reverse_kl if teacher_hidden is not None else None)


class _Prepared(NamedTuple):
    targets: torch.Tensor  # [N] target ids, 0 on masked slots
    mask: torch.Tensor  # [N] bool
    vocab_start: int  # this rank's first vocabulary row
    valid_rows: int  # its rows below the true vocabulary size
    chunk_size: int
    backend: str


def _prepare(student_hidden, weight_shard, target_ids, teacher_hidden, *, group, vocab_size, temperature,
             chunk_size, mask, validate, backend, chunk_bytes, buffers) -> _Prepared:
    """Checked inputs and the per-rank layout both entry points share; `chunk_size` None
    fits `buffers` [chunk, V/tp] fp32 buffers into `chunk_bytes[device type]`."""
    tp_size = 1 if group is None else dist.get_world_size(group)
    tp_rank = 0 if group is None else dist.get_rank(group)
    _check_inputs(
        student_hidden, weight_shard, target_ids, teacher_hidden, mask,
        vocab_size=vocab_size, tp_size=tp_size, temperature=temperature, chunk_size=chunk_size,
    )
    shard_rows = weight_shard.shape[0]
    if chunk_size is None:
        budget = chunk_bytes.get(student_hidden.device.type, chunk_bytes["cpu"])
        chunk_size = max(1, budget // (4 * buffers * max(shard_rows, 1)))
    vocab_size = shard_rows * tp_size if vocab_size is None else vocab_size
    if mask is None:
        mask = torch.ones_like(target_ids, dtype=torch.bool)
    mask = mask.to(torch.bool)
    if validate:
        _check_target_range(target_ids, mask, vocab_size)
    targets = torch.where(mask, target_ids, torch.zeros_like(target_ids))
    vocab_start = tp_rank * shard_rows
    valid_rows = max(0, min(shard_rows, vocab_size - vocab_start))
    return _Prepared(targets, mask, vocab_start, valid_rows, int(chunk_size), resolve_backend(backend, student_hidden))


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """"torch" or "triton" for these inputs (see `vocab_parallel_token_stats`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SDPG_LOSS_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"SDPG_LOSS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fast_dtype = hidden.dtype in (torch.bfloat16, torch.float16)
        return "triton" if hidden.device.type == "cuda" and fast_dtype and _triton_kernels() is not None else "torch"
    if backend == "triton":
        kernels = _triton_kernels()
        if kernels is None:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not kernels.available(hidden):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got "
                f"{hidden.device.type}; use backend='torch'"
            )
    return backend


def _triton_kernels():
    try:
        from sdpg_megatron.parallel import triton_token_stats
    except ImportError:
        return None
    return triton_token_stats


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
                _owned_target_rows(target_local, owns_target), valid_rows, temperature,
            )
            local_max, partials = _merge_splits(split_max, split_partials, with_teacher)
        else:
            local_max, partials = _torch_local_partials(
                student_hidden, teacher_hidden, _compute_weight(weight_shard, valid_rows), target_local,
                owns_target, valid_rows, temperature, chunk_size,
            )

        logprobs, entropy, reverse_kl, student_log_z, teacher_log_z = _finish_stats(
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
        coef_logp, constant = _logit_coefficients(g_lp, g_h, g_kl, entropy, reverse_kl)
        target_local = targets - ctx.vocab_start
        owns_target = (target_local >= 0) & (target_local < valid_rows)

        if ctx.backend == "triton":
            coefficients = torch.stack([
                student_log_z, zero if teacher_log_z is None else teacher_log_z,
                coef_logp, g_kl, constant, torch.where(owns_target, g_lp, zero),
            ])
            grad_hidden, grad_weight = _triton_kernels().grads(
                student_hidden, teacher_hidden, weight_shard.detach()[:valid_rows], _owned_target_rows(target_local, owns_target),
                coefficients, valid_rows, temperature, shard_rows=weight_shard.shape[0],
            )
        else:
            grad_hidden, grad_weight = _torch_local_grads(
                student_hidden, teacher_hidden, _compute_weight(weight_shard, valid_rows), weight_shard.shape[0], target_local, owns_target,
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


def _finish_stats(local_max, partials, group, mask, with_teacher):
    """(log p(y), H, KL, log Z_s, log Z_t | None) per token from one rank's maxima [2 | 1, N]
    and partials [5 | 3, N], with exactly two collectives over the group: a MAX over the
    maxima, then (after re-centring each rank's partials on the global maxima) a SUM."""
    if group is None:  # one rank: its maxima are the global ones
        global_max, rescaled = local_max, partials
    else:
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescaled = _rescale(partials, local_max, global_max, with_teacher)
        dist.all_reduce(rescaled, op=dist.ReduceOp.SUM, group=group)

    log_sum_exp = torch.log(rescaled[0])
    student_log_z = global_max[0] + log_sum_exp
    logprobs = rescaled[-1] - student_log_z
    entropy = log_sum_exp - rescaled[-2] / rescaled[0]
    if with_teacher:
        teacher_log_sum_exp = torch.log(rescaled[1])
        teacher_log_z = global_max[1] + teacher_log_sum_exp
        # KL = Σ p·((zₛ−Mₛ) − (zₜ−Mₜ)) − log Sₛ + log Sₜ, all centred on the global maxima.
        reverse_kl = rescaled[2] / rescaled[0] - log_sum_exp + teacher_log_sum_exp
    else:
        teacher_log_z = None
        reverse_kl = torch.zeros_like(logprobs)
    zero = torch.zeros_like(logprobs)
    return (torch.where(mask, logprobs, zero), torch.where(mask, entropy, zero),
            torch.where(mask, reverse_kl, zero), student_log_z, teacher_log_z)


def _logit_coefficients(g_lp, g_h, g_kl, entropy, reverse_kl):
    """(g_H − g_KL, g_lp + g_H·H + g_KL·KL): ∂/∂z = −p ⊙ [(g_H − g_KL)·log p + g_KL·log q + c]
    + g_lp·onehot(y), for upstream gradients g of log p(y), H and KL."""
    return g_h - g_kl, g_lp + g_h * entropy + g_kl * reverse_kl


# --------------------------------------------------------------------------- torch chunk body


def _torch_local_partials(
    student_hidden, teacher_hidden, weight, target_local, owns_target, valid_rows, temperature, chunk_size,
):
    """This rank's maxima [2 | 1, N] and partials [5 | 3, N], one [chunk, V/tp] slice at a time."""
    num_tokens = student_hidden.shape[0]
    with_teacher = teacher_hidden is not None
    device = student_hidden.device
    local_max = torch.empty(2 if with_teacher else 1, num_tokens, device=device)
    num_stats = _NUM_STATS_WITH_TEACHER if with_teacher else _NUM_STATS_STUDENT_ONLY
    partials = torch.zeros(num_stats, num_tokens, device=device)
    target_local = target_local.clamp(0, max(valid_rows - 1, 0))
    # Three [chunk, V/tp] fp32 buffers, allocated once: the whole extra footprint.
    workspace = _Workspace(min(chunk_size, num_tokens), weight.shape[0], device)
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        student_logits, exp, teacher_logits = workspace.views(rows.stop - rows.start)
        if with_teacher:  # teacher first, so its e^{zₜ−mₜ} can live in `exp` briefly
            _chunk_logits(teacher_hidden[rows], weight, temperature, out=teacher_logits)
            local_max[1, rows] = _centre_in_place(teacher_logits)
            partials[1, rows] = torch.exp(teacher_logits, out=exp).sum(dim=1)
        _chunk_logits(student_hidden[rows], weight, temperature, out=student_logits)
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
        _chunk_logits(hidden, weight, temperature, out=logp).sub_(student_log_z[rows, None])
        torch.exp(logp, out=probs)
        if with_teacher:
            _chunk_logits(teacher_hidden[rows], weight, temperature, out=bracket)
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


# --------------------------------------------------------------------------- merging partials


def _rescale(partials: torch.Tensor, local_max: torch.Tensor, target_max: torch.Tensor, with_teacher: bool):
    """Partials centred on `local_max` re-centred on `target_max` (≥ it), on dim −2.

    A part with no vocabulary rows (max −inf) contributes exactly 0. Works for one rank's
    [k, N] as for a stack of splits [splits, k, N]."""
    has_rows = torch.isfinite(local_max)
    shift = torch.where(has_rows, target_max - local_max, torch.zeros_like(local_max))
    scale = torch.where(has_rows, torch.exp(-shift), torch.zeros_like(local_max))
    rescaled = partials.clone()
    s_student, shift_student, scale_student = partials[..., 0, :], shift[..., 0, :], scale[..., 0, :]
    rescaled[..., 0, :] = s_student * scale_student
    rescaled[..., -2, :] = scale_student * (partials[..., -2, :] - shift_student * s_student)
    if with_teacher:
        rescaled[..., 1, :] = partials[..., 1, :] * scale[..., 1, :]
        rescaled[..., 2, :] = scale_student * (partials[..., 2, :] - (shift_student - shift[..., 1, :]) * s_student)
    return rescaled


def _merge_splits(split_max: torch.Tensor, split_partials: torch.Tensor, with_teacher: bool):
    """One rank's (maxima, partials) from the kernel's per-split ones: the same rescaling
    as across TP ranks, then a sum (the target logit is raw, owned by one split)."""
    local_max = split_max.max(dim=0).values
    return local_max, _rescale(split_partials, split_max, local_max, with_teacher).sum(dim=0)


def _owned_target_rows(target_local: torch.Tensor, owns_target: torch.Tensor) -> torch.Tensor:
    """[N] int32: the target's row in this shard, −1 where another rank (or none) owns it."""
    return torch.where(owns_target, target_local, torch.full_like(target_local, -1)).to(torch.int32)


# --------------------------------------------------------------------------- chunk math


class _Workspace:
    """Three reusable [chunk, V/tp] fp32 buffers (one allocation, no allocator churn)."""

    def __init__(self, chunk_size: int, shard_rows: int, device: torch.device):
        self.buffer = torch.empty(3, chunk_size, shard_rows, dtype=torch.float32, device=device)

    def views(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.buffer[i, :num_rows] for i in range(3))


def _compute_weight(weight_shard: torch.Tensor, valid_rows: int) -> torch.Tensor:
    """The valid rows of the shard in the dtype the logits are computed in (fp32 on CPU)."""
    weight = weight_shard.detach()[:valid_rows]
    if weight.dtype != torch.float32 and weight.device.type != "cuda":
        weight = weight.float()
    return weight


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, *, out: torch.Tensor
) -> torch.Tensor:
    """out ← hWᵀ/τ in fp32 ([c, V/tp]); bf16 inputs accumulate in fp32."""
    _product_fp32(hidden.detach().to(weight.dtype), weight.t(), out=out)
    if temperature != 1.0:
        out.div_(temperature)
    return out


# Whether this torch's mm / addmm write into an fp32 `out` from bf16 inputs (out_dtype, CUDA).
_fp32_output = {"mm": True, "addmm": True}


def _product_fp32(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) ← a @ b; bf16/fp16 inputs accumulate in fp32 and are written as fp32 by
    cuBLAS itself where this torch can (no fp32 copy of either operand, no temporary)."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.mm(a.float(), b.float(), out=out)
    if _fp32_output["mm"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):
            _fp32_output["mm"] = False
    return out.copy_(torch.mm(a, b, out_dtype=torch.float32))


def _accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b; bf16/fp16 inputs accumulate in fp32 inside one cuBLAS call
    (addmm with out_dtype, β = 1) where this torch has it, else through an fp32 product."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        out += a.float() @ b.float()
        return
    if _fp32_output["addmm"]:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError):  # older torch: no addmm.dtype_out
            _fp32_output["addmm"] = False
    out += torch.mm(a, b, out_dtype=torch.float32)


def _centre_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Subtracts each row's max in place and returns the maxima (−inf for an empty shard)."""
    if logits.shape[1] == 0:
        return torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    row_max = logits.max(dim=1).values
    logits.sub_(row_max[:, None])
    return row_max


# --------------------------------------------------------------------------- input checks


def _check_inputs(
    student_hidden, weight_shard, target_ids, teacher_hidden, mask,
    *, vocab_size, tp_size, temperature, chunk_size,
) -> None:
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be [N, H], got shape {tuple(student_hidden.shape)}")
    num_tokens, hidden_size = student_hidden.shape
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden_size:
        raise ValueError(
            f"weight_shard must be [V/tp, H={hidden_size}], got shape {tuple(weight_shard.shape)}"
        )
    if not student_hidden.is_floating_point() or not weight_shard.is_floating_point():
        raise ValueError(
            f"student_hidden and weight_shard must be floating point, got "
            f"{student_hidden.dtype} and {weight_shard.dtype}"
        )
    if student_hidden.dtype != weight_shard.dtype:
        raise ValueError(
            f"student_hidden ({student_hidden.dtype}) and weight_shard ({weight_shard.dtype}) "
            "must have the same dtype"
        )
    if target_ids.shape != (num_tokens,) or target_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"target_ids must be an int32/int64 tensor of shape [{num_tokens}], got "
            f"{target_ids.dtype} {tuple(target_ids.shape)}"
        )
    tensors = {"student_hidden": student_hidden, "weight_shard": weight_shard, "target_ids": target_ids}
    if teacher_hidden is not None:
        if teacher_hidden.shape != student_hidden.shape or teacher_hidden.dtype != student_hidden.dtype:
            raise ValueError(
                f"teacher_hidden must match student_hidden ({student_hidden.dtype} "
                f"{tuple(student_hidden.shape)}), got {teacher_hidden.dtype} {tuple(teacher_hidden.shape)}"
            )
        tensors["teacher_hidden"] = teacher_hidden
    if mask is not None:
        if mask.shape != (num_tokens,):
            raise ValueError(f"mask must have shape [{num_tokens}], got {tuple(mask.shape)}")
        tensors["mask"] = mask
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if vocab_size is not None and not 0 < vocab_size <= weight_shard.shape[0] * tp_size:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, V/tp·tp = {weight_shard.shape[0] * tp_size}]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_target_range(target_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    if not mask.any():
        return
    selected = target_ids[mask]
    low, high = int(selected.min()), int(selected.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"target_ids must lie in [0, vocab_size={vocab_size}), got values in [{low}, {high}]"
        )
