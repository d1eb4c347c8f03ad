"""LayerNorm + Linear over two sets of rows in one launch:

    out = LayerNorm(x) @ W^T (+ b)                           x: (..., C) -> (..., N)
    extra_out = LayerNorm(extra) @ W[EXTRA_COL0:]^T (+ b[EXTRA_COL0:])   extra: (..., C) -> (..., N - EXTRA_COL0)

with one LayerNorm (same affine parameters and eps) and one weight. The window attention uses it
for the q/k/v projection of both row sets of a MaxViT step: the (B, H, W, C) token map and the
register rows ((1, r, C) shared by every window in the block step, (B, r, C) per image in the grid
step). Before, that was four launches per step (LayerNorm and cuBLAS GEMM, for each row set).

Kernel
------
``layernorm_linear_kernel``: one program computes a (BLOCK_M, BLOCK_N) output tile. The 1-D grid
is the x segment's tiles followed by the extra segment's (the program id picks the segment; row
pointers, strides and the output column range are selected per program, so there is one copy of
the main loop). Inside a segment the column tile varies fastest, so the programs that share a row
tile run together and its second read hits L2. The LayerNorm is the matmul's prologue
(``feedforward.layernorm_matmul``, shared with ``ff_up_kernel``): the row statistics in fp32 from
one pass over the row tile (chunks merged with Chan's formula, no E[x^2] - mean^2 cancellation),
then the K-loop normalises each x chunk as it loads it and feeds it to the dot, rounded to the
input dtype as the reference's LayerNorm output is. fp32 accumulation, + bias, rounded to the
input dtype once. The normalised rows are never written.

Grid step: the register rows only need k and v (their attention outputs are dropped), so the
caller passes EXTRA_COL0 = C and the extra output is (B, r, 2C), the layout the attention kernel
takes without register queries (reg_q_off unused, reg_k_off = 0, reg_v_off = C). Computing the
full 3C for them would cost only r*B extra rows, but it would need a 3C register layout without
queries in the attention launcher and a zero q part in its register gradient: keeping q out is
the simpler contract. Block step: EXTRA_COL0 = 0 (q, k and v of the shared rows).

Layout: x and extra are (..., C) with any strides; each one's leading dims are coalesced to at
most two (one stride each), which covers the channels-last (B, H, W, C) view of an NCHW or NHWC
map and any (Breg, r, C) register tensor; anything else is copied contiguous first (never the
case in the model). Outputs are new contiguous (..., N) tensors (channels contiguous, as the
attention kernel requires). The weight is (N, C) contiguous (nn.Linear layout).

Numerics: fp32 statistics and accumulation. fp16/bf16: tensor-core dots (HMMA on sm_80, HGMMA on
sm_90) on the normalised tile rounded to the input dtype. fp32: exact "ieee" dots (FMA units), so
fp32 meets 1e-5. Under the Triton interpreter bf16 dots are wrong (triton issue 11584) and its
fp32 -> bf16 conversion truncates, so there (only) bf16 dot operands are upcast to fp32
(FP32_DOT) and bf16 values are rounded to nearest even on the bits first (ROUND_BF16), as in
kernels/feedforward.py.

Why not inside the attention kernel: see the "Fusion decision" in kernels/window_attention.py
(the register rows would be projected again in every window, and a C x 3C weight does not fit in
one program's shared memory at C = 512).

Tiles (resource report, no GPU in this session): ``python -m pytest tests/test_layernorm_linear.py
-k compile -s`` compiles every MaxViT-T configuration ahead of time (maxvit_fast.aot, Triton 3.9,
GPUTarget sm_80 / sm_90, divisibility-16 hints on pointers and leading strides, channel strides
constexpr 1 as Triton specialises them). Registers per thread, block step / grid step (grid:
EXTRA_COL0 = C; the block-step entries are compiled with the training variant that zeroes the
residual-gradient carrier, WRITE_CARRIER, the grid-step ones without it); STACK and LOCAL are 0
(no spills) in every entry, HMMA on sm_80, HGMMA on sm_90, 128-bit loads of x (LDG.E.128); bf16
within 6 registers of fp16:

    C     N      tile M x N x K, warps, stages     sm_80      sm_90 (fp16)
    64    192    64 x  64 x 64, 4 warps, 3          78 / 80    75 / 74
    128   384    64 x 128 x 64, 8 warps, 3         100 / 102  116 / 115
    256   768    64 x 128 x 64, 8 warps, 3          96 / 98   114 / 114
    512   1536   64 x 128 x 64, 8 warps, 3          96 / 98   128 / 117

Survey behind the choice (C = 64 / 512, fp16, block step, sm_80 / sm_90 registers, no spills in
any): 64x128x64 at 4 warps 110/106 and 168/160; 64x128x64 at 8 warps 77/74 and 96/112; 64x64x64
at 4 warps 80/75 and 128/124; 128x128x64 at 8 warps 128/106 and 170/161. The 8-warp 64x128 tile
is the feed-forward up-projection's (ff_up_kernel, the same main loop); C = 64 takes 64-wide
column tiles because N = 192 is three of them (a 128-wide tile would leave a third of the second
tile masked). The K-loop of C = 64 is one chunk; for C >= 128 the weight chunks are prefetched
with cp.async (LDGSTS) over 3 stages. fp32 (64 x 64 x 16, 4 warps, 2 stages): 128 registers on
both architectures at every C, no spills. Not tuned on a GPU.

GPU speed: not measured (no GPU in this session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .feedforward import _coalesce_leading, _token_offsets, _two_leading, fp32_dot, layernorm_matmul
from .numerics import to_storage

# Tests set this to True so every output the kernel should write completely starts as NaN.
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def layernorm_linear_kernel(
    x_ptr, extra_ptr, out_ptr, extra_out_ptr, carrier_ptr,
    ln_w_ptr, ln_b_ptr, w_ptr, b_ptr,
    M, D1, stride_x0, stride_x1, stride_xc,  # x rows: flat row = i0 * D1 + i1
    M_extra, D1_extra, stride_e0, stride_e1, stride_ec,  # extra rows, the same way
    x_programs, eps,
    C: tl.constexpr, N: tl.constexpr, EXTRA_COL0: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr, WRITE_CARRIER: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of out (programs [0, x_programs)) or of extra_out (the rest).
    Both outputs are contiguous (rows, columns) in the input dtype. WRITE_CARRIER: program 0 also
    zeroes the one element of the op's residual-gradient carrier (ops/layernorm_linear.py; its
    value is never read, but an op's outputs must be defined)."""
    X_COL_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    EXTRA_COL_TILES: tl.constexpr = (N - EXTRA_COL0 + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    if WRITE_CARRIER:
        if pid == 0:
            tl.store(carrier_ptr, tl.zeros((), carrier_ptr.dtype.element_ty))
    is_extra = pid >= x_programs
    local = tl.where(is_extra, pid - x_programs, pid)
    pid_m = local // tl.where(is_extra, EXTRA_COL_TILES, X_COL_TILES)
    pid_n = local % tl.where(is_extra, EXTRA_COL_TILES, X_COL_TILES)

    # This program's segment: source rows, output, and its first weight row (column of W^T).
    src = tl.where(is_extra, extra_ptr, x_ptr)
    dst = tl.where(is_extra, extra_out_ptr, out_ptr)
    rows_in_segment = tl.where(is_extra, M_extra, M)
    d1 = tl.where(is_extra, D1_extra, D1)
    stride0 = tl.where(is_extra, stride_e0, stride_x0)
    stride1 = tl.where(is_extra, stride_e1, stride_x1)
    stride_c = tl.where(is_extra, stride_ec, stride_xc)
    col0 = tl.where(is_extra, EXTRA_COL0, 0)
    out_cols = tl.where(is_extra, N - EXTRA_COL0, N)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < rows_in_segment
    col_ok = cols < out_cols
    x_rows = src + _token_offsets(rows, d1, stride0, stride1)
    w_rows = w_ptr + (col0 + cols) * C
    acc = layernorm_matmul(x_rows, row_ok, stride_c, ln_w_ptr, ln_b_ptr, eps, w_rows, col_ok,
                           C, BLOCK_K, HAS_LN_WEIGHT, HAS_LN_BIAS, FP32_DOT, ROUND_BF16)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = dst + rows.to(tl.int64)[:, None] * out_cols + cols[None, :]
    tl.store(out_ptrs, to_storage(acc, out_ptr.dtype.element_ty, ROUND_BF16), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

# Tiles for fp16/bf16 by output width N (see the resource report in the header): 64-wide column
# tiles where N is not a multiple of 128 (C = 64: N = 192, three full tiles instead of one and a
# half), 128 otherwise. fp32 (exact "ieee" dots on FMA units, both operands in registers) takes
# the small tile of the feed-forward's fp32 up-projection.
TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
TILES_N64 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
TILES_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)


def tile_config(N: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(TILES_FP32)
    return dict(TILES if N % 128 == 0 else TILES_N64)


MAX_ROWS = 2**31 - 1024  # rows and row-tile offsets are int32 in the kernel


def unsupported_reason(x: torch.Tensor, extra: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these rows (None when it can)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"layernorm_linear supports float16, bfloat16 and float32, got {x.dtype}"
    for name, t in (("x", x), ("extra rows", extra)):
        if t is not None and t.numel() // max(t.shape[-1], 1) > MAX_ROWS:
            return f"{name}: more than {MAX_ROWS} rows in one launch"
    return None


def _alloc(shape, like: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _rows_layout(t: torch.Tensor):
    """(tensor, M, D1, stride0, stride1, stride_c) of a (..., C) row tensor whose leading dims
    coalesce to at most two; otherwise of a contiguous copy."""
    sizes, (strides,) = _coalesce_leading(t.shape[:-1], t.stride()[:-1])
    if len(sizes) > 2:
        t = t.contiguous()
        sizes, (strides,) = _coalesce_leading(t.shape[:-1], t.stride()[:-1])
    d1, stride0, stride1 = _two_leading(sizes, strides)
    return t, t.numel() // t.shape[-1], d1, stride0, stride1, t.stride(-1)


def _check_output(out, shape, like, name):
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {tuple(shape)} {like.dtype} tensor on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def _check_arguments(x, ln_weight, ln_bias, weight, bias, extra, extra_first_col):
    if x.ndim < 1:
        raise ValueError("x must have a channel dimension")
    C = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != C:
        raise ValueError(f"weight must be (N, {C}), got {tuple(weight.shape)}")
    N = weight.shape[0]
    expected = {"ln_weight": (ln_weight, (C,)), "ln_bias": (ln_bias, (C,)), "bias": (bias, (N,)),
                "weight": (weight, (N, C))}
    if extra is not None:
        expected["extra"] = (extra, (*extra.shape[:-1], C))
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} for {C} channels")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not 0 <= extra_first_col < N:
        raise ValueError(f"extra_first_col must be in [0, {N}), got {extra_first_col}")
    return C, N


def layernorm_linear(
    x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    extra: torch.Tensor | None = None, extra_first_col: int = 0,
    out: torch.Tensor | None = None, extra_out: torch.Tensor | None = None,
    carrier: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LayerNorm(x) @ weight^T + bias`` per row of x (..., C) and, in the same launch, per row of
    ``extra`` (..., C) with the output columns ``extra_first_col:`` only.

    Returns (out (..., N), extra_out (..., N - extra_first_col) or None), new contiguous tensors in
    x's dtype, or the given ``out`` / ``extra_out`` (contiguous, of those shapes). ``ln_weight``,
    ``ln_bias`` and ``bias`` may be None (no affine scale, shift, bias). ``carrier``: a tensor
    whose first element the launch sets to 0 (the op's residual-gradient carrier)."""
    C, N = _check_arguments(x, ln_weight, ln_bias, weight, bias, extra, extra_first_col)
    out_shape = (*x.shape[:-1], N)
    if out is None:
        out = _alloc(out_shape, x)
    _check_output(out, out_shape, x, "out")
    if extra is not None:
        extra_shape = (*extra.shape[:-1], N - extra_first_col)
        if extra_out is None:
            extra_out = _alloc(extra_shape, x)
        _check_output(extra_out, extra_shape, x, "extra_out")
    reason = unsupported_reason(x, extra)
    if reason is not None:
        raise ValueError(reason)

    cfg = tile_config(N, x.dtype)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    kx, M, D1, sx0, sx1, sxc = _rows_layout(x)
    if extra is not None:
        ke, M_e, D1_e, se0, se1, sec = _rows_layout(extra)
    else:  # no extra rows: no program reads these
        ke, M_e, D1_e, se0, se1, sec = kx, 0, 1, 0, 0, sxc
    extra_out_arg = extra_out if extra is not None else out
    x_programs = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    extra_programs = triton.cdiv(M_e, cfg["BLOCK_M"]) * triton.cdiv(N - extra_first_col, cfg["BLOCK_N"])
    if x_programs + extra_programs == 0:
        if carrier is not None:
            carrier.zero_()
        return out, extra_out
    # the kernel indexes the weight as (N, C) row-major and the vectors with stride 1 (no-ops for
    # module parameters)
    weight = weight.contiguous()
    ln_weight, ln_bias, bias = (None if t is None else t.contiguous() for t in (ln_weight, ln_bias, bias))
    layernorm_linear_kernel[(x_programs + extra_programs,)](
        kx, ke, out, extra_out_arg, carrier if carrier is not None else out,
        ln_weight, ln_bias, weight, bias,
        M, D1, sx0, sx1, sxc,
        M_e, D1_e, se0, se1, sec,
        x_programs, float(eps),
        C=C, N=N, EXTRA_COL0=extra_first_col, **cfg,
        HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=bias is not None,
        FP32_DOT=fp32_dot(x.dtype), ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16,
        WRITE_CARRIER=carrier is not None, num_warps=nw, num_stages=ns,
    )
    return out, extra_out
