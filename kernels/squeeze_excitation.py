"""Squeeze-excitation gate from per-tile channel sums, one program per image:

    mean[c] = sum_t tile_sum[b*T + t, c] / num_pixels
    hidden  = silu(w_reduce @ mean)          w_reduce: (R, C), Linear(C -> R, no bias)
    gate    = sigmoid(w_expand @ hidden)     w_expand: (C, R), Linear(R -> C, no bias)

The tile sums come from the depthwise kernel (eval) or the BN2 + GELU pass (train), T tiles per
image in any order (the sum over t is taken in a fixed order: deterministic).

Decisions
- The gate is fp32 (B, C); the project conv multiplies its A tile by it (kernels/pointwise_conv.py),
  so the gated hidden tensor never exists.
- The MLP keeps the whole reduced vector (R <= 512 for MaxViT-T) in registers: BLOCK_R =
  next_pow2(R), and the C loop walks BLOCK_C = max(1, 4096 // BLOCK_R) channels at a time, so
  each weight tile is at most 4096 fp32 values (32 per thread at 4 warps). Both weight matrices
  are read once per image (from L2 after the first image).
- The tile-sum reduction is deterministic (fixed order over the T tiles, no atomics).
- All math in fp32 (weights converted on load, fp32 sums), stricter than the reference's
  low-precision mean. The weights may be fp32 (eval: the op's cached copies) or the module's
  own fp16/bf16 tensors (train: no per-step copies).

Resources: registers per thread, sm_80 / sm_90, from the ahead-of-time compile in
tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations (every configuration the default
MaxViT-T uses, eval and train; `pytest tests/test_mbconv.py -k aot -s` prints them). Triton 3.9
toolchain, divisibility-by-16 hints as the runtime specialises them. All LOCAL 0 and STACK 0
(no spills).
    R=128 BLOCK_C=32 w4 s3: fp32 64/56, bf16 48/48, fp16 48/47
    R=256 BLOCK_C=16 w4 s3: fp32 64/64, bf16 56/56, fp16 56/56
    R=512 BLOCK_C=8 w4 s3: fp32 80/72, bf16 48/54, fp16 48/54
    R=64 BLOCK_C=64 w4 s3: fp32 64/64, bf16 48/48, fp16 56/48
GPU speed: not measured (the work is tiny: B programs, 2*R*C MACs each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def se_gate_kernel(
    tile_sum_ptr, w_reduce_ptr, w_expand_ptr, gate_ptr,
    T, C, R, inv_num_pixels,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    image = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    sums_image = tile_sum_ptr + image.to(tl.int64) * T * C

    hidden = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        channel_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            part = tl.load(sums_image + offs_t[:, None] * C + offs_c[None, :],
                           mask=(offs_t < T)[:, None] & mask_c[None, :], other=0.0)
            channel_sum += tl.sum(part, axis=0)
        mean = channel_sum * inv_num_pixels
        w_reduce = tl.load(w_reduce_ptr + offs_r[:, None] * C + offs_c[None, :],
                           mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        hidden += tl.sum(w_reduce * mean[None, :], axis=1)
    hidden = hidden / (1.0 + tl.exp(-hidden))  # SiLU

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w_expand = tl.load(w_expand_ptr + offs_c[:, None] * R + offs_r[None, :],
                           mask=mask_c[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        logit = tl.sum(w_expand * hidden[None, :], axis=1)
        tl.store(gate_ptr + image * C + offs_c, 1.0 / (1.0 + tl.exp(-logit)), mask=mask_c)


def se_gate_config(C: int, R: int) -> dict:
    block_r = max(16, triton.next_power_of_2(max(R, 1)))
    block_c = max(1, min(triton.next_power_of_2(C), 4096 // block_r))
    return dict(BLOCK_T=16, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4)


def se_gate(
    tile_sum: torch.Tensor,
    num_images: int,
    num_pixels: int,
    w_reduce: torch.Tensor,
    w_expand: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """tile_sum: fp32 (B*T, C) contiguous, image-major; w_reduce (R, C) and w_expand (C, R)
    contiguous, each fp32, fp16 or bf16 (the module's Linear weights as they are: the kernel
    converts them to fp32 on load, so no per-step copies). Returns the fp32 gate (B, C)."""
    if tile_sum.ndim != 2 or tile_sum.dtype != torch.float32 or not tile_sum.is_contiguous():
        raise ValueError("tile_sum must be a contiguous fp32 (B*T, C) tensor")
    BT, C = tile_sum.shape
    B = num_images
    if B <= 0 or BT % B != 0:
        raise ValueError(f"tile_sum has {BT} rows, not a multiple of num_images={B}")
    T = BT // B
    R = w_reduce.shape[0]
    if tuple(w_reduce.shape) != (R, C) or tuple(w_expand.shape) != (C, R):
        raise ValueError(f"w_reduce must be (R, {C}) and w_expand ({C}, R), got {tuple(w_reduce.shape)}, {tuple(w_expand.shape)}")
    weight_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if not (w_reduce.is_contiguous() and w_expand.is_contiguous()) \
            or w_reduce.dtype not in weight_dtypes or w_expand.dtype not in weight_dtypes:
        raise ValueError(f"SE weights must be contiguous fp32/fp16/bf16 tensors, "
                         f"got {w_reduce.dtype} and {w_expand.dtype}")
    if out is None:
        out = torch.empty((B, C), device=tile_sum.device, dtype=torch.float32)
    elif tuple(out.shape) != (B, C) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(B, C)}")
    cfg = se_gate_config(C, R)
    se_gate_kernel[(B,)](tile_sum, w_reduce, w_expand, out, T, C, R, 1.0 / num_pixels, **cfg)
    return out
