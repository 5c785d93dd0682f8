"""Triton kernels for the chunk body of `vocab_parallel_token_stats` (the GPU fast path).

The torch chunked loop in `vocab_parallel.py` stays the default and the oracle; these
kernels compute the same per-rank quantities and hand them back to the same merge and
collectives (`chunks.py`) and autograd bookkeeping (`vocab_parallel.py`).

Forward (one launch, no [tokens × V/tp] buffer at all): a program owns BLOCK_M tokens and
one contiguous split of this rank's vocabulary rows. Per [BLOCK_M, BLOCK_N] tile it forms
the student and teacher logits with two `tl.dot`s that share the weight tile (bf16 in,
fp32 accumulate), then folds them into online statistics centred on running maxima
(`triton_fold.fold_tile`, shared with the single pass's row kernels):

    S = Σ e^{z−m},  Sₜ = Σ e^{zₜ−mₜ},  A = Σ e^{z−m}((z−m) − (zₜ−mₜ)),  B = Σ e^{z−m}(z−m)

and the raw target logit. When a maximum moves from m to m' every sum is rescaled by
α = e^{m−m'} with the shift d = m − m' (B' = α(B + d·S), A' = α(A + (d − dₜ)·S)), so no
logit is stored. The splits come back as [splits, ·, N] partials with their own maxima;
`chunks.merge_splits` merges them with exactly the rescaling used across TP ranks.

Backward: the vocabulary is walked in blocks of columns; for each block a kernel
recomputes both logit tiles and writes ∂z (in the weight's dtype) for every token,

    ∂z = [g_lp·1[a=y] − p·((g_H − g_KL)·log p + g_KL·log q + g_lp + g_H·H + g_KL·KL)] / τ

and two cuBLAS GEMMs finish the block: ∂W[block] = ∂zᵀ h (accumulated over all tokens in
fp32 inside the GEMM) and ∂h += ∂z W[block] (fp32 accumulator). Only one
[tokens × block] ∂z buffer is ever alive; its width is set by a byte budget.

On CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1), which is how
the test suite checks them against the torch path without a GPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sdpg_megatron.parallel.chunks import accumulate_fp32, merge_splits
from sdpg_megatron.parallel.triton_fold import fold_tile, no_stats, store_stats

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# Where the kernels apply: GPU tensors (or any tensor under the interpreter).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DZ_BYTES = {"cuda": 512 * 2**20, "cpu": 2**20}  # one [tokens, block] ∂z buffer


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # token blocks per band of the program order (L2 reuse)
    tma: bool = False  # operand tiles through TMA tensor descriptors (Hopper and newer)
    flatten: bool = False  # the forward's vocabulary and K loops pipelined as one (epilogue overlap)

    def __str__(self) -> str:
        name = f"M{self.block_m}N{self.block_n}K{self.block_k}w{self.num_warps}s{self.num_stages}g{self.group_m}"
        return name + ("tma" if self.tma else "") + ("flat" if self.flatten else "")

    def launch_options(self) -> dict:
        """The tile constexprs and launch options both kernels take."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    TMA=self.tma, num_warps=self.num_warps, num_stages=self.num_stages)


# Candidates timed once per shape on the GPU (the first call of a shape pays for it);
# the interpreter runs the small one.
GPU_CONFIGS = (
    # Pointer loads first: the tuner checks its pick against the first configuration that ran.
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3, group_m=16),
    KernelConfig(128, 64, 64, num_warps=8, num_stages=3),  # smaller tiles: for GPUs with less
    KernelConfig(64, 64, 64, num_warps=4, num_stages=4),  # shared memory than an H100's
    # TMA tile loads (Hopper and newer, aligned inputs only): the best pointer-load time was
    # 1.03-1.27x the best TMA time in all 24 shapes tuned on an H100 (benchmarks/gpu/NOTES.md).
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3, group_m=16, tma=True),
)
# Tuned only with SDPG_TRITON_EXPERIMENTAL=1: the flattened forward loop was slower than the
# plain one in 11 of 12 shapes on an H100 (benchmarks/gpu/NOTES.md, run 5; larger TMA tiles,
# measured in run 8, lost everywhere and are not kept).
EXPERIMENTAL_CONFIGS = (
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3, tma=True, flatten=True),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4, tma=True, flatten=True),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3, flatten=True),
)
INTERPRETER_CONFIG = KernelConfig(16, 32, 32, num_warps=1, num_stages=1, group_m=2)
_chosen: dict[tuple, KernelConfig] = {}
_tuning: dict[str, dict] = {}


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on `tensor`'s device."""
    return tensor.device.type == "cuda" or _INTERPRET


# --------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tiles(
    hs, ht, w, m0, n0, offs_m, offs_n, mask_m, mask_n, hidden_size,
    stride_h, stride_w,
    WITH_TEACHER: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Student and teacher logits of one tile (fp32), sharing each weight tile.

    hs, ht, w are pointers, or with TMA tensor descriptors whose loads are zero past the
    tensors' edges (so they need no masks); rows m0.., columns n0.. start the tile."""
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if TMA:
            w_tile = w.load([n0, k0]).T
            hs_tile = hs.load([m0, k0])
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < hidden_size
            w_tile = tl.load(w + offs_n[None, :] * stride_w + offs_k[:, None],
                             mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            hs_tile = tl.load(hs + offs_m[:, None] * stride_h + offs_k[None, :],
                              mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc_s = _dot(hs_tile, w_tile, acc_s, IEEE)
        if WITH_TEACHER:
            if TMA:
                ht_tile = ht.load([m0, k0])
            else:
                ht_tile = tl.load(ht + offs_m[:, None] * stride_h + offs_k[None, :],
                                  mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc_t = _dot(ht_tile, w_tile, acc_t, IEEE)
    return acc_s, acc_t


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs, or the interpreter (whose bf16 dot is wrong): exact fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _grouped_program(num_rows, num_cols, GROUP_M: tl.constexpr):
    """(row, column) of this program with GROUP_M row blocks per band: the programs that
    run at the same time share a few token blocks and a few vocabulary columns, so both
    the hidden states and the weight tiles they stream are served from L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_cols
    first_row = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(num_rows - first_row, GROUP_M)
    return first_row + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def _forward_kernel(
    hs, ht, w, tgt_ptr, max_ptr, part_ptr,
    num_tokens, hidden_size, valid_rows, cols_per_split, num_splits, inv_tau,
    stride_h, stride_w,
    WITH_TEACHER: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, split = _grouped_program(tl.cdiv(num_tokens, BLOCK_M), num_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_tokens
    targets = tl.load(tgt_ptr + offs_m, mask=mask_m, other=-1)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, valid_rows)

    neg_inf = float("-inf")
    m_s, s_s, b_s, m_t, s_t, a_st = no_stats(BLOCK_M)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)

    for n0 in tl.range(col_begin, col_end, BLOCK_N, flatten=FLATTEN):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < col_end
        acc_s, acc_t = _logit_tiles(
            hs, ht, w, pid_m * BLOCK_M, n0, offs_m, offs_n, mask_m, mask_n, hidden_size, stride_h, stride_w,
            WITH_TEACHER, IEEE, TMA, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        z_s = tl.where(mask_n[None, :], acc_s * inv_tau, neg_inf)
        target_logit += tl.sum(tl.where(offs_n[None, :] == targets[:, None], z_s, 0.0), axis=1)
        z_t = tl.where(mask_n[None, :], acc_t * inv_tau, neg_inf)
        m_s, s_s, b_s, m_t, s_t, a_st = fold_tile(
            m_s, s_s, b_s, m_t, s_t, a_st, z_s, z_t, mask_n[None, :], WITH_TEACHER)

    store_stats(max_ptr + split * (2 if WITH_TEACHER else 1) * num_tokens,
                 part_ptr + split * (5 if WITH_TEACHER else 3) * num_tokens, offs_m, mask_m, num_tokens,
                 m_s, s_s, b_s, target_logit, m_t, s_t, a_st, WITH_TEACHER)


@triton.jit
def _grad_logits_kernel(
    hs, ht, w, tgt_ptr, coef_ptr, dz_ptr,
    num_tokens, hidden_size, col_begin, col_end, inv_tau,
    stride_h, stride_w, stride_dz,
    WITH_TEACHER: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz[:, cols − col_begin] for columns [col_begin, col_end) of this rank's shard.

    coef rows (fp32, [6, N]): log Z_s, log Z_t, g_H − g_KL, g_KL, the constant
    g_lp + g_H·H + g_KL·KL, and g_lp for the owner of the target."""
    pid_m, pid_n = _grouped_program(tl.cdiv(num_tokens, BLOCK_M), tl.cdiv(col_end - col_begin, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_begin + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < num_tokens
    mask_n = offs_n < col_end
    acc_s, acc_t = _logit_tiles(
        hs, ht, w, pid_m * BLOCK_M, col_begin + pid_n * BLOCK_N, offs_m, offs_n, mask_m, mask_n, hidden_size,
        stride_h, stride_w, WITH_TEACHER, IEEE, TMA, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    log_z_s = tl.load(coef_ptr + offs_m, mask=mask_m, other=0.0)
    coef_logp = tl.load(coef_ptr + 2 * num_tokens + offs_m, mask=mask_m, other=0.0)
    constant = tl.load(coef_ptr + 4 * num_tokens + offs_m, mask=mask_m, other=0.0)
    g_target = tl.load(coef_ptr + 5 * num_tokens + offs_m, mask=mask_m, other=0.0)
    targets = tl.load(tgt_ptr + offs_m, mask=mask_m, other=-1)

    log_p = acc_s * inv_tau - log_z_s[:, None]
    bracket = coef_logp[:, None] * log_p + constant[:, None]
    if WITH_TEACHER:
        log_z_t = tl.load(coef_ptr + num_tokens + offs_m, mask=mask_m, other=0.0)
        coef_logq = tl.load(coef_ptr + 3 * num_tokens + offs_m, mask=mask_m, other=0.0)
        bracket += coef_logq[:, None] * (acc_t * inv_tau - log_z_t[:, None])
    grad = -tl.exp(log_p) * bracket
    grad += tl.where(offs_n[None, :] == targets[:, None], g_target[:, None], 0.0)
    grad = grad * inv_tau
    out = dz_ptr + offs_m[:, None] * stride_dz + (offs_n - col_begin)[None, :]
    tl.store(out, grad.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- launchers


def local_partials(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    target_local: torch.Tensor,
    valid_rows: int,
    temperature: float,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split maxima [splits, 2 | 1, N] and partials [splits, 5 | 3, N] (fp32).

    target_local: [N] int32, the target's row in this shard or −1 where another rank owns it.
    weight: [≥ valid_rows, H] rows of this shard, same dtype as the hidden states."""
    student_hidden, teacher, weight, with_teacher, ieee = _kernel_inputs(student_hidden, teacher_hidden, weight)
    weight = weight[:valid_rows]
    num_tokens, hidden_size = student_hidden.shape
    device = student_hidden.device

    def launch(cfg: KernelConfig):
        splits, cols_per_split = _vocab_splits(num_tokens, valid_rows, cfg, device)
        maxima = torch.empty(splits, 2 if with_teacher else 1, num_tokens, device=device)
        partials = torch.empty(splits, 5 if with_teacher else 3, num_tokens, device=device)
        grid = (triton.cdiv(num_tokens, cfg.block_m) * splits,)
        _forward_kernel[grid](
            *_operands(cfg, student_hidden, teacher, weight), target_local, maxima, partials,
            num_tokens, hidden_size, valid_rows, cols_per_split, splits, 1.0 / temperature,
            student_hidden.stride(0), weight.stride(0),
            WITH_TEACHER=with_teacher, IEEE=ieee, FLATTEN=cfg.flatten, **cfg.launch_options(),
        )
        return maxima, partials

    key = ("forward", hidden_size, student_hidden.dtype, with_teacher, _bucket(num_tokens), _bucket(valid_rows))
    tensors = (student_hidden, teacher, weight)
    if config is not None:
        _check_config(config, tensors)
    else:
        config = _choose(key, launch, _candidates(tensors, forward=True), _forward_summary)
    return launch(config)


def grads(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    target_local: torch.Tensor,
    coefficients: torch.Tensor,
    valid_rows: int,
    temperature: float,
    *,
    shard_rows: int,
    block_bytes: int | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h [N, H] fp32, ∂W [shard_rows, H] in the weight's dtype) for this rank's shard.

    coefficients: [6, N] fp32 — log Z_s, log Z_t, g_H − g_KL, g_KL, the per-token constant,
    and the target's upstream gradient where this rank owns it (0 elsewhere)."""
    student_hidden, teacher, weight, with_teacher, ieee = _kernel_inputs(student_hidden, teacher_hidden, weight)
    weight = weight[:valid_rows]
    num_tokens, hidden_size = student_hidden.shape
    coefficients = coefficients.contiguous()
    device, dtype = student_hidden.device, student_hidden.dtype
    grad_hidden = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=device)
    grad_weight = torch.zeros(shard_rows, hidden_size, dtype=dtype, device=device)
    if valid_rows == 0 or num_tokens == 0:
        return grad_hidden, grad_weight

    budget = block_bytes or _DZ_BYTES.get(device.type, _DZ_BYTES["cpu"])
    probe = config or (GPU_CONFIGS[0] if device.type == "cuda" else INTERPRETER_CONFIG)
    tiles = max(1, budget // (num_tokens * student_hidden.element_size()) // probe.block_n)
    block_cols = min(valid_rows, tiles * probe.block_n)
    dz_buffer = torch.empty(num_tokens, block_cols, dtype=dtype, device=device)

    def launch(cfg: KernelConfig, begin: int, end: int) -> torch.Tensor:
        dz = dz_buffer[:, : end - begin]
        grid = (triton.cdiv(num_tokens, cfg.block_m) * triton.cdiv(end - begin, cfg.block_n),)
        _grad_logits_kernel[grid](
            *_operands(cfg, student_hidden, teacher, weight), target_local, coefficients, dz,
            num_tokens, hidden_size, begin, end, 1.0 / temperature,
            student_hidden.stride(0), weight.stride(0), dz.stride(0),
            WITH_TEACHER=with_teacher, IEEE=ieee, **cfg.launch_options(),
        )
        return dz

    key = ("backward", hidden_size, dtype, with_teacher, _bucket(num_tokens), block_cols)
    tensors = (student_hidden, teacher, weight)
    if config is not None:
        _check_config(config, tensors)
    else:
        config = _choose(key, lambda c: launch(c, 0, block_cols), _candidates(tensors, forward=False), _grad_summary)
    for begin in range(0, valid_rows, block_cols):
        end = min(begin + block_cols, valid_rows)
        dz = launch(config, begin, end)
        # ∂W rows of this block: one GEMM over all tokens (fp32 accumulation inside).
        torch.mm(dz.t(), student_hidden, out=grad_weight[begin:end])
        accumulate_fp32(grad_hidden, dz, weight[begin:end])
    return grad_hidden, grad_weight


def _kernel_inputs(student_hidden, teacher_hidden, weight):
    """Contiguous detached inputs, the teacher pointer (the student's when there is none:
    the kernels then never read it), and whether the dots run in exact fp32 (fp32 inputs,
    or the interpreter, whose bf16 dot is wrong)."""
    student_hidden = student_hidden.detach().contiguous()
    with_teacher = teacher_hidden is not None
    teacher = teacher_hidden.detach().contiguous() if with_teacher else student_hidden
    ieee = student_hidden.dtype == torch.float32 or _INTERPRET
    return student_hidden, teacher, weight.detach().contiguous(), with_teacher, ieee


def _vocab_splits(num_tokens: int, valid_rows: int, cfg: KernelConfig, device) -> tuple[int, int]:
    """Vocabulary splits: enough that the grid covers the GPU four times over, and at
    least 4·GROUP_M so that the programs running together span few token blocks."""
    if valid_rows == 0:
        return 1, cfg.block_n
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    token_blocks = triton.cdiv(num_tokens, cfg.block_m)
    tiles = triton.cdiv(valid_rows, cfg.block_n)
    splits = max(1, min(tiles, max(4 * cfg.group_m, triton.cdiv(4 * processors, token_blocks))))
    cols_per_split = triton.cdiv(tiles, splits) * cfg.block_n
    return triton.cdiv(valid_rows, cols_per_split), cols_per_split


def _bucket(n: int) -> int:
    """Shapes within a factor of two share a tuning decision."""
    return 1 << max(0, (n - 1).bit_length())


def _operands(cfg: KernelConfig, student_hidden, teacher, weight) -> tuple:
    """The kernels' first three arguments: the tensors, or TMA descriptors of their tiles."""
    if not cfg.tma:
        return student_hidden, teacher, weight
    hidden_block = [cfg.block_m, cfg.block_k]
    return (TensorDescriptor.from_tensor(student_hidden, hidden_block),
            TensorDescriptor.from_tensor(teacher, hidden_block),
            TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]))


def tma_supported(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these 2-D tensors here: Triton has host-side
    descriptors, the GPU is a Hopper or newer (or this is the interpreter), and each tensor
    is non-empty, row-major, with 16-byte aligned base and row stride."""
    if TensorDescriptor is None:
        return False
    if not _INTERPRET and not (torch.cuda.is_available() and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9):
        return False
    return all(
        t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
        and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


def _candidates(tensors, *, forward: bool) -> tuple[list[KernelConfig], list[KernelConfig]]:
    """(configurations to tune, configurations SDPG_TRITON_CONFIG may force) for these
    inputs: TMA ones only where TMA applies, flattened loops only in the forward (the
    backward has one tile per program), the experimental ones tuned only under
    SDPG_TRITON_EXPERIMENTAL=1."""
    tma = tma_supported(*tensors)
    allowed = [c for c in GPU_CONFIGS + EXPERIMENTAL_CONFIGS if (tma or not c.tma) and (forward or not c.flatten)]
    experimental = os.environ.get("SDPG_TRITON_EXPERIMENTAL") == "1"
    return [c for c in allowed if experimental or c in GPU_CONFIGS], allowed


def _check_config(config: KernelConfig, tensors) -> None:
    if config.tma and not tma_supported(*tensors):
        raise ValueError(
            f"Triton configuration {config} uses TMA, which needs a Hopper-or-newer GPU (or the interpreter), "
            "Triton's host tensor descriptors, and non-empty row-major inputs with 16-byte aligned rows; "
            "pick a configuration without 'tma'"
        )


def _choose(key: tuple, launch, candidates: tuple[list[KernelConfig], list[KernelConfig]], summary) -> KernelConfig:
    """The fastest candidate for `key`, timed once with CUDA events (kernels are pure).

    `launch(cfg)` runs the kernel and returns its output; `summary(output)` turns it into
    one tensor that every correct configuration reproduces to rounding. The pick must
    agree with the first configuration that ran (a plain pointer-load one), so a
    configuration the compiler gets wrong is dropped with a warning rather than used.
    `candidates`: `_candidates`' (tuned, forceable) lists."""
    if key in _chosen:
        return _chosen[key]
    tuned, forceable = candidates
    forced = os.environ.get("SDPG_TRITON_CONFIG")
    if forced:
        chosen = next((c for c in forceable if str(c) == forced), None)
        if chosen is None:
            raise ValueError(
                f"SDPG_TRITON_CONFIG={forced!r} is not one of the configurations these inputs allow: "
                f"{[str(c) for c in forceable]}"
            )
    elif _INTERPRET or not torch.cuda.is_available():
        chosen = INTERPRETER_CONFIG
    else:
        chosen = _fastest_agreeing(key, launch, tuned, summary)
    _chosen[key] = chosen
    return chosen


def _fastest_agreeing(key: tuple, launch, candidates: list[KernelConfig], summary) -> KernelConfig:
    timings, errors = {}, {}
    for cfg in candidates:
        try:
            timings[cfg] = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as error:  # e.g. out of shared memory for this tile shape
            errors[str(cfg)] = f"{type(error).__name__}: {error}"[:300]
    if not timings:
        raise RuntimeError(f"no Triton configuration compiled for {key}: {errors}")
    reference_cfg = next(iter(timings))
    reference = summary(launch(reference_cfg))
    rejected = {}
    for cfg in sorted(timings, key=timings.get):  # fastest first; ends at the reference at the latest
        if cfg == reference_cfg:
            break
        error = _relative_error(summary(launch(cfg)), reference)
        if error <= _AGREEMENT_RTOL:
            break
        rejected[str(cfg)] = error
        warnings.warn(
            f"Triton configuration {cfg} disagrees with {reference_cfg} on {key} (relative error "
            f"{error:.2e}); it is not used", RuntimeWarning, stacklevel=3,
        )
    _tuning["/".join(map(str, key))] = {
        "ms": {str(c): t for c, t in timings.items()}, "failed": errors, "disagreed": rejected,
    }
    return cfg


_AGREEMENT_RTOL = 1e-2  # fp32 statistics agree to ~1e-6, bf16 ∂z to one rounding (~4e-3)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the finite entries; equal infinities (an empty
    vocabulary slice) agree, a NaN or a lone infinity is an infinite error."""
    difference = torch.where(actual == expected, 0.0, actual - expected)
    if not torch.isfinite(difference).all():
        return float("inf")
    scale = torch.where(torch.isfinite(expected), expected, 0.0).norm().clamp_min(1e-30)
    return (difference.norm() / scale).item()


def _forward_summary(output) -> torch.Tensor:
    """[5 | 3, N] per token from a forward's per-split maxima and partials: the student's
    log-normaliser, B/S, the target logit (and the teacher's log-normaliser, A/S): what
    every split layout gives the same answer for."""
    maxima, partials = output
    with_teacher = maxima.shape[1] == 2
    local_max, merged = merge_splits(maxima, partials, with_teacher)
    rows = [local_max[0] + merged[0].log(), merged[-2] / merged[0], merged[-1]]
    if with_teacher:
        rows += [local_max[1] + merged[1].log(), merged[2] / merged[0]]
    return torch.stack(rows)


def _grad_summary(dz: torch.Tensor) -> torch.Tensor:
    """About 1024 evenly spaced token rows of a ∂z block, in fp32 (a copy: the buffer is reused)."""
    return dz[:: max(1, dz.shape[0] // 1024)].float()


def tuning_report() -> dict[str, dict]:
    """Per tuned shape: every candidate's time (ms), the ones that failed to compile or run,
    and the ones dropped for disagreeing with the pointer-load reference (benchmarks)."""
    return dict(_tuning)


def chosen_configs() -> dict[str, str]:
    """What the tuner picked so far (for benchmark reports)."""
    return {"/".join(map(str, key)): str(cfg) for key, cfg in _chosen.items()}
