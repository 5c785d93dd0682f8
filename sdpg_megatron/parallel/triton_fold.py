"""The online statistics both Triton kernel files fold logit tiles into.

`triton_token_stats._forward_kernel` forms its logit tiles with `tl.dot`s and
`triton_rows._row_partials_kernel` reads them from stored fp32 logits; both keep, per
token row, the same running state and hand it back in the same layout:

    m = max z,  S = Σ e^{z−m},  B = Σ e^{z−m}(z−m),  mₜ, Sₜ = Σ e^{zₜ−mₜ},
    A = Σ e^{z−m}((z−m) − (zₜ−mₜ)).

When a maximum moves from m to m' every sum is rescaled by α = e^{m−m'} with the shift
d = m − m' (B' = α(B + d·S), A' = α(A + (d − dₜ)·S)), so no logit is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def no_stats(ROWS: tl.constexpr):
    """`fold_tile`'s state before the first tile: maxima −inf, sums 0."""
    return (tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32), tl.zeros((ROWS,), tl.float32),
            tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32), tl.zeros((ROWS,), tl.float32))


@triton.jit
def fold_tile(m_s, s_s, b_s, m_t, s_t, a_st, z_s, z_t, valid, WITH_TEACHER: tl.constexpr):
    """One [rows, columns] tile of logits (−inf where not `valid`) folded into the online
    statistics centred on the running maxima (module docstring). Rows with no valid column
    yet keep maximum −inf and sums 0."""
    neg_inf = float("-inf")
    new_m = tl.maximum(m_s, tl.max(z_s, axis=1))
    shift = tl.where(m_s == neg_inf, 0.0, m_s - new_m)  # d = m − m' (0 before the first tile)
    alpha = tl.exp(shift)
    centred_s = tl.where(valid, z_s - tl.where(new_m == neg_inf, 0.0, new_m)[:, None], 0.0)
    e_s = tl.where(valid, tl.exp(centred_s), 0.0)
    s_old = s_s
    s_s = alpha * s_s + tl.sum(e_s, axis=1)
    b_s = alpha * (b_s + shift * s_old) + tl.sum(e_s * centred_s, axis=1)
    if WITH_TEACHER:
        new_mt = tl.maximum(m_t, tl.max(z_t, axis=1))
        shift_t = tl.where(m_t == neg_inf, 0.0, m_t - new_mt)
        centred_t = tl.where(valid, z_t - tl.where(new_mt == neg_inf, 0.0, new_mt)[:, None], 0.0)
        s_t = tl.exp(shift_t) * s_t + tl.sum(tl.where(valid, tl.exp(centred_t), 0.0), axis=1)
        a_st = alpha * (a_st + (shift - shift_t) * s_old) + tl.sum(e_s * (centred_s - centred_t), axis=1)
        m_t = new_mt
    return new_m, s_s, b_s, m_t, s_t, a_st


@triton.jit
def store_stats(max_ptr, part_ptr, offs, mask, num_tokens, m_s, s_s, b_s, target_logit, m_t, s_t, a_st,
                WITH_TEACHER: tl.constexpr):
    """The layout shared with the torch path: maxima [2 | 1, N] (student, teacher) and
    partials [S, Sₜ, A, B, y] or [S, B, y], at one split's base pointers."""
    num_stats = 5 if WITH_TEACHER else 3
    tl.store(max_ptr + offs, m_s, mask=mask)
    tl.store(part_ptr + offs, s_s, mask=mask)
    tl.store(part_ptr + (num_stats - 2) * num_tokens + offs, b_s, mask=mask)
    tl.store(part_ptr + (num_stats - 1) * num_tokens + offs, target_logit, mask=mask)
    if WITH_TEACHER:
        tl.store(max_ptr + num_tokens + offs, m_t, mask=mask)
        tl.store(part_ptr + num_tokens + offs, s_t, mask=mask)
        tl.store(part_ptr + 2 * num_tokens + offs, a_st, mask=mask)
