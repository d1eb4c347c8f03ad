"""BatchNorm batch statistics (train mode) from per-tile partial sums, in one launch.

The kernels that produce a BatchNorm input (pointwise_conv, depthwise_conv with ``stats``) write,
per tile of rows and per channel, the sum and the centred sum of squares (M2) of their output.
This kernel merges them into the batch mean and biased variance with Chan's parallel formula

    mean = sum_t S_t / N,    M2 = sum_t ( M2_t + n_t * (S_t / n_t - mean)^2 ),    var = M2 / N

(no E[y^2] - E[y]^2 cancellation), and forms the affine normalisation it implies,
scale = gamma * rsqrt(var + eps), shift = beta - mean * scale, all in fp32. It replaces about
ten small torch ops per BatchNorm (tile counts, the merge, rsqrt, the affine terms).

With ``running`` it also computes what ``nn.BatchNorm2d`` makes of the running statistics:
(1 - momentum) * running + momentum * batch value, with the unbiased variance N / (N - 1) * var,
in fp32 and rounded once to the buffers' dtype, into NEW tensors (the buffers are only read; the
caller copies the results in, so the op that launches this kernel mutates nothing).

``batchnorm_running_statistics`` launches the same kernel without tiles (FROZEN): eval-mode
BatchNorm with gradients normalises with the running statistics, so mean and var are those
buffers converted to fp32 (the forward's copy, which the backward reads), with the same scale
and shift; one launch per BatchNorm instead of about ten torch ops.

Tiles: tile t covers n_t rows; tiles come in groups (one group per image for per-image tilings,
one group for a tiling of all rows), ``tiles_per_group`` tiles of ``block_rows`` rows over
``rows_per_group`` rows, the last tile of a group partial. n_t is computed here from that
geometry, so no count tensor is built on the host.

Layout: tile_sum, tile_m2 (T, C) fp32 contiguous; gamma, beta (C,) any float dtype; outputs
(C,) fp32. Grid: one program per BLOCK_C channels, looping over the T tiles in BLOCK_T chunks,
twice (the mean first, then M2 around it). T is at most a few thousand (B * tiles per image).

Resources (tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations): 64 / 56 registers on
sm_80 / sm_90, no spills. GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import to_storage

BLOCK_T = 32
BLOCK_C = 64


@triton.jit
def batchnorm_statistics_kernel(
    tile_sum_ptr, tile_m2_ptr, gamma_ptr, beta_ptr,
    mean_ptr, var_ptr, scale_ptr, shift_ptr,
    running_mean_ptr, running_var_ptr, new_mean_ptr, new_var_ptr,
    T, C, tiles_per_group, rows_per_group, block_rows, inv_total, eps, momentum, unbias,
    UPDATE_RUNNING: tl.constexpr, FROZEN: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    if FROZEN:  # eval mode: the running statistics (any float dtype), no tiles
        mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < T)[:, None] & mask_c[None, :]
            s = tl.load(tile_sum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            total += tl.sum(s, 0)
        mean = total * inv_total

        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            mask = mask_t[:, None] & mask_c[None, :]
            # rows in tile t: a full tile but the last of its group
            first_row = (offs_t % tiles_per_group) * block_rows
            n_t = tl.minimum(block_rows, rows_per_group - first_row).to(tl.float32)
            n_t = tl.where(mask_t, n_t, 1.0)  # padded tiles: any non-zero count (their sums are 0)
            s = tl.load(tile_sum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            q = tl.load(tile_m2_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            d = s / n_t[:, None] - mean[None, :]
            m2 += tl.sum(tl.where(mask, q + n_t[:, None] * d * d, 0.0), 0)
        var = m2 * inv_total

    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = gamma * tl.rsqrt(var + eps)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + offs_c, beta - mean * scale, mask=mask_c)
    if UPDATE_RUNNING:
        old_mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        old_var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        new_mean = momentum * mean + (1.0 - momentum) * old_mean
        new_var = momentum * (var * unbias) + (1.0 - momentum) * old_var
        tl.store(new_mean_ptr + offs_c, to_storage(new_mean, new_mean_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
                 mask=mask_c)
        tl.store(new_var_ptr + offs_c, to_storage(new_var, new_var_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
                 mask=mask_c)


def batchnorm_statistics(tile_sum: torch.Tensor, tile_m2: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         eps: float, *, block_rows: int, rows_per_group: int, tiles_per_group: int | None = None,
                         out: tuple[torch.Tensor, ...] | None = None,
                         running: tuple[torch.Tensor, torch.Tensor] | None = None, momentum: float = 0.1,
                         new_running: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(mean, biased var, scale, shift), each (C,) fp32, of the rows summarised by the tiles.

    ``tiles_per_group`` defaults to all T tiles (one group); per-image tilings pass the tiles
    per image. ``out``: four preallocated (C,) fp32 tensors (tests poison them).
    ``running``: (running_mean, running_var), (C,) contiguous, one float dtype: then the result
    is (mean, var, scale, shift, new_mean, new_var) with the updated running statistics in that
    dtype (in ``new_running`` if given; the running tensors themselves are not written).
    """
    T, C = tile_sum.shape
    if tile_m2.shape != (T, C) or tile_sum.dtype != torch.float32 or tile_m2.dtype != torch.float32:
        raise ValueError(f"tile sums must be two (T, C) fp32 tensors, got {tuple(tile_sum.shape)} {tile_sum.dtype} "
                         f"and {tuple(tile_m2.shape)} {tile_m2.dtype}")
    if not (tile_sum.is_contiguous() and tile_m2.is_contiguous()):
        raise ValueError("tile sums must be contiguous")
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(f"gamma and beta must be ({C},), got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    tiles_per_group = T if tiles_per_group is None else tiles_per_group
    if T == 0 or T % tiles_per_group or tiles_per_group != triton.cdiv(rows_per_group, block_rows):
        raise ValueError(f"{T} tiles do not form groups of {tiles_per_group} tiles of {block_rows} rows "
                         f"over {rows_per_group} rows")
    total = (T // tiles_per_group) * rows_per_group
    if out is None:
        out = tuple(torch.empty(C, dtype=torch.float32, device=tile_sum.device) for _ in range(4))
    mean, var, scale, shift = out
    if running is not None:
        run_mean, run_var = running
        if not (run_mean.shape == run_var.shape == (C,) and run_mean.dtype == run_var.dtype
                and run_mean.is_floating_point() and run_mean.is_contiguous() and run_var.is_contiguous()):
            raise ValueError(f"running statistics must be two contiguous ({C},) tensors of one float dtype")
        if total < 2:
            raise ValueError("the unbiased variance needs at least 2 values per channel")
        if new_running is None:
            new_running = (torch.empty_like(run_mean), torch.empty_like(run_var))
        new_mean, new_var = new_running
    else:
        run_mean = run_var = new_mean = new_var = mean  # not read (UPDATE_RUNNING off)
    grid = (triton.cdiv(C, BLOCK_C),)
    batchnorm_statistics_kernel[grid](
        tile_sum, tile_m2, gamma.contiguous(), beta.contiguous(), mean, var, scale, shift,
        run_mean, run_var, new_mean, new_var,
        T, C, tiles_per_group, rows_per_group, block_rows, 1.0 / total, float(eps), float(momentum),
        total / max(total - 1, 1), UPDATE_RUNNING=running is not None, FROZEN=False,
        EMULATE_BF16_RTNE=INTERPRET and new_mean.dtype == torch.bfloat16, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
    )
    if running is not None:
        return mean, var, scale, shift, new_mean, new_var
    return mean, var, scale, shift


def batchnorm_running_statistics(running_mean: torch.Tensor, running_var: torch.Tensor, gamma: torch.Tensor,
                                 beta: torch.Tensor, eps: float, *, out: tuple[torch.Tensor, ...] | None = None):
    """(mean, var, scale, shift), each (C,) fp32: the running statistics converted to fp32 (new
    tensors) and the normalisation eval-mode BatchNorm applies with them, scale = gamma *
    rsqrt(var + eps), shift = beta - mean * scale. All (C,) inputs any float dtype, contiguous
    running statistics. ``out``: four preallocated (C,) fp32 tensors."""
    C = running_mean.shape[0] if running_mean.ndim == 1 else -1
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (C,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape ({C},), got {t.dtype} {tuple(t.shape)}")
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError("running statistics must be contiguous")
    if out is None:
        out = tuple(torch.empty(C, dtype=torch.float32, device=running_mean.device) for _ in range(4))
    mean, var, scale, shift = out
    if C > 0:
        batchnorm_statistics_kernel[(triton.cdiv(C, BLOCK_C),)](
            mean, mean, gamma.contiguous(), beta.contiguous(), mean, var, scale, shift,
            running_mean, running_var, mean, var,
            0, C, 1, 1, 1, 1.0, float(eps), 0.0, 1.0, UPDATE_RUNNING=False, FROZEN=True,
            EMULATE_BF16_RTNE=False, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        )
    return mean, var, scale, shift
