"""MBConv expand 1x1 conv + BN1 + GELU fused into the 3x3 depthwise conv + BN2 + GELU (eval mode,
BatchNorms folded), with per-tile channel sums for the squeeze-excitation mean. The 4x-wide
expand output h1 is never written to memory.

    h1[b, i, j, c] = round( gelu( sum_k x[b, i, j, k] * w1_t[k, c] * scale1[c] + shift1[c] ) )
                     (0 where (i, j) lies in the depthwise conv's zero padding)
    y[b, p, c]     = gelu( sum_{kh,kw} dw_w[kh*3+kw, c] * h1[b, ho*S-1+kh, wo*S-1+kw, c] + dw_b[c] )
    tile_sum[b*T + t, c] = sum over the tile's output pixels of y

``round`` is the rounding to the storage dtype (fp16/bf16; none for fp32): the unfused path
stores h1 in that dtype, so rounding it here makes this kernel compute the same function as
kernels/pointwise_conv.py (expand, out_gelu) followed by kernels/depthwise_conv.py (eval). The
padding is applied AFTER the GELU, like the reference (the depthwise conv pads h1 with zeros):
a padded tap contributes 0, not gelu(shift1).

Layout: x is (B, H, W, C_in) with any strides (the NCHW input's ``permute(0, 2, 3, 1)`` view is
read in place, no copy; with C_in contiguous, channels-last, the loads vectorise along C_in);
w1_t is the expand weight transposed to (C_in, hidden), contiguous, in x's dtype; scale1, shift1
fp32 (hidden,) are BN1 folded with the conv bias; dw_w fp32 (9, hidden) tap-major and dw_b fp32
(hidden,) are the depthwise weight and bias with BN2 folded in. y is (B, Ho, Wo, hidden)
contiguous in x's dtype; tile_sum fp32 (B*T, hidden), T = cdiv(Ho*Wo, BLOCK_P), the layout
kernels/squeeze_excitation.py reads (the same as kernels/depthwise_conv.py's, with this
kernel's BLOCK_P). A program computes BLOCK_P consecutive output pixels (row-major) of ONE image
times BLOCK_C hidden channels; a 1-D grid with the channel tiles varying fastest, so the
programs that read the same input pixels run together (x is read from DRAM about once).

Per tile, for each of the 9 taps (kh, kw): the expand conv of that tap's input pixels is a
[BLOCK_P, C_in] x [C_in, BLOCK_C] tl.dot (K loop over C_in in BLOCK_K chunks, fp32 accumulation),
then BN1 (scale/shift), GELU, rounding to the storage dtype, the padding mask, times the tap's
depthwise weight, accumulated in fp32. Then BN2's shift, GELU, the store and the tile sums.

Trade-off: recomputation instead of memory traffic
- Every output pixel recomputes the expand conv for its 9 input taps. Stride 1: 9x the unfused
  expand FLOPs. Stride 2: 9 taps per output pixel against 4 input pixels per output pixel,
  2.25x. (The ideal 1x, h1 computed once per 2-D tile plus halo and read back shifted for
  each tap, needs an on-chip h1 tile read at per-tap offsets: Triton exposes no shared memory
  to do that with; not attempted.)
- MaxViT-T stage 1, first block (C_in 64 -> hidden 256, 112x112 -> 56x56, stride 2), per image:
  expand 0.411 GFLOP unfused (112*112*64*256 MACs), 0.925 GFLOP fused (9*56*56*64*256):
  +0.514 GFLOP. Saved: h1 = 112*112*256 values = 6.1 MiB written and >= 6.1 MiB read back in
  bf16 (12.3 MiB; 24.5 MiB in fp32): about 40 extra FLOP per DRAM byte saved (bf16).
- MaxViT-T stage 4, first block (C_in 256 -> hidden 2048, 14x14 -> 7x7, stride 2), per image:
  0.206 GFLOP unfused, 0.462 GFLOP fused: +0.257 GFLOP, against h1 = 14*14*2048 values =
  0.77 MiB written + read (1.53 MiB bf16): about 160 extra FLOP per byte saved.
- In general (bf16): extra FLOP per byte saved = 0.625 * C_in at stride 2 and 4 * C_in at
  stride 1 (MaxViT-T stride-1 blocks: 256 at stage 1 to 2048 at stage 4; each of its 7
  stride-1 blocks adds 0.82 GFLOP per image, 5.8 GFLOP in all, to save 4.0 MiB of h1 writes;
  its 4 stride-2 blocks add 1.3 GFLOP to save 11.5 MiB). The ratio of peak tensor-core FLOP/s to
  DRAM bandwidth of current data-centre GPUs (spec sheets, bf16 dense) is in the low hundreds
  of FLOP per byte, so on paper the trade favours the stride-2 blocks and not the stride-1 ones;
  the GELU (erf) is also evaluated 9 (stride 1) or 2.25 (stride 2) times as often, on the
  CUDA cores. Which blocks take this kernel is decided in maxvit_fast/ops/mbconv.py.
- GPU speed of this kernel against the two-kernel path: not measured (no GPU in this session).

Numerics
- fp32: the dot uses ``input_precision="ieee"`` (no TF32), so the fused path meets 1e-5.
- fp16/bf16: tensor-core dots (HMMA on sm_80, HMMA/HGMMA on sm_90) with fp32 accumulation.
- Under the Triton interpreter ``UPCAST_DOT`` upcasts bf16 dot operands to fp32 (bf16 tl.dot is
  wrong there, triton issue 11584) and ``EMULATE_BF16_RTNE`` rounds bf16 to nearest even
  (the interpreter's cast truncates; see kernels/numerics.py). Both are off on a GPU.

Blocks (``expand_depthwise_config``), chosen from the compiled resource reports (sm_80 / sm_90
registers, bf16, stride 2, channels-last x; GPU speed of each: not measured): 64x64x32 at
8 warps, 119/121. Tried (3 stages): 64x64x64 w8 153/123, 64x64x64 w4 232/235, 64x128x64 w8
224/229, 128x64x64 w8 220/220, 64x128x32 w8 198/211, 32x64x64 w4 166/136, 128x128x64 w8 255 +
320 B stack (spills). Two [BLOCK_P, BLOCK_C] fp32 tiles are live (the tap's expand accumulator and
the depthwise accumulator), so the tile is half the pointwise kernel's 128x128. 119 registers
allow 2 CTAs (16 warps) per SM. fp32 (IEEE FMA dot): 64x64x16 at 8 warps, 128/128 (64x64x64 w8
spilled on sm_80: 3.6 KB stack; 64x64x16 w4: 180). The tap loop is a runtime loop around the
K loop (one copy of the dot code, not nine); the software pipeliner prefetches along the K loop
only, so with C_in <= BLOCK_K the next tap's loads are not prefetched and their latency is
hidden by the other resident warps.

Resources: registers per thread, sm_80 / sm_90, from the ahead-of-time compile in
tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations (every configuration the default
MaxViT-T uses; `pytest tests/test_mbconv.py -k aot -s` prints them). Triton 3.9 toolchain,
divisibility-by-16 hints as the runtime specialises them. All LOCAL 0 and STACK 0 (no spills);
"mma": tensor-core instructions present (HMMA on sm_80, HGMMA on sm_90).
    stride 1 and 2, channels-last x, 64x64x32 w8 s3: fp16 119/121 mma, bf16 119/121 mma
    stride 2, NCHW x (first block), 64x64x32 w8 s3: fp16 174/165 mma, bf16 174/163 mma
    stride 1 and 2, channels-last x, 64x64x16 w8 s2: fp32 128/128
    stride 2, NCHW x (first block), 64x64x16 w8 s2: fp32 154/144
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, interpreter_upcasts_dot
from .depthwise_conv import output_tile
from .numerics import dot_accumulate, gelu, to_storage


@triton.jit
def expand_depthwise_conv3x3_kernel(
    x_ptr, w1_ptr, scale1_ptr, shift1_ptr, dw_w_ptr, dw_b_ptr,
    out_ptr, tile_sum_ptr,
    H, W, Ho, Wo, K, N, tiles_per_image,
    stride_xb, stride_xh, stride_xw, stride_xk,
    STRIDE: tl.constexpr, X_K_CONTIGUOUS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # channel tiles vary fastest: programs running together read the same input pixels
    pid = tl.program_id(0)
    num_c_tiles = tl.cdiv(N, BLOCK_C)
    pid_tile = pid // num_c_tiles  # image * tiles_per_image + tile
    pid_c = pid % num_c_tiles
    image = pid_tile // tiles_per_image
    tile = pid_tile % tiles_per_image

    num_pixels = Ho * Wo
    offs_p, offs_c, mask_p, mask_c, ho, wo = output_tile(tile, pid_c, num_pixels, Wo, N, BLOCK_P, BLOCK_C)

    x_image = x_ptr + image.to(tl.int64) * stride_xb
    scale1 = tl.load(scale1_ptr + offs_c, mask=mask_c, other=0.0)
    shift1 = tl.load(shift1_ptr + offs_c, mask=mask_c, other=0.0)

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tap in range(9):
        kh = tap // 3
        kw = tap - kh * 3
        hi = ho * STRIDE - 1 + kh
        wi = wo * STRIDE - 1 + kw
        # taps in the zero padding (and pixels past the end of the image) load nothing and are
        # zeroed after the GELU below
        tap_ok = mask_p & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_rows = hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw

        # expand conv of this tap's input pixels: [BLOCK_P, K] x [K, BLOCK_C]
        y1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            if X_K_CONTIGUOUS:  # channels-last input: say so, so the loads vectorise along k
                x_cols = offs_k
            else:
                x_cols = offs_k * stride_xk
            a = tl.load(x_image + x_rows[:, None] + x_cols[None, :], mask=tap_ok[:, None] & mask_k[None, :], other=0.0)
            w1 = tl.load(w1_ptr + offs_k[:, None] * N + offs_c[None, :], mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            y1 = dot_accumulate(a, w1, y1, UPCAST_DOT, FP32_IEEE)

        h1 = gelu(y1 * scale1[None, :] + shift1[None, :])
        # the unfused path stores h1 in the storage dtype: round the same way
        h1 = to_storage(h1, x_ptr.dtype.element_ty, EMULATE_BF16_RTNE).to(tl.float32)
        h1 = tl.where(tap_ok[:, None], h1, 0.0)
        dw_w = tl.load(dw_w_ptr + tap * N + offs_c, mask=mask_c, other=0.0)
        acc += h1 * dw_w[None, :]

    dw_b = tl.load(dw_b_ptr + offs_c, mask=mask_c, other=0.0)
    y = gelu(acc + dw_b[None, :])
    out_rows = (image.to(tl.int64) * num_pixels + offs_p) * N
    y_stored = to_storage(y, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
    tl.store(out_ptr + out_rows[:, None] + offs_c[None, :], y_stored, mask=mask_p[:, None] & mask_c[None, :])

    # per-(image, channel) partial sums for the SE mean, of the fp32 value (as depthwise_conv.py)
    tile_sum = tl.sum(tl.where(mask_p[:, None], y, 0.0), axis=0)
    tl.store(tile_sum_ptr + pid_tile * N + offs_c, tile_sum, mask=mask_c)


BLOCK_P = 64  # output pixels per tile, for every configuration (the SE tile count depends on it)


def expand_depthwise_config(K: int, N: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options (see the header for the resource reports)."""
    block_c = max(16, min(64, triton.next_power_of_2(N)))
    if dtype == torch.float32:  # FMA dot: a short K step keeps the operand tiles small
        return dict(BLOCK_P=BLOCK_P, BLOCK_C=block_c, BLOCK_K=16, num_warps=8, num_stages=2)
    return dict(BLOCK_P=BLOCK_P, BLOCK_C=block_c, BLOCK_K=max(16, min(32, triton.next_power_of_2(K))),
                num_warps=8, num_stages=3)


def expand_depthwise_output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # kernel 3, padding 1


def expand_depthwise_tiles_per_image(Ho: int, Wo: int) -> int:
    return triton.cdiv(Ho * Wo, BLOCK_P)


def expand_depthwise_conv3x3(
    x: torch.Tensor,
    w1_t: torch.Tensor,
    scale1: torch.Tensor,
    shift1: torch.Tensor,
    dw_w: torch.Tensor,
    dw_b: torch.Tensor,
    stride: int,
    *,
    out: torch.Tensor | None = None,
    tile_sum: torch.Tensor | None = None,
):
    """Launch the fused expand + depthwise conv (eval mode).

    x: (B, H, W, C_in), any strides, fp16/bf16/fp32. w1_t: (C_in, hidden) contiguous, x's dtype.
    scale1, shift1, dw_b: fp32 (hidden,) contiguous; dw_w: fp32 (9, hidden) contiguous (tap
    kh*3+kw). Returns (out, tile_sum): out (B, Ho, Wo, hidden) contiguous in x's dtype; tile_sum
    fp32 (B * T, hidden), T = ``expand_depthwise_tiles_per_image(Ho, Wo)``; row b*T + t holds
    the channel sums of output pixels [t*BLOCK_P, (t+1)*BLOCK_P) of image b (row-major).
    """
    if x.ndim != 4 or w1_t.ndim != 2:
        raise ValueError(f"expected x (B, H, W, C_in) and w1_t (C_in, hidden), got {tuple(x.shape)} and {tuple(w1_t.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or w1_t.dtype != x.dtype:
        raise TypeError(f"x and w1_t must share one of fp16/bf16/fp32, got {x.dtype} and {w1_t.dtype}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    B, H, W, K = x.shape
    N = w1_t.shape[1]
    if w1_t.shape[0] != K:
        raise ValueError(f"w1_t has {w1_t.shape[0]} input channels, x has {K}")
    if not w1_t.is_contiguous():
        raise ValueError("w1_t must be contiguous")
    for name, t, shape in (("scale1", scale1, (N,)), ("shift1", shift1, (N,)), ("dw_w", dw_w, (9, N)), ("dw_b", dw_b, (N,))):
        if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {shape}")
    Ho, Wo = expand_depthwise_output_size(H, stride), expand_depthwise_output_size(W, stride)
    cfg = expand_depthwise_config(K, N, x.dtype)
    T = expand_depthwise_tiles_per_image(Ho, Wo)
    if out is None:
        out = torch.empty((B, Ho, Wo, N), device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != (B, Ho, Wo, N) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(B, Ho, Wo, N)}")
    if tile_sum is None:
        tile_sum = torch.empty((B * T, N), device=x.device, dtype=torch.float32)
    elif tuple(tile_sum.shape) != (B * T, N) or not tile_sum.is_contiguous() or tile_sum.dtype != torch.float32:
        raise ValueError(f"tile_sum must be a contiguous fp32 tensor of shape {(B * T, N)}")
    if B * Ho * Wo * N == 0:
        return out, tile_sum
    grid = (B * T * triton.cdiv(N, cfg["BLOCK_C"]),)
    expand_depthwise_conv3x3_kernel[grid](
        x, w1_t, scale1, shift1, dw_w, dw_b, out, tile_sum,
        H, W, Ho, Wo, K, N, T,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        STRIDE=stride, X_K_CONTIGUOUS=x.stride(3) == 1,
        FP32_IEEE=x.dtype == torch.float32, UPCAST_DOT=interpreter_upcasts_dot(x.dtype),
        EMULATE_BF16_RTNE=INTERPRET and x.dtype == torch.bfloat16,
        **cfg,
    )
    return out, tile_sum
