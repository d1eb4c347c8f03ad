"""Depthwise 3x3 convolution (padding 1, stride 1 or 2) on channels-last pixels, with bias, GELU
and per-tile channel sums for the squeeze-excitation mean (or BatchNorm batch statistics).

    y[b, p, c] = [gelu]( sum_{kh,kw} w[kh*3+kw, c] * x[b, hi, wi, c] + bias[c] )
    tile_sum[b*T + t, c] = sum over the tile's pixels of y          (always)
    tile_m2 [b*T + t, c] = sum of (y - tile mean)^2 over the tile   (WRITE_M2, train)

Layout: x is (B, H, W, C) contiguous, y is (B, Ho, Wo, C) contiguous. w: eval passes the
folded fp32 (9, C) contiguous copy (tap-major, so one tap's weights for a channel block are one
contiguous load); train passes the module's (C, 1, 3, 3) weight and bias as they are (any float
dtype, converted to fp32 in the kernel), so a training step copies no weights: the channel
block's [BLOCK_C, 16] weight tile (taps 9..15 masked) is loaded once and split into its taps.
Bias (C,), any float dtype. Grid: (B * T, cdiv(C, BLOCK_C)), T = cdiv(Ho*Wo, BLOCK_P) (DRAM is read in 32-byte
sectors, so the two 64-byte halves of a bf16 pixel row read by two channel tiles cost no extra
traffic, whatever their launch order); a tile is BLOCK_P
consecutive output pixels (row-major) of ONE image times BLOCK_C channels, channels contiguous,
so the per-tile sums are per-(image, channel) partial sums.

Decisions
- SE pooling: deterministic per-tile partial sums written to a (B*T, C) fp32 buffer and reduced
  by the SE kernel (kernels/squeeze_excitation.py), not atomics: bitwise reproducible, no
  zero-init pass, and the buffer is small (B=64, 56x56 output, C=256, T=98: 64*98*256*4 B =
  6.4 MB, against 103 MB for the bf16 hidden tensor it summarises).
- In eval mode BatchNorm is folded into w and bias on the host (fp32; the kernel computes in
  fp32), so the kernel is conv + bias + GELU. In train mode the input is already
  gelu(BN1(y1)) (kernels/batchnorm_gelu.py) and the kernel writes conv + bias and its statistics.
  (Applying BN1 + GELU to each of the 9 taps on load was tried: 9x the erf work and 213-255
  registers with stack spills on sm_80 at 16-32 values per thread; the separate in-place
  BN+GELU pass costs one read + write of the hidden tensor instead. Speed of either: not
  measured.)
- Each tap is a masked [BLOCK_P, BLOCK_C] load; the 9 taps of neighbouring pixels overlap and are
  served from L1/L2, so DRAM traffic stays near the compulsory read of x and write of y.
- Blocks: BLOCK_P = 32 pixels x BLOCK_C = 32 channels, 4 warps (8 values per thread). The
  compiler issues the 9 tap loads up front, so registers grow with values per thread (sm_80,
  bf16, stride 2, eval with GELU): 64x64 tiles 214 registers, 32x64 166, 64x32 168, 32x32 88,
  all without spills. 88 registers allow 5 CTAs (20 warps) per SM to hide load latency, where
  214 allows 2 (8 warps). GPU speed (and the fraction of copy bandwidth): not measured.

Resources: registers per thread, sm_80 / sm_90, from the ahead-of-time compile in
tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations (every configuration the default
MaxViT-T uses, eval and train; `pytest tests/test_mbconv.py -k aot -s` prints them). Triton 3.9
toolchain, divisibility-by-16 hints as the runtime specialises them. All LOCAL 0 and STACK 0
(no spills). In eval mode the model uses kernels/expand_depthwise_conv.py (expand conv fused
in) for its stride-2 blocks and this kernel (OUT_GELU, W_TAP_MAJOR) for the stride-1 blocks:
80/86 fp16, 72/86 bf16, 92/90 fp32. Train reads the module's weight (taps contiguous; static
SASS on sm_90 fp16: 14 global loads, 34 shared loads, 13 barriers per thread; loading each tap
as a [BLOCK_C] vector instead took 82 global loads, and with one 64-bit pointer per channel
spilled, 80 registers + 72 B stack; the fp32 (9, C) copy it replaces: 29 global loads).
Before (the fp32 (9, C) copy): fp16 44/90, bf16 48/90, fp32 54/118 at stride 1.
    stride 1 train (m2) 32x32 w4 s3: fp16 48/68, bf16 50/68, fp32 56/96
    stride 2 train (m2) 32x32 w4 s3: fp16 48/68, bf16 48/66, fp32 56/92
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import gelu, to_storage


@triton.jit
def output_tile(tile, pid_c, num_pixels, Wo, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile of BLOCK_P consecutive output pixels (row-major, one image) x BLOCK_C channels:
    pixel and channel offsets, their masks, and each pixel's output row and column."""
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_p, offs_c, offs_p < num_pixels, offs_c < C, offs_p // Wo, offs_p % Wo


@triton.jit
def split_taps(w, BLOCK_C: tl.constexpr, NUM_TAPS: tl.constexpr):
    """[BLOCK_C, NUM_TAPS] -> the even and the odd taps, two [BLOCK_C, NUM_TAPS // 2]."""
    return tl.split(tl.reshape(w, (BLOCK_C, NUM_TAPS // 2, 2)))


@triton.jit
def depthwise_conv3x3_kernel(
    x_ptr, w_ptr, bias_ptr,
    out_ptr, tile_sum_ptr, tile_m2_ptr,
    H, W, Ho, Wo, C, tiles_per_image, inv_last_tile_pixels,
    stride_wt, stride_wc,
    STRIDE: tl.constexpr, OUT_GELU: tl.constexpr, WRITE_M2: tl.constexpr, W_TAP_MAJOR: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_tile = tl.program_id(0)  # image * tiles_per_image + tile
    pid_c = tl.program_id(1)
    image = pid_tile // tiles_per_image
    tile = pid_tile % tiles_per_image

    num_pixels = Ho * Wo
    offs_p, offs_c, mask_p, mask_c, ho, wo = output_tile(tile, pid_c, num_pixels, Wo, C, BLOCK_P, BLOCK_C)

    x_image = x_ptr + image.to(tl.int64) * H * W * C
    # 1 / pixels in this tile without a division (the host passes it for the partial last tile)
    inv_count = tl.where(tile == tiles_per_image - 1, inv_last_tile_pixels, 1.0 / BLOCK_P)

    # Input columns of each output pixel: w_left (-1 at the left edge), w_left + 1 (always inside,
    # as 0 <= wo * STRIDE <= W - 1), w_left + 2 (W at the right edge when STRIDE == 1 or W is even).
    w_left = wo * STRIDE - 1
    left_ok = w_left >= 0
    right_ok = w_left + 2 < W
    channel_ok = mask_c[None, :]
    # weight w[tap, c] at w_ptr + tap * stride_wt + c * stride_wc, any float dtype, fp32 math.
    # W_TAP_MAJOR (eval: the folded fp32 (9, C) copy, channels contiguous): each tap's weights
    # are one vector load per thread in the tap loop (replicated over the tile's pixel rows).
    if not W_TAP_MAJOR:
        # train: the module's (C, 1, 3, 3) weight as it is, taps contiguous per channel. Loading
        # each tap as a [BLOCK_C] vector would be 9 scalar loads per channel per thread (82
        # loads per thread on sm_90 fp16 instead of 14); instead one [BLOCK_C, 16] tile (taps
        # 9..15 masked), then the taps are separated with tl.split in registers / shared memory.
        taps = tl.arange(0, 16)
        w_taps = tl.load(w_ptr + (offs_c[:, None] * stride_wc + taps[None, :] * stride_wt),
                         mask=mask_c[:, None] & (taps < 9)[None, :], other=0.0)
        even, odd = split_taps(w_taps, BLOCK_C, 16)        # taps 0, 2, .., 14 | 1, 3, .., 15
        t0_mod4, t2_mod4 = split_taps(even, BLOCK_C, 8)    # 0, 4, 8, 12 | 2, 6, 10, 14
        t1_mod4, t3_mod4 = split_taps(odd, BLOCK_C, 8)     # 1, 5, 9, 13 | 3, 7, 11, 15
        t0_8, t4_12 = split_taps(t0_mod4, BLOCK_C, 4)
        t2_10, t6_14 = split_taps(t2_mod4, BLOCK_C, 4)
        t1_9, t5_13 = split_taps(t1_mod4, BLOCK_C, 4)
        t3_11, t7_15 = split_taps(t3_mod4, BLOCK_C, 4)
        w0, w8 = tl.split(t0_8)
        w4, _ = tl.split(t4_12)
        w2, _ = tl.split(t2_10)
        w6, _ = tl.split(t6_14)
        w1, _ = tl.split(t1_9)
        w5, _ = tl.split(t5_13)
        w3, _ = tl.split(t3_11)
        w7, _ = tl.split(t7_15)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(3):
        hi = ho * STRIDE - 1 + kh
        row_ok = mask_p & (hi >= 0) & (hi < H)
        left_ptrs = x_image + ((hi * W + w_left) * C)[:, None] + offs_c[None, :]
        if W_TAP_MAJOR:
            w_row = w_ptr + kh * 3 * stride_wt + offs_c * stride_wc
            w_left_tap = tl.load(w_row, mask=mask_c, other=0.0)
            w_mid_tap = tl.load(w_row + stride_wt, mask=mask_c, other=0.0)
            w_right_tap = tl.load(w_row + 2 * stride_wt, mask=mask_c, other=0.0)
        elif kh == 0:
            w_left_tap, w_mid_tap, w_right_tap = w0, w1, w2
        elif kh == 1:
            w_left_tap, w_mid_tap, w_right_tap = w3, w4, w5
        else:
            w_left_tap, w_mid_tap, w_right_tap = w6, w7, w8
        v = tl.load(left_ptrs, mask=(row_ok & left_ok)[:, None] & channel_ok, other=0.0)
        acc += v.to(tl.float32) * w_left_tap.to(tl.float32)[None, :]
        v = tl.load(left_ptrs + C, mask=row_ok[:, None] & channel_ok, other=0.0)
        acc += v.to(tl.float32) * w_mid_tap.to(tl.float32)[None, :]
        v = tl.load(left_ptrs + 2 * C, mask=(row_ok & right_ok)[:, None] & channel_ok, other=0.0)
        acc += v.to(tl.float32) * w_right_tap.to(tl.float32)[None, :]

    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = acc + bias[None, :]
    if OUT_GELU:
        y = gelu(y)
    mask_out = mask_p[:, None] & mask_c[None, :]
    out_rows = (image.to(tl.int64) * num_pixels + offs_p) * C
    y_stored = to_storage(y, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
    tl.store(out_ptr + out_rows[:, None] + offs_c[None, :], y_stored, mask=mask_out)

    y_valid = tl.where(mask_p[:, None], y, 0.0)
    tile_sum = tl.sum(y_valid, axis=0)
    tl.store(tile_sum_ptr + pid_tile * C + offs_c, tile_sum, mask=mask_c)
    if WRITE_M2:
        centred = tl.where(mask_p[:, None], y - (tile_sum * inv_count)[None, :], 0.0)
        tl.store(tile_m2_ptr + pid_tile * C + offs_c, tl.sum(centred * centred, axis=0), mask=mask_c)


def depthwise_conv_config(C: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_P=32, BLOCK_C=max(16, min(32, triton.next_power_of_2(C))), num_warps=4)


def depthwise_output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # kernel 3, padding 1


def depthwise_tiles_per_image(Ho: int, Wo: int) -> int:
    return triton.cdiv(Ho * Wo, depthwise_conv_config(1, torch.float32)["BLOCK_P"])


def depthwise_conv3x3(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    *,
    out_gelu: bool = True,
    m2: bool = False,
    out: torch.Tensor | None = None,
    tile_sum: torch.Tensor | None = None,
    tile_m2: torch.Tensor | None = None,
):
    """Launch the depthwise conv. x: (B, H, W, C) contiguous fp16/bf16/fp32.
    w: the 3x3 taps in fp32, fp16 or bf16 (converted to fp32 in the kernel), either tap-major
    (9, C) with any strides (tap kh*3+kw; eval: the folded fp32 copy), or the conv weight as the
    module holds it, (C, 1, 3, 3) with any strides (train: ``dw.weight``, no copy).
    bias: (C,) contiguous, fp32, fp16 or bf16 (train: ``dw.bias`` as it is).

    Returns (out, tile_sum, tile_m2): out (B, Ho, Wo, C) contiguous in x's dtype; tile_sum and
    tile_m2 (tile_m2 only when ``m2``, else None) fp32 (B * T, C), T = tiles per image
    (``depthwise_tiles_per_image``); tile t of image b covers output pixels
    [t*BLOCK_P, (t+1)*BLOCK_P) of that image in row-major order.
    """
    if x.ndim != 4 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (B, H, W, C) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    B, H, W, C = x.shape
    weight_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if tuple(w.shape) == (C, 1, 3, 3):
        stride_wt, stride_wc = w.stride(3), w.stride(0)
        if w.stride(2) != 3 * w.stride(3):  # tap kh*3+kw at kh*stride(2) + kw*stride(3)
            raise ValueError(f"w (C, 1, 3, 3) needs its 3x3 taps at one stride (stride(2) == 3 * stride(3)), "
                             f"got strides {w.stride()}")
    elif tuple(w.shape) == (9, C):
        stride_wt, stride_wc = w.stride()
    else:
        raise ValueError(f"w must be (9, C) tap-major or the conv weight (C, 1, 3, 3) with C = {C}, "
                         f"got {tuple(w.shape)}")
    if w.dtype not in weight_dtypes:
        raise TypeError(f"w must be fp32, fp16 or bf16, got {w.dtype}")
    if tuple(bias.shape) != (C,) or not bias.is_contiguous() or bias.dtype not in weight_dtypes:
        raise ValueError(f"bias must be a contiguous fp32/fp16/bf16 tensor of shape {(C,)}")
    Ho, Wo = depthwise_output_size(H, stride), depthwise_output_size(W, stride)
    cfg = depthwise_conv_config(C, x.dtype)
    T = triton.cdiv(Ho * Wo, cfg["BLOCK_P"])
    if out is None:
        out = torch.empty((B, Ho, Wo, C), device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != (B, Ho, Wo, C) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(B, Ho, Wo, C)}")
    stat_shape = (B * T, C)
    if tile_sum is None:
        tile_sum = torch.empty(stat_shape, device=x.device, dtype=torch.float32)
    if m2 and tile_m2 is None:
        tile_m2 = torch.empty(stat_shape, device=x.device, dtype=torch.float32)
    for name, t in (("tile_sum", tile_sum), ("tile_m2", tile_m2 if m2 else None)):
        if t is not None and (tuple(t.shape) != stat_shape or not t.is_contiguous() or t.dtype != torch.float32):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {stat_shape}")
    if B * Ho * Wo * C == 0:
        return out, tile_sum, (tile_m2 if m2 else None)
    grid = (B * T, triton.cdiv(C, cfg["BLOCK_C"]))
    depthwise_conv3x3_kernel[grid](
        x, w, bias, out, tile_sum, tile_m2 if m2 else tile_sum,
        H, W, Ho, Wo, C, T, 1.0 / (Ho * Wo - (T - 1) * cfg["BLOCK_P"]),
        stride_wt, stride_wc,
        STRIDE=stride, OUT_GELU=out_gelu, WRITE_M2=m2, W_TAP_MAJOR=stride_wc == 1,
        EMULATE_BF16_RTNE=INTERPRET and x.dtype == torch.bfloat16,
        **cfg,
    )
    return out, tile_sum, (tile_m2 if m2 else None)
