"""1x1 convolution over channels-last pixels as a matmul with a fused prologue and epilogue.

    out[b, p, n] = epilogue( sum_k prologue(a[b, p, k]) * w_t[k, n] )

prologue (per input element):        a                              (expand conv)
                                      a * gate[b, k]                 (project conv: SE gate)
epilogue (per output element, fp32):  acc * out_scale[n] + out_shift[n]   (folded BatchNorm, or
                                                                      scale 1 / conv bias)
                                      [gelu] [+ residual[b, p, n]]
                                      optional per-tile column sum and centred sum of squares of
                                      the stored value (train: BatchNorm batch statistics).

Layout: ``a`` is (B, P, K) with any strides (P = pixels of one image, so an NCHW tensor's
``permute(0, 2, 3, 1).reshape(B, H*W, C)`` view is read in place, no copy); ``w_t`` is the conv
weight as (K, N) with any strides: eval passes a cached contiguous transposed copy (stride_wn ==
1), train the parameter itself, ``conv.weight.view(N, K).t()`` (stride_wk == 1), so a training
step copies no weights (Triton specialises a stride equal to 1 at launch, so both loads
vectorise); ``out`` is (B, P, N) contiguous (channels-last). ``out_shift`` may be the conv bias
in its own dtype (converted in the epilogue).
Tiles run over the flattened M = B*P rows, so a tile may span two images: the gate is gathered
per row (b = m // P).

Decisions
- BatchNorm is applied as a per-output-channel scale/shift in the fp32 epilogue instead of being
  multiplied into the weight: the weight stays exactly the module's (no extra rounding of W*s to
  bf16), at one FMA per output element. Same function, better rounding.
- The SE gate multiplies the A tile in registers (fp32, then back to the operand dtype for the
  tensor-core dot): the gated hidden tensor is never written.
- fp32 inputs use ``input_precision="ieee"`` (no TF32) so the fp32 path meets 1e-5 relative;
  fp16/bf16 use tensor cores (HMMA on sm_80, HMMA/HGMMA on sm_90) with fp32 accumulation.
- Under the Triton interpreter ``UPCAST_DOT`` upcasts bf16 dot operands to fp32 (bf16 tl.dot is
  wrong there, triton issue 11584); on a GPU it is off.
- Triton matmul vs cuBLAS (torch.matmul) + a separate epilogue: NOT MEASURED (no GPU in this
  session). The Triton kernel is the default for both 1x1 convs because the alternative needs
  extra passes over the hidden tensor that the fusion exists to remove: for the expand conv,
  torch.matmul writes the pre-activation hidden tensor and an epilogue kernel reads and rewrites
  it (2 extra hidden-sized passes); for the project conv, the gate would have to be applied to a
  materialised copy of the hidden tensor first (2 extra passes). Revisit with measurements:
  the benchmark that decides is ready (benchmarks/kernel_cases.py conv1x1_* cases, each role
  against cuBLAS + eager epilogue and cuBLAS + Inductor's fused epilogue; gpu_run.sh runs them
  at stages 1 and 3 into conv1x1/kernels.md).
- Block sizes (``pointwise_conv_config``), chosen from the compiled resource reports (GPU speed:
  not measured): 16-bit: 128x128 tiles, 8 warps, 3 stages, BLOCK_K 64 (expand) or 32 (project,
  whose gate tile [BLOCK_M, BLOCK_K] fp32 is pipelined along with A: at BLOCK_K 64 it took 255
  registers and 128 KB shared memory on sm_80, at 32: 182 registers, 64 KB). The same 128x128
  expand tile at 4 warps spilled (255 registers + 376 B stack on sm_80). fp32 (IEEE FMA dot, no
  tensor cores): 64x64x16, 8 warps, 2 stages (64x64x32 at 4 warps: 200-255 registers). BLOCK_N
  shrinks to the next power of two >= 16 for narrow layers (dim_out = 64: 128x64 tiles).
- The first block of the model reads the stem's NCHW output (k strided, A_K_CONTIGUOUS off):
  per-element addresses, 244-254 registers on 16-bit, still no spill. A channels-last stem
  output would take the contiguous path (182/122).

Resources: registers per thread, sm_80 / sm_90, from the ahead-of-time compile in
tests/test_mbconv.py::test_aot_compile_maxvit_t_configurations (every configuration the default
MaxViT-T uses, eval and train; `pytest tests/test_mbconv.py -k aot -s` prints them). Triton 3.9
toolchain, divisibility-by-16 hints as the runtime specialises them. All LOCAL 0 and STACK 0
(no spills); "mma": tensor-core instructions present (HMMA on sm_80, HGMMA on sm_90). The
eval-mode expand conv runs inside kernels/expand_depthwise_conv.py, so the model uses this
kernel for the expand conv in train mode only (the OUT_GELU expand is still tested directly).
"+stats" (train): the module's weight transposed (stride_wk == 1) and the conv bias in the
activation dtype; the others (eval): contiguous w_t, fp32 shift. The weight's B-tile offsets are
one i32 sum per element: two 64-bit pointer adds spilled (80 registers + 16 B stack) on sm_90
for the fp32 transposed project+stats. Before the strided weight (contiguous copies), the 16-bit
train configurations took 244/254 (NCHW expand), 188/156 (expand), 178/155 (project 128x128).
    expand+stats (NCHW A) 128x128x64 w8 s3: fp16 236/254 mma, bf16 236/226 mma
    expand+stats (NCHW A) 64x64x16 w8 s2: fp32 128/94
    expand+stats 128x128x64 w8 s3: fp16 181/128 mma, bf16 181/128 mma
    expand+stats 64x64x16 w8 s2: fp32 112/80
    project 128x128x32 w8 s3: fp16 156/146 mma, bf16 157/146 mma
    project 128x64x32 w8 s3: fp16 119/80 mma, bf16 119/80 mma
    project 64x64x16 w8 s2: fp32 65/64
    project+res 128x128x32 w8 s3: fp16 156/178 mma, bf16 157/178 mma
    project+res 128x64x32 w8 s3: fp16 122/100 mma, bf16 121/100 mma
    project+res 64x64x16 w8 s2: fp32 66/65
    project+stats 128x128x32 w8 s3: fp16 154/128 mma, bf16 152/128 mma
    project+stats 128x64x32 w8 s3: fp16 117/93 mma, bf16 118/93 mma
    project+stats 64x64x16 w8 s2: fp32 80/80
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, interpreter_upcasts_dot
from .numerics import dot_accumulate, gelu, to_storage


@triton.jit
def pointwise_conv_kernel(
    a_ptr, w_ptr, out_ptr,
    out_scale_ptr, out_shift_ptr,
    gate_ptr,
    res_ptr, tile_sum_ptr, tile_m2_ptr,
    M, N, K, P, inv_last_tile_rows,
    stride_ab, stride_ap, stride_ak,
    stride_wk, stride_wn,
    stride_rb, stride_rp, stride_rn,
    HAS_GATE: tl.constexpr,
    OUT_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_STATS: tl.constexpr,
    A_K_CONTIGUOUS: tl.constexpr, RES_N_CONTIGUOUS: tl.constexpr,
    FP32_IEEE: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N tiles vary fastest, so programs running together share one A row block (L2 reuse).
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n_tiles
    pid_n = pid % num_n_tiles

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    image = offs_m // P
    pixel = offs_m - image * P
    a_rows = image.to(tl.int64) * stride_ab + pixel.to(tl.int64) * stride_ap

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_a = mask_m[:, None] & mask_k[None, :]
        if A_K_CONTIGUOUS:  # channels-last input: say so, so the loads vectorise along k
            a_cols = offs_k
        else:
            a_cols = offs_k * stride_ak
        a = tl.load(a_ptr + a_rows[:, None] + a_cols[None, :], mask=mask_a, other=0.0)
        if HAS_GATE:
            gate = tl.load(gate_ptr + image[:, None] * K + offs_k[None, :], mask=mask_a, other=0.0)
            a = to_storage(a.to(tl.float32) * gate, a_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
        # w_t contiguous (stride_wn == 1) or the module's (N, K) weight transposed (stride_wk ==
        # 1): the launch specialises the stride equal to 1, so either tile load vectorises. (One
        # i32 offset per element: two 64-bit pointer adds spilled on sm_90, fp32, transposed.)
        w = tl.load(w_ptr + (offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn),
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_accumulate(a, w, acc, UPCAST_DOT, FP32_IEEE)

    out_scale = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out_shift = tl.load(out_shift_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # any float dtype
    y = acc * out_scale[None, :] + out_shift[None, :]

    if WRITE_STATS:
        # BatchNorm batch statistics of y, per tile: column sum and sum of squares about the
        # tile's own mean (merged across tiles with Chan's formula on the host: no cancellation).
        rows_valid = mask_m[:, None]
        # 1 / rows in this tile without a division (the host passes it for the partial last tile)
        inv_count = tl.where(pid_m == tl.cdiv(M, BLOCK_M) - 1, inv_last_tile_rows, 1.0 / BLOCK_M)
        col_sum = tl.sum(tl.where(rows_valid, y, 0.0), axis=0)
        centred = tl.where(rows_valid, y - (col_sum * inv_count)[None, :], 0.0)
        tl.store(tile_sum_ptr + pid_m * N + offs_n, col_sum, mask=mask_n)
        tl.store(tile_m2_ptr + pid_m * N + offs_n, tl.sum(centred * centred, axis=0), mask=mask_n)

    if OUT_GELU:
        y = gelu(y)
    mask_out = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        res_rows = image.to(tl.int64) * stride_rb + pixel.to(tl.int64) * stride_rp
        if RES_N_CONTIGUOUS:
            res_cols = offs_n
        else:
            res_cols = offs_n * stride_rn
        res = tl.load(res_ptr + res_rows[:, None] + res_cols[None, :], mask=mask_out, other=0.0)
        y += res.to(tl.float32)
    out_rows = offs_m.to(tl.int64) * N
    y_stored = to_storage(y, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], y_stored, mask=mask_out)


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def pointwise_conv_config(N: int, K: int, dtype: torch.dtype, has_prologue: bool = False) -> dict:
    """Block sizes and launch options for one 1x1 conv (see the header for the reasoning).
    ``has_prologue``: the A tile is scaled by the SE gate in registers."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=_pow2_clamp(N, 16, 64), BLOCK_K=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=_pow2_clamp(N, 16, 128), BLOCK_K=_pow2_clamp(K, 16, 32 if has_prologue else 64),
                num_warps=8, num_stages=3)


def pointwise_conv(
    a: torch.Tensor,
    w_t: torch.Tensor,
    out_scale: torch.Tensor,
    out_shift: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    out_gelu: bool = False,
    residual: torch.Tensor | None = None,
    stats: bool = False,
    out: torch.Tensor | None = None,
    tile_sum: torch.Tensor | None = None,
    tile_m2: torch.Tensor | None = None,
):
    """Launch the fused 1x1 conv.

    a: (B, P, K), any strides, fp16/bf16/fp32. w_t: (K, N) in a's dtype, any strides: a
    contiguous transposed copy, or the conv weight as the module holds it, without a copy
    (``conv.weight.view(N, K).t()``, strides (1, K)). out_scale: fp32 (N,) contiguous.
    out_shift: (N,) contiguous, fp32, fp16 or bf16 (train mode passes the conv bias as it is;
    the kernel converts it to fp32). gate: fp32 (B, K) contiguous. residual: (B, P, N), any
    strides. out: (B, P, N) contiguous, a's dtype.
    Returns out, or (out, tile_sum, tile_m2) with fp32 (ceil(B*P / BLOCK_M), N) per-tile
    statistics when ``stats``; the rows of tile t are rows [t*BLOCK_M, (t+1)*BLOCK_M) of the
    flattened (B*P, N) output.
    """
    if a.ndim != 3 or w_t.ndim != 2:
        raise ValueError(f"expected a (B, P, K) and w_t (K, N), got {tuple(a.shape)} and {tuple(w_t.shape)}")
    B, P, K = a.shape
    N = w_t.shape[1]
    if w_t.shape[0] != K:
        raise ValueError(f"w_t has {w_t.shape[0]} input channels, a has {K}")
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or w_t.dtype != a.dtype:
        raise TypeError(f"a and w_t must share one of fp16/bf16/fp32, got {a.dtype} and {w_t.dtype}")
    for name, t, shape in (("out_scale", out_scale, (N,)), ("gate", gate, (B, K))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {shape}")
    if tuple(out_shift.shape) != (N,) or not out_shift.is_contiguous() or not out_shift.dtype.is_floating_point \
            or out_shift.dtype == torch.float64:
        raise ValueError(f"out_shift must be a contiguous fp32/fp16/bf16 tensor of shape {(N,)}")
    if residual is not None and tuple(residual.shape) != (B, P, N):
        raise ValueError(f"residual must be (B, P, N) = {(B, P, N)}, got {tuple(residual.shape)}")
    M = B * P
    cfg = pointwise_conv_config(N, K, a.dtype, gate is not None)
    if out is None:
        out = torch.empty((B, P, N), device=a.device, dtype=a.dtype)
    elif tuple(out.shape) != (B, P, N) or not out.is_contiguous() or out.dtype != a.dtype:
        raise ValueError(f"out must be a contiguous {a.dtype} tensor of shape {(B, P, N)}")
    num_m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    if stats:
        if tile_sum is None:
            tile_sum = torch.empty((num_m_tiles, N), device=a.device, dtype=torch.float32)
        if tile_m2 is None:
            tile_m2 = torch.empty((num_m_tiles, N), device=a.device, dtype=torch.float32)
        for name, t in (("tile_sum", tile_sum), ("tile_m2", tile_m2)):
            if tuple(t.shape) != (num_m_tiles, N) or not t.is_contiguous() or t.dtype != torch.float32:
                raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {(num_m_tiles, N)}")
    if M == 0:
        return (out, tile_sum, tile_m2) if stats else out
    res = residual if residual is not None else out
    grid = (num_m_tiles * triton.cdiv(N, cfg["BLOCK_N"]),)
    pointwise_conv_kernel[grid](
        a, w_t, out,
        out_scale, out_shift,
        gate if gate is not None else out_scale,
        res,
        tile_sum if stats else out_scale,
        tile_m2 if stats else out_scale,
        M, N, K, P, 1.0 / (M - (num_m_tiles - 1) * cfg["BLOCK_M"]),
        a.stride(0), a.stride(1), a.stride(2),
        w_t.stride(0), w_t.stride(1),
        res.stride(0), res.stride(1), res.stride(2),
        HAS_GATE=gate is not None,
        OUT_GELU=out_gelu, HAS_RESIDUAL=residual is not None, WRITE_STATS=stats,
        A_K_CONTIGUOUS=a.stride(2) == 1, RES_N_CONTIGUOUS=res.stride(2) == 1,
        FP32_IEEE=a.dtype == torch.float32, UPCAST_DOT=interpreter_upcasts_dot(a.dtype),
        EMULATE_BF16_RTNE=INTERPRET and a.dtype == torch.bfloat16,
        **cfg,
    )
    return (out, tile_sum, tile_m2) if stats else out
