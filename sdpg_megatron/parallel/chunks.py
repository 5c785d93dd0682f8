"""The fused loss's shared chunk math: what both entry points and the Triton path share.

`vocab_parallel.vocab_parallel_token_stats` (statistics now, gradient in a backward that
recomputes the logits) and `single_pass.vocab_parallel_token_loss` (gradient in the
forward) run the same per-rank pieces, whichever backend forms the partials:

- `prepare`: the checked inputs and this rank's layout (its vocabulary rows, its chunk);
- `chunk_logits`, `product_fp32`, `accumulate_fp32`: fp32 logits and products from
  bf16/fp16 operands, written by cuBLAS itself where this torch can;
- `rescale_partials`, `merge_splits`, `finish_stats`: one rank's maxima [2 | 1, N] and
  partials [5 | 3, N] (rows S, Sₜ, A, B, target logit; without a teacher S, B, target
  logit) re-centred, merged, and finished into the statistics with exactly two
  collectives;
- `logit_coefficients`, `owned_target_rows`: what ∂z needs per token.

Backend selection stays with the entry points (`vocab_parallel.resolve_backend`); nothing
here imports them or the Triton kernels.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

NUM_STATS_WITH_TEACHER = 5  # S_s, S_t, A (KL), B (entropy), target logit
NUM_STATS_STUDENT_ONLY = 3  # S_s, B, target logit


class TokenStats(NamedTuple):
    logprobs: torch.Tensor  # [N] log p(target), fp32
    entropy: torch.Tensor  # [N] H(p), fp32
    reverse_kl: torch.Tensor | None  # [N] KL(p ‖ SG q), fp32; None without a teacher


# --------------------------------------------------------------------------- inputs and layout


class Prepared(NamedTuple):
    targets: torch.Tensor  # [N] target ids, 0 on masked slots
    mask: torch.Tensor  # [N] bool
    vocab_start: int  # this rank's first vocabulary row
    valid_rows: int  # its rows below the true vocabulary size
    chunk_size: int


def chunk_tokens(chunk_bytes: dict[str, int], device_type: str, shard_rows: int, *, buffers: int) -> int:
    """Tokens per chunk so that `buffers` [chunk, V/tp] fp32 buffers fit in
    `chunk_bytes[device_type]` (the "cpu" budget for other devices)."""
    budget = chunk_bytes.get(device_type, chunk_bytes["cpu"])
    return max(1, budget // (4 * buffers * max(shard_rows, 1)))


def prepare(student_hidden, weight_shard, target_ids, teacher_hidden, *, group, vocab_size, temperature,
            chunk_size, mask, validate, chunk_bytes, buffers) -> Prepared:
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
        chunk_size = chunk_tokens(chunk_bytes, student_hidden.device.type, shard_rows, buffers=buffers)
    vocab_size = shard_rows * tp_size if vocab_size is None else vocab_size
    if mask is None:
        mask = torch.ones_like(target_ids, dtype=torch.bool)
    mask = mask.to(torch.bool)
    if validate:
        _check_target_range(target_ids, mask, vocab_size)
    targets = torch.where(mask, target_ids, torch.zeros_like(target_ids))
    vocab_start = tp_rank * shard_rows
    valid_rows = max(0, min(shard_rows, vocab_size - vocab_start))
    return Prepared(targets, mask, vocab_start, valid_rows, int(chunk_size))


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


# --------------------------------------------------------------------------- merging and finishing


def finish_stats(local_max, partials, group, mask, with_teacher):
    """(log p(y), H, KL, log Z_s, log Z_t | None) per token from one rank's maxima [2 | 1, N]
    and partials [5 | 3, N], with exactly two collectives over the group: a MAX over the
    maxima, then (after re-centring each rank's partials on the global maxima) a SUM."""
    if group is None:  # one rank: its maxima are the global ones
        global_max, rescaled = local_max, partials
    else:
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescaled = rescale_partials(partials, local_max, global_max, with_teacher)
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


def rescale_partials(partials: torch.Tensor, local_max: torch.Tensor, target_max: torch.Tensor, with_teacher: bool):
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


def merge_splits(split_max: torch.Tensor, split_partials: torch.Tensor, with_teacher: bool):
    """One rank's (maxima, partials) from the kernel's per-split ones: the same rescaling
    as across TP ranks, then a sum (the target logit is raw, owned by one split)."""
    local_max = split_max.max(dim=0).values
    return local_max, rescale_partials(split_partials, split_max, local_max, with_teacher).sum(dim=0)


def logit_coefficients(g_lp, g_h, g_kl, entropy, reverse_kl):
    """(g_H − g_KL, g_lp + g_H·H + g_KL·KL): ∂/∂z = −p ⊙ [(g_H − g_KL)·log p + g_KL·log q + c]
    + g_lp·onehot(y), for upstream gradients g of log p(y), H and KL."""
    return g_h - g_kl, g_lp + g_h * entropy + g_kl * reverse_kl


def owned_target_rows(target_local: torch.Tensor, owns_target: torch.Tensor) -> torch.Tensor:
    """[N] int32: the target's row in this shard, −1 where another rank (or none) owns it."""
    return torch.where(owns_target, target_local, torch.full_like(target_local, -1)).to(torch.int32)


# --------------------------------------------------------------------------- fp32 logits and products


def compute_weight(weight_shard: torch.Tensor, valid_rows: int) -> torch.Tensor:
    """The valid rows of the shard in the dtype the logits are computed in (fp32 on CPU)."""
    weight = weight_shard.detach()[:valid_rows]
    if weight.dtype != torch.float32 and weight.device.type != "cuda":
        weight = weight.float()
    return weight


def chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, *, out: torch.Tensor
) -> torch.Tensor:
    """out ← hWᵀ/τ in fp32 ([c, V/tp]); bf16 inputs accumulate in fp32."""
    product_fp32(hidden.detach().to(weight.dtype), weight.t(), out=out)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def product_fp32(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) ← a @ b; bf16/fp16 inputs accumulate in fp32 and are written as fp32 by
    cuBLAS itself where this torch can (no fp32 copy of either operand, no temporary)."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.mm(a.float(), b.float(), out=out)
    if fp32_output_supported("mm", a):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return out.copy_(torch.mm(a, b, out_dtype=torch.float32))


def accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) += a @ b; bf16/fp16 inputs accumulate in fp32 inside one cuBLAS call
    (addmm with out_dtype, β = 1) where this torch has it, else through an fp32 product."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        out += a.float() @ b.float()
        return
    if fp32_output_supported("addmm", a):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return
    out += torch.mm(a, b, out_dtype=torch.float32)


# (op, device type, input dtype) → whether `op` writes an fp32 `out` from these inputs itself.
_fp32_output: dict[tuple[str, str, torch.dtype], bool] = {}


def fp32_output_supported(op: str, a: torch.Tensor) -> bool:
    """Whether this torch's `op` ("mm" or "addmm") takes `out_dtype=torch.float32` with an
    fp32 `out` for `a`'s dtype on `a`'s device: probed once on 8×8 tensors, because the
    support is per torch build and dtype, not per shape. An unsupported op is logged once
    with the fix and the caller goes through an fp32 temporary; anything else the probe
    raises (an out-of-memory error above all) propagates: it says nothing about support."""
    key = (op, a.device.type, a.dtype)
    if key not in _fp32_output:
        operand = torch.zeros(8, 8, dtype=a.dtype, device=a.device)
        out = torch.zeros(8, 8, dtype=torch.float32, device=a.device)
        try:
            if op == "mm":
                torch.mm(operand, operand, out_dtype=torch.float32, out=out)
            else:
                torch.addmm(out, operand, operand, out_dtype=torch.float32, out=out)
            _fp32_output[key] = True
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as error:  # no such overload, or not for this dtype/device
            _fp32_output[key] = False
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            _warn_once(
                f"torch {torch.__version__} cannot write torch.{op}'s fp32 output from {a.dtype} inputs on "
                f"{a.device.type} ({reason}); the fused loss's {op} GEMMs go through an fp32 temporary instead "
                "(one extra [rows, cols] fp32 buffer and pass per GEMM). Fix: install the torch version the "
                "project pins (its CUDA mm/addmm take out_dtype=torch.float32 for bf16/fp16 inputs)."
            )
    return _fp32_output[key]


def fp32_output_gemms() -> dict[str, bool]:
    """What `fp32_output_supported` found so far, per "op/device/dtype" (benchmark reports)."""
    return {f"{op}/{device}/{str(dtype).removeprefix('torch.')}": supported
            for (op, device, dtype), supported in _fp32_output.items()}


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)
