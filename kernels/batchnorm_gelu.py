"""Train-mode BatchNorm apply + GELU over channels-last pixels, in place, optionally with the
per-tile channel sums of the result (the squeeze-excitation mean's partials):

    out[b, p, c] = gelu(y[b, p, c] * scale[c] + shift[c])     (scale/shift from batch statistics)
    tile_sum[b*T + t, c] = sum over the tile's pixels of out   (WRITE_SUMS)

or, for the block's last BatchNorm (no activation), with the residual added in the same pass:

    out[b, p, c] = y[b, p, c] * scale[c] + shift[c] (+ residual[b, p, c])   (one rounding)

y and out are (B, P, C) contiguous and may be the same tensor (each element is read and written
by the same program). Tiles are BLOCK_P pixels of ONE image x BLOCK_C channels, grid
(B * T, cdiv(C, BLOCK_C)), T = cdiv(P, BLOCK_P) per image, as in kernels/depthwise_conv.py.

Used only in train mode, where BatchNorm needs the batch statistics of its whole input before it
can normalise: the producing kernel (1x1 conv or depthwise conv) writes the pre-BN tensor and its
per-tile statistics, the host merges them, and this pass normalises + activates the tensor in
place (after BN1: the depthwise conv's input; after BN2: the project conv's input, together with
the SE sums). Eval mode never runs it (BatchNorm is folded into the convs there).

Blocks: 64 pixels x 32 channels, 4 warps (16 values per thread).
Resources: registers per thread, sm_80 / sm_90, from the ahead-of-time compile in
tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations (every configuration the default
MaxViT-T uses, eval and train; `pytest tests/test_mbconv.py -k aot -s` prints them). Triton 3.9
toolchain, divisibility-by-16 hints as the runtime specialises them. All LOCAL 0 and STACK 0
(no spills).
    plain w4 s3: fp16 47/48, bf16 48/47, fp32 54/56
    sums w4 s3: fp16 54/48, bf16 55/48, fp32 56/57
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import gelu, to_storage


@triton.jit
def batchnorm_gelu_kernel(
    y_ptr, scale_ptr, shift_ptr, out_ptr, tile_sum_ptr,
    residual_ptr, stride_rb, stride_rp, stride_rc,
    P, C, tiles_per_image,
    APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WRITE_SUMS: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_tile = tl.program_id(0)  # image * tiles_per_image + tile
    pid_c = tl.program_id(1)
    image = pid_tile // tiles_per_image
    tile = pid_tile % tiles_per_image

    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    mask = mask_p[:, None] & mask_c[None, :]
    offsets = ((image.to(tl.int64) * P + offs_p) * C)[:, None] + offs_c[None, :]

    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    a = y * scale[None, :] + shift[None, :]
    if APPLY_GELU:
        a = gelu(a)
    if HAS_RESIDUAL:  # (B, P, C) with any strides: the block input's pixel view
        r_offsets = (image.to(tl.int64) * stride_rb + offs_p.to(tl.int64) * stride_rp)[:, None] \
            + offs_c[None, :] * stride_rc
        a += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, to_storage(a, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)
    if WRITE_SUMS:
        tl.store(tile_sum_ptr + pid_tile * C + offs_c, tl.sum(tl.where(mask, a, 0.0), axis=0), mask=mask_c)


def batchnorm_gelu_config(C: int) -> dict:
    return dict(BLOCK_P=64, BLOCK_C=max(16, min(32, triton.next_power_of_2(C))), num_warps=4)


def batchnorm_gelu_tiles_per_image(P: int) -> int:
    return triton.cdiv(P, batchnorm_gelu_config(1)["BLOCK_P"])


def batchnorm_gelu(
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    sums: bool = False,
    tile_sum: torch.Tensor | None = None,
    activation: bool = True,
    residual: torch.Tensor | None = None,
):
    """y: (B, P, C) contiguous fp16/bf16/fp32; scale, shift: fp32 (C,) contiguous. ``out`` may be
    ``y`` itself (in place) or None (a new tensor). Returns out, or (out, tile_sum) with fp32
    (B * T, C) per-tile sums of out when ``sums`` (T = ``batchnorm_gelu_tiles_per_image(P)``).
    ``activation=False``: no GELU; ``residual`` (B, P, C), any strides and float dtype, is added
    before the single rounding to y's dtype."""
    if y.ndim != 3 or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous (B, P, C) tensor, got shape {tuple(y.shape)}")
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"y must be fp16, bf16 or fp32, got {y.dtype}")
    B, P, C = y.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype != torch.float32 or tuple(t.shape) != (C,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {(C,)}")
    if out is None:
        out = torch.empty_like(y)
    elif tuple(out.shape) != (B, P, C) or not out.is_contiguous() or out.dtype != y.dtype:
        raise ValueError(f"out must be a contiguous {y.dtype} tensor of shape {(B, P, C)}")
    if residual is not None and tuple(residual.shape) != (B, P, C):
        raise ValueError(f"residual must have shape {(B, P, C)}, got {tuple(residual.shape)}")
    cfg = batchnorm_gelu_config(C)
    T = triton.cdiv(P, cfg["BLOCK_P"])
    if sums:
        if tile_sum is None:
            tile_sum = torch.empty((B * T, C), device=y.device, dtype=torch.float32)
        elif tuple(tile_sum.shape) != (B * T, C) or tile_sum.dtype != torch.float32 or not tile_sum.is_contiguous():
            raise ValueError(f"tile_sum must be a contiguous fp32 tensor of shape {(B * T, C)}")
    if y.numel() > 0:
        grid = (B * T, triton.cdiv(C, cfg["BLOCK_C"]))
        res = residual if residual is not None else y
        batchnorm_gelu_kernel[grid](
            y, scale, shift, out, tile_sum if sums else scale, res, *res.stride(), P, C, T,
            APPLY_GELU=activation, HAS_RESIDUAL=residual is not None,
            WRITE_SUMS=sums, EMULATE_BF16_RTNE=INTERPRET and y.dtype == torch.bfloat16, **cfg,
        )
    return (out, tile_sum) if sums else out
