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

Backward (train mode, ``se_gate_backward``), one program per image, two passes over channels:
    pass 1: mean and dL/dgate from their tile sums (the dL/dgate partials are column 4 of the
            BN2 backward's (B*T', 5, C) sums, read through strides), d_logit = dgate * g (1 - g)
            with the forward's saved gate g, s += w_reduce @ mean, d_hidden += w_expand^T d_logit
    then    hidden = silu(s), d_reduced = d_hidden * silu'(s)
    pass 2: dm = (w_reduce^T d_reduced) / num_pixels (what the BN2 backward adds per pixel)
It writes d_logit, hidden, d_reduced and mean too: the weight gradients d_logit^T hidden and
d_reduced^T mean are two matmuls over the batch in the op (per-image partials would be B*R*C
floats). fp32 throughout, the same mean (tile sums x 1/num_pixels, fixed order) as the forward.
Pass 1 holds a tile of each weight matrix: BLOCK_C = max(1, 2048 // BLOCK_R), 2 x 2048 fp32
values. Registers sm_80 / sm_90 (same AOT test, train weights fp32/bf16/fp16, channel strides 1,
C, R and the row strides divisible by 16; LOCAL 0 and STACK 0 everywhere):
    R=64 BLOCK_C=32 w4:  fp32 72/64, bf16 64/56, fp16 64/56
    R=128 BLOCK_C=16 w4: fp32 80/72, bf16 64/64, fp16 64/64
    R=256 BLOCK_C=8 w4:  fp32 64/64, bf16 64/64, fp16 64/64
    R=512 BLOCK_C=4 w4:  fp32 56/56, bf16 64/64, fp16 72/66
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import to_storage


@triton.jit
def _tile_sum(rows_ptr, T, stride_t, stride_c, offs_c, mask_c, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum over the T tile rows of one image's (T, C) partial sums (row stride stride_t, channel
    stride stride_c), for the channels offs_c: fp32 (BLOCK_C,), 0 on masked channels."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        part = tl.load(rows_ptr + offs_t[:, None] * stride_t + offs_c[None, :] * stride_c,
                       mask=(offs_t < T)[:, None] & mask_c[None, :], other=0.0)
        total += tl.sum(part, axis=0)
    return total


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
        mean = _tile_sum(sums_image, T, C, 1, offs_c, mask_c, BLOCK_T, BLOCK_C) * inv_num_pixels
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


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_weights(w_reduce, w_expand, R: int, C: int) -> None:
    if tuple(w_reduce.shape) != (R, C) or tuple(w_expand.shape) != (C, R):
        raise ValueError(f"w_reduce must be (R, {C}) and w_expand ({C}, R), got {tuple(w_reduce.shape)}, {tuple(w_expand.shape)}")
    if not (w_reduce.is_contiguous() and w_expand.is_contiguous()) \
            or w_reduce.dtype not in _WEIGHT_DTYPES or w_expand.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"SE weights must be contiguous fp32/fp16/bf16 tensors, "
                         f"got {w_reduce.dtype} and {w_expand.dtype}")


def _weight_tile_config(C: int, R: int, tile_values: int) -> dict:
    """All R rows of a weight matrix by as many channels as fit in ``tile_values`` values."""
    block_r = max(16, triton.next_power_of_2(max(R, 1)))
    block_c = max(1, min(triton.next_power_of_2(C), tile_values // block_r))
    return dict(BLOCK_T=16, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4)


def se_gate_config(C: int, R: int) -> dict:
    return _weight_tile_config(C, R, 4096)


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
    _check_weights(w_reduce, w_expand, R, C)
    if out is None:
        out = torch.empty((B, C), device=tile_sum.device, dtype=torch.float32)
    elif tuple(out.shape) != (B, C) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(B, C)}")
    cfg = se_gate_config(C, R)
    se_gate_kernel[(B,)](tile_sum, w_reduce, w_expand, out, T, C, R, 1.0 / num_pixels, **cfg)
    return out


@triton.jit
def se_gate_backward_kernel(
    mean_sum_ptr, gate_sum_ptr, gate_ptr, w_reduce_ptr, w_expand_ptr,
    dm_ptr, d_logit_ptr, mean_ptr, hidden_ptr, d_reduced_ptr,
    T_mean, T_gate, C, R, inv_num_pixels,
    stride_mt, stride_mc, stride_gt, stride_gc,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
):
    """Backward of se_gate_kernel for one image. In: the forward's per-tile channel sums (T_mean
    rows per image), the per-tile partials of dL/dgate (T_gate rows per image, any strides: a
    column of the BN backward's (rows, 5, C) sums), the saved gate. Out: dm = dL/dmean /
    num_pixels (fp32) and, in their pointers' dtype (the matmul operands), mean (B, C), d_logit = dL/d(w_expand @ hidden) (B, C), hidden = silu(s) and
    d_reduced = dL/ds (B, R), s = w_reduce @ mean; the weight gradients are d_logit^T hidden and
    d_reduced^T mean (two matmuls over the batch, left to the caller)."""
    image = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mean_sums_image = mean_sum_ptr + image.to(tl.int64) * T_mean * stride_mt
    gate_sums_image = gate_sum_ptr + image.to(tl.int64) * T_gate * stride_gt

    # pass 1 over channels: s = w_reduce @ mean and dL/dhidden = w_expand^T @ d_logit together
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    d_hidden = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        channel_sum = _tile_sum(mean_sums_image, T_mean, stride_mt, stride_mc, offs_c, mask_c, BLOCK_T, BLOCK_C)
        d_gate = _tile_sum(gate_sums_image, T_gate, stride_gt, stride_gc, offs_c, mask_c, BLOCK_T, BLOCK_C)
        mean = channel_sum * inv_num_pixels  # as the forward formed it
        gate = tl.load(gate_ptr + image * C + offs_c, mask=mask_c, other=0.0)
        d_logit = d_gate * (1.0 - gate) * gate  # sigmoid'
        tl.store(mean_ptr + image * C + offs_c, to_storage(mean, mean_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
                 mask=mask_c)
        tl.store(d_logit_ptr + image * C + offs_c,
                 to_storage(d_logit, d_logit_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask_c)
        w_reduce = tl.load(w_reduce_ptr + offs_r[:, None] * C + offs_c[None, :],
                           mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        s += tl.sum(w_reduce * mean[None, :], axis=1)
        # w_expand (C, R) read as its transpose (R, BLOCK_C): the same orientation as w_reduce
        w_expand_t = tl.load(w_expand_ptr + offs_c[None, :] * R + offs_r[:, None],
                             mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        d_hidden += tl.sum(w_expand_t * d_logit[None, :], axis=1)
    sig_s = 1.0 / (1.0 + tl.exp(-s))
    hidden = s * sig_s  # SiLU
    d_reduced = d_hidden * sig_s * (1.0 + s * (1.0 - sig_s))  # silu'
    tl.store(hidden_ptr + image * R + offs_r, to_storage(hidden, hidden_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
             mask=mask_r)
    tl.store(d_reduced_ptr + image * R + offs_r,
             to_storage(d_reduced, d_reduced_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask_r)

    # pass 2: dL/dmean = w_reduce^T @ d_reduced, divided by the pixel count (what the BN
    # backward adds per pixel)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w_reduce = tl.load(w_reduce_ptr + offs_r[:, None] * C + offs_c[None, :],
                           mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        d_mean = tl.sum(w_reduce * d_reduced[:, None], axis=0)
        tl.store(dm_ptr + image * C + offs_c, d_mean * inv_num_pixels, mask=mask_c)


def se_gate_backward_config(C: int, R: int) -> dict:
    # pass 1 holds a w_reduce and a w_expand tile: 2 * 2048 fp32 values (32 per thread at 4 warps)
    return _weight_tile_config(C, R, 2048)


def se_gate_backward(
    mean_tile_sum: torch.Tensor,
    gate_tile_sum: torch.Tensor,
    gate: torch.Tensor,
    num_pixels: int,
    w_reduce: torch.Tensor,
    w_expand: torch.Tensor,
    *,
    operand_dtype: torch.dtype = torch.float32,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Backward of ``se_gate``. mean_tile_sum: fp32 (B*T, C), the forward's tile sums (any
    strides); gate_tile_sum: fp32 (B*T', C), per-tile partials of dL/dgate (any strides, e.g.
    ``sums[:, 4]`` of the BN backward's (B*T', 5, C) sums); gate: the forward's fp32 (B, C)
    contiguous; the weights as for ``se_gate``. Returns contiguous (dm (B, C) = dL/dmean /
    num_pixels, fp32; d_logit (B, C), mean (B, C), hidden (B, R), d_reduced (B, R), in
    ``operand_dtype``): dL/dw_expand = d_logit^T @ hidden, dL/dw_reduce = d_reduced^T @ mean
    (in the weights' dtype, those two matmuls need no cast). ``out``: those five tensors to
    write into."""
    for name, t in (("mean_tile_sum", mean_tile_sum), ("gate_tile_sum", gate_tile_sum)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.dtype != torch.float32:
            raise ValueError(f"{name} must be an fp32 (rows, C) tensor")
    if not isinstance(gate, torch.Tensor) or gate.ndim != 2 or gate.dtype != torch.float32 \
            or not gate.is_contiguous():
        raise ValueError("gate must be a contiguous fp32 (B, C) tensor")
    B, C = gate.shape
    if B <= 0:
        raise ValueError("gate must hold at least one image")
    for name, t in (("mean_tile_sum", mean_tile_sum), ("gate_tile_sum", gate_tile_sum)):
        if t.shape[1] != C or t.shape[0] % B != 0 or t.shape[0] == 0:
            raise ValueError(f"{name} must be ({B} * tiles, {C}), got {tuple(t.shape)}")
    R = w_reduce.shape[0] if w_reduce.ndim == 2 else -1
    _check_weights(w_reduce, w_expand, R, C)
    if operand_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"operand_dtype must be fp32, fp16 or bf16, got {operand_dtype}")
    shapes = ((B, C), (B, C), (B, C), (B, R), (B, R))
    dtypes = (torch.float32,) + (operand_dtype,) * 4
    if out is None:
        out = tuple(torch.empty(s, device=gate.device, dtype=dt) for s, dt in zip(shapes, dtypes))
    elif len(out) != 5 or any(tuple(o.shape) != s or o.dtype != dt or not o.is_contiguous()
                              for o, s, dt in zip(out, shapes, dtypes)):
        raise ValueError(f"out must be 5 contiguous tensors of shapes {shapes}: dm fp32, the rest {operand_dtype}")
    dm, d_logit, mean, hidden, d_reduced = out
    cfg = se_gate_backward_config(C, R)
    se_gate_backward_kernel[(B,)](
        mean_tile_sum, gate_tile_sum, gate, w_reduce, w_expand, dm, d_logit, mean, hidden, d_reduced,
        mean_tile_sum.shape[0] // B, gate_tile_sum.shape[0] // B, C, R, 1.0 / num_pixels,
        mean_tile_sum.stride(0), mean_tile_sum.stride(1), gate_tile_sum.stride(0), gate_tile_sum.stride(1),
        **cfg, EMULATE_BF16_RTNE=INTERPRET and operand_dtype == torch.bfloat16,
    )
    return tuple(out)
