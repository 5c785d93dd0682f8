"""Triton row kernels of the single pass (`single_pass.vocab_parallel_token_loss`).

The single pass forms a chunk's fp32 logits with cuBLAS; these two kernels reduce them to
the per-token statistics (the online fold of `triton_fold.py`, shared with
`triton_token_stats`' forward kernel: the same [2 | 1, c] maxima and [5 | 3, c] partials)
and turn them into ∂z, one program per ROWS logit rows, walking the vocabulary in
BLOCK-wide column blocks. They run under Triton's
interpreter on CPU (`tests/triton_interpreter_cases.py`, against `single_pass._TorchRows`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdpg_megatron.parallel.triton_fold import fold_tile, no_stats, store_stats


@triton.jit
def _row_partials_kernel(
    s_ptr, t_ptr, tgt_ptr, max_ptr, part_ptr, num_rows, num_cols, stride,
    WITH_TEACHER: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """`_forward_kernel`'s online statistics, from stored logits instead of dots."""
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = offs_r < num_rows
    base = offs_r.to(tl.int64)[:, None] * stride
    neg_inf = float("-inf")
    m_s, s_s, b_s, m_t, s_t, a_st = no_stats(ROWS)
    for n0 in range(0, num_cols, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        mask = mask_r[:, None] & (offs_n < num_cols)[None, :]
        z_s = tl.load(s_ptr + base + offs_n[None, :], mask=mask, other=neg_inf)
        z_t = z_s
        if WITH_TEACHER:
            z_t = tl.load(t_ptr + base + offs_n[None, :], mask=mask, other=neg_inf)
        m_s, s_s, b_s, m_t, s_t, a_st = fold_tile(m_s, s_s, b_s, m_t, s_t, a_st, z_s, z_t, mask, WITH_TEACHER)
    targets = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)
    owned = mask_r & (targets >= 0)
    target_logit = tl.load(s_ptr + offs_r.to(tl.int64) * stride + tl.maximum(targets, 0), mask=owned, other=0.0)

    store_stats(max_ptr, part_ptr, offs_r, mask_r, num_rows, m_s, s_s, b_s, target_logit, m_t, s_t, a_st,
                 WITH_TEACHER)


@triton.jit
def _row_grads_kernel(
    s_ptr, t_ptr, dz_ptr, tgt_ptr, coef_ptr, num_rows, num_cols, stride, stride_dz, inv_tau,
    WITH_TEACHER: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """∂z from stored logits, into its own buffer."""
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = offs_r < num_rows
    rows64 = offs_r.to(tl.int64)[:, None]
    log_z_s = tl.load(coef_ptr + offs_r, mask=mask_r, other=0.0)[:, None]
    log_z_t = tl.load(coef_ptr + num_rows + offs_r, mask=mask_r, other=0.0)[:, None]
    coef_logp = tl.load(coef_ptr + 2 * num_rows + offs_r, mask=mask_r, other=0.0)[:, None]
    coef_logq = tl.load(coef_ptr + 3 * num_rows + offs_r, mask=mask_r, other=0.0)[:, None]
    constant = tl.load(coef_ptr + 4 * num_rows + offs_r, mask=mask_r, other=0.0)[:, None]
    g_target = tl.load(coef_ptr + 5 * num_rows + offs_r, mask=mask_r, other=0.0)[:, None]
    targets = tl.load(tgt_ptr + offs_r, mask=mask_r, other=-1)[:, None]
    for n0 in range(0, num_cols, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        mask = mask_r[:, None] & (offs_n < num_cols)[None, :]
        log_p = tl.load(s_ptr + rows64 * stride + offs_n[None, :], mask=mask, other=0.0) - log_z_s
        bracket = coef_logp * log_p + constant
        if WITH_TEACHER:
            log_q = tl.load(t_ptr + rows64 * stride + offs_n[None, :], mask=mask, other=0.0) - log_z_t
            bracket += coef_logq * log_q
        grad = -tl.exp(log_p) * bracket + tl.where(offs_n[None, :] == targets, g_target, 0.0)
        tl.store(dz_ptr + rows64 * stride_dz + offs_n[None, :], (grad * inv_tau).to(dz_ptr.dtype.element_ty), mask=mask)


_ROW_LAUNCH = {"cuda": dict(ROWS=1, BLOCK=4096, num_warps=8), "cpu": dict(ROWS=2, BLOCK=64, num_warps=1)}


def _row_launch(tensor: torch.Tensor) -> dict:
    return _ROW_LAUNCH["cuda" if tensor.device.type == "cuda" else "cpu"]


def row_partials(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 target_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maxima [2 | 1, c] and partials [5 | 3, c] of fp32 logits [c, V/tp] (already / τ),
    laid out as `local_partials`' (one split); target_rows: [c] int32, −1 where another
    rank owns the target."""
    count, cols = student_logits.shape
    with_teacher = teacher_logits is not None
    device = student_logits.device
    maxima = torch.full((2 if with_teacher else 1, count), float("-inf"), device=device)
    partials = torch.zeros(5 if with_teacher else 3, count, device=device)
    if count == 0 or cols == 0:
        return maxima, partials
    _check_rows(student_logits, teacher_logits)
    launch = _row_launch(student_logits)
    _row_partials_kernel[(triton.cdiv(count, launch["ROWS"]),)](
        student_logits, student_logits if teacher_logits is None else teacher_logits, target_rows.contiguous(),
        maxima, partials, count, cols, student_logits.stride(0), WITH_TEACHER=with_teacher, **launch,
    )
    return maxima, partials


def row_grads(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target_rows: torch.Tensor,
              coefficients: torch.Tensor, temperature: float, *, out: torch.Tensor) -> torch.Tensor:
    """out [c, V/tp] (row-major, any float dtype) ← ∂z of fp32 logits [c, V/tp];
    coefficients: [6, c] fp32, the rows of `grads`."""
    count, cols = student_logits.shape
    _check_rows(student_logits, teacher_logits)
    if out.shape != student_logits.shape or (count and cols and out.stride(1) != 1):
        raise ValueError(f"out must be a row-major {tuple(student_logits.shape)} tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if count == 0 or cols == 0:
        return out
    launch = _row_launch(student_logits)
    _row_grads_kernel[(triton.cdiv(count, launch["ROWS"]),)](
        student_logits, student_logits if teacher_logits is None else teacher_logits, out,
        target_rows.contiguous(), coefficients.contiguous(), count, cols, student_logits.stride(0),
        out.stride(0), 1.0 / temperature, WITH_TEACHER=teacher_logits is not None, **launch,
    )
    return out


def _check_rows(student_logits, teacher_logits) -> None:
    if student_logits.dtype != torch.float32 or student_logits.stride(1) != 1:
        raise ValueError(f"row kernels take row-major fp32 logits, got {student_logits.dtype} "
                         f"with strides {student_logits.stride()}")
    if teacher_logits is not None and (teacher_logits.shape != student_logits.shape
                                       or teacher_logits.stride() != student_logits.stride()):
        raise ValueError("teacher logits must have the student logits' shape and strides")
