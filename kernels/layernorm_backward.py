"""LayerNorm backward over rows of C channels, with the LayerNorm recomputed, in one launch:

    mean, rstd = row statistics of x (fp32)        xhat = (x - mean) * rstd
    xn = xhat * gamma + beta                        (the forward's output, rounded to x's dtype)
    g = dxn * gamma
    dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))  (+ residual_grad)
    per tile of rows: sum of dxn * xhat (-> dgamma), sum of dxn (-> dbeta)

dxn is the gradient of the LayerNorm output (the backward of the matmul that consumed it). Used
by the backward of the window attention's LayerNorm + qkv projection (ops/layernorm_linear.py)
and of the wide feed-forwards (ops/feedforward.py), for each row set. It replaces per row set
``aten.native_layer_norm`` (the recompute: xn, mean, rstd) and ``aten.native_layer_norm_backward``
(and, in the feed-forward, the residual gradient's add): xn is still written, as the weight
gradient's matmul operand; the statistics never leave the program.

Layout: x, dxn, residual_grad, dx, xn are (M, C) contiguous (rows of channels); gamma, beta (C,)
any float dtype or absent; partial sums (T, 2, C) fp32, tile t's row sums (T = cdiv(M, BLOCK_M));
several launches can write disjoint row ranges of one partial buffer (``out_partials``) so one
torch sum over all tiles gives dgamma and dbeta of several row sets. Grid: one program per
BLOCK_M rows with the whole row (BLOCK_C = next power of two >= C) in registers, so the
statistics are an exact two-pass computation (mean, then the centred sum of squares) and the
rows are read once. Numerics: fp32 throughout, one rounding of dx and xn to x's dtype.

Tiles: BLOCK_M * BLOCK_C = 4096 values per operand (BLOCK_M 8 at C = 512), 4 warps (32 values
per thread each; x, dxn and a few fp32 row tiles are live). Registers per thread at C = 64..512,
sm_80 / sm_90, from the ahead-of-time compile (Triton 3.9; `pytest
tests/test_layernorm_backward.py -k aot -s` prints them): fp32 125-168 / 127-167, fp16 and bf16
95-128 / 96-154 (the residual variant at the top of each range); STACK and LOCAL 0 everywhere.
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import to_storage

MAX_CHANNELS = 4096  # wider rows: the op layer keeps aten's LayerNorm backward
POISON_OUTPUTS = False  # tests: dx, xn and new partial buffers start NaN-filled


@triton.jit
def layernorm_backward_kernel(
    x_ptr, dxn_ptr, res_ptr, gamma_ptr, beta_ptr, dx_ptr, xn_ptr, partial_ptr,
    M, C, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_XN: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inv_c = 1.0 / C

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) * inv_c
    centred = tl.where(mask, x - mean[:, None], 0.0)  # padded channels out of the variance
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) * inv_c + eps)
    xhat = centred * rstd[:, None]

    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        gamma = tl.where(col_ok, 1.0, 0.0)
    if WRITE_XN:
        xn = xhat * gamma[None, :]
        if HAS_BETA:
            xn += tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(xn_ptr + offsets, to_storage(xn, xn_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)

    dxn = tl.load(dxn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = dxn * gamma[None, :]  # 0 on padded channels (gamma is 0 there)
    mean_g = tl.sum(g, axis=1) * inv_c
    mean_gx = tl.sum(g * xhat, axis=1) * inv_c
    dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    if HAS_RESIDUAL:
        dx += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, to_storage(dx, dx_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)

    # this tile's column sums for dgamma and dbeta (padded rows are zero: x and dxn loaded as 0)
    partial = partial_ptr + pid.to(tl.int64) * 2 * C + cols
    tl.store(partial, tl.sum(dxn * xhat, axis=0), mask=col_ok)
    tl.store(partial + C, tl.sum(dxn, axis=0), mask=col_ok)


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def layernorm_backward_config(C: int) -> dict:
    block_c = triton.next_power_of_2(max(C, 16))
    return dict(BLOCK_M=max(1, min(64, 4096 // block_c)), BLOCK_C=block_c, num_warps=4 if block_c <= 1024 else 8)


def layernorm_backward_tiles(M: int, C: int) -> int:
    """Rows of the partial-sum buffer one launch over M rows writes."""
    return triton.cdiv(M, layernorm_backward_config(C)["BLOCK_M"])


def layernorm_backward(x: torch.Tensor, dxn: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                       eps: float, *, residual_grad: torch.Tensor | None = None, write_xn: bool = True,
                       out_partials: torch.Tensor | None = None):
    """(dx, xn or None, partials) for rows x (M, C) and the gradient dxn (M, C) of their
    LayerNorm output, both contiguous, fp32/fp16/bf16 (dxn any of those). dx and xn are new (M, C)
    tensors in x's dtype; dx includes ``residual_grad`` (M, C) when given. partials: (T, 2, C)
    fp32 per-tile sums of dxn * xhat and dxn (``out_partials`` to write them into a slice of a
    larger buffer); their sum over T is (dgamma, dbeta)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if x.ndim != 2 or not x.is_contiguous() or x.dtype not in dtypes:
        raise ValueError(f"x must be a contiguous (M, C) fp32/fp16/bf16 tensor, got {x.dtype} {tuple(x.shape)}")
    M, C = x.shape
    if C > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} channels, got {C}")
    for name, t in (("dxn", dxn), ("residual_grad", residual_grad)):
        if t is not None and (tuple(t.shape) != (M, C) or not t.is_contiguous() or t.dtype not in dtypes):
            raise ValueError(f"{name} must be a contiguous ({M}, {C}) float tensor, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and (tuple(t.shape) != (C,) or not t.is_contiguous() or t.dtype not in dtypes):
            raise ValueError(f"{name} must be a contiguous ({C},) float tensor")
    cfg = layernorm_backward_config(C)
    T = triton.cdiv(M, cfg["BLOCK_M"])
    if out_partials is None:
        out_partials = _alloc((T, 2, C), torch.float32, x.device)
    elif tuple(out_partials.shape) != (T, 2, C) or out_partials.dtype != torch.float32 \
            or not out_partials.is_contiguous():
        raise ValueError(f"out_partials must be a contiguous fp32 tensor of shape {(T, 2, C)}")
    dx = _alloc(x.shape, x.dtype, x.device)
    xn = _alloc(x.shape, x.dtype, x.device) if write_xn else None
    if M > 0 and C > 0:
        emulate = INTERPRET and x.dtype == torch.bfloat16
        layernorm_backward_kernel[(T,)](
            x, dxn, residual_grad if residual_grad is not None else x, gamma if gamma is not None else x,
            beta if beta is not None else x, dx, xn if write_xn else dx, out_partials, M, C, float(eps),
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, HAS_RESIDUAL=residual_grad is not None,
            WRITE_XN=write_xn, EMULATE_BF16_RTNE=emulate, **cfg,
        )
    return dx, xn, out_partials
