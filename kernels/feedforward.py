"""Fused feed-forward with residual, per token of a channels-last map:

    out = Dropout_out(Linear2(Dropout_hidden(GELU(Linear1(LayerNorm(x)))))) + x

(the reference ``FeedForward`` of maxvit_fast/reference.py plus the caller's residual add).

Kernels
-------
* ``ff_fused_mlp_kernel`` (one pass, widths up to 256 in fp16/bf16): a program owns BLOCK_M
  tokens and all C channels. It loads the token rows once, computes the LayerNorm statistics
  from them (two-pass mean/variance in fp32 registers, exact), keeps the normalised tile as the
  A operand, and loops over the 4C hidden dimension in BLOCK_H chunks: dot with W1^T, + b1,
  exact erf GELU, dropout, dot with W2^T into a (BLOCK_M, C) fp32 accumulator. The hidden
  activation never leaves the SM; + b2, dropout and the residual are the epilogue. HBM traffic:
  x read (twice, the second from L2), out written once, weights from L2.
* ``ff_up_kernel`` + ``ff_down_kernel`` (two kernels, width 512+ and all fp32): up = LayerNorm
  in the prologue of the first matmul, bias + GELU + dropout in its epilogue, into an (M, 4C)
  buffer in the input dtype; down = second matmul with bias, dropout and the residual add in the
  epilogue. LayerNorm statistics: an in-kernel loop over the row tile's C chunks before the
  matmul (each chunk's exact mean and M2 merged with Chan's formula, so no E[x^2] - mean^2
  cancellation), re-reading the tile from L1/L2, instead of a separate stats kernel: that
  would add a launch and a round trip of mean/rstd, to save only cache hits.
* ``ff_fused_mlp_backward_kernel`` (training, the one-pass widths): see "Backward" below.
* ``ff_up_backward_kernel`` (training, the two-kernel widths): see "Backward of the two-kernel
  widths" below.
* ``ff_dropout_keep_kernel``: regenerates a forward dropout mask as a tensor (the reference
  under the kernels' masks, in tests: maxvit_fast/ops/feedforward.py reference_with_masks).
* ``linear_dropout_residual`` (launcher, shared): ``ff_down_kernel`` as a plain matmul + dropout +
  residual, HAS_BIAS off: the window attention's output projection in training
  (maxvit_fast/ops/output_projection.py), the tokens and the block step's register rows (second
  row set, residual the shared rows expanded with stride 0) in one launch. Its backward takes
  ``ff_dropout_grad_kernel`` (grad * regenerated mask * scale, both row sets in one launch, no
  stored mask) and matmuls.

Two row sets in one launch (``extra=``): the block step runs the same feed-forward on its
(B, H, W, C) tokens and on the register rows of every window ((B, nX, nY, r, C), sliced out of the
attention's window sequences). The forward kernels take an optional second row set (extra ->
extra_out, its own coalesced layout), as kernels/layernorm_linear.py does: the grid is x's row
tiles followed by extra's, the program id picks the set (pointers and strides selected per
program, one copy of the main loop), and a row tile never straddles the two sets. Tokens are
numbered x's first, then extra's (token = M + row-major index over extra's leading dims): the
dropout counters, the two-kernel path's hidden buffer rows ((M + M_extra, 4C); ff_down_kernel
takes its two halves as two A-operand pointers, hidden and extra_hidden, so the output
projection can pass two separate tensors) and the statistics columns are indexed by token, so the pair call computes exactly one call on the
concatenation (masks independent of tiles, never colliding between the sets), without the copy.
That saves one launch per block step on the one-pass path and two on the two-kernel path. The
backward kernel stays one row set per launch (two launches for a pair: a second row set would add
pointer selects to its tightest register budget, 248 of 255 at fp16 C = 64), with ``token0`` (the
set's first token: dropout counters and statistics columns); both launches write the weight-
gradient operands (xn, act, dh, dy) into one (M + M_extra)-row buffer, so the weight gradients
stay one matmul each. Without extra the launcher passes an empty second set (M_extra = 0).

Dropout: element (token, column) of stream s (0 hidden, 1 output) is kept when the top 24 bits
of philox(seed; column, token, s, 0) / 2^24 >= p, scaled by 1/(1-p). Token is the row-major
index over x's leading dims, so the mask does not depend on strides, tiles or kernel path, and
the counters do not overflow for any token count below 2^31. The seed is a 1-element int64
tensor that the kernels read (once per program); the op layer draws it on the device from
torch's generator (reproducible with torch.manual_seed, fresh in every CUDA-graph replay).

Precision: fp32 accumulation everywhere; fp32 inputs use exact fp32 dots (input_precision
"ieee"); fp16/bf16 use tensor-core dots (HMMA on sm_80, HGMMA on sm_90) with the normalised
input and the GELU output rounded to the input dtype as operands (the reference rounds at the
same places, and more). Under the Triton interpreter bf16 dots are wrong (triton issue 11584)
and fp32 -> bf16 conversion truncates, so there (only) bf16 dot operands are upcast to fp32 and
bf16 results are rounded to nearest even on the bits first (FP32_DOT, ROUND_BF16).

Layout: x and out are (..., C) with any strides; the leading dims are coalesced (jointly for x
and out) to at most two, (D0, D1) with one stride each, which covers the (B, H, W, C) view of an
NCHW or NHWC map and register rows sliced out of window sequences; anything else goes through a
contiguous copy. C and the hidden width are compile-time constants (a model has a handful), so
masks fold away at power-of-two widths and the weight loads vectorise; other widths (24, 48, 96)
are masked up to the next power of two.

Decision: one pass or two, and the tiles (resource report, no GPU measurement)
-------------------------------------------------------------------------------
Numbers: sm_80 / sm_90 registers per thread, spills = STACK/LOCAL bytes (LDL/STL in SASS), from
``triton.compile`` for GPUTarget("cuda", arch, 32) + cuobjdump --dump-resource-usage, with the
divisibility-by-16 hints a runtime launch gets for aligned pointers and multiple-of-16 strides
(tests/test_feedforward.py::test_aot_compile_maxvit_t_configurations prints the full table;
``pytest tests/test_feedforward.py -k aot -s``). eval = no dropout, train = both dropouts on.
The numbers are those of the kernels with the second row set (Triton 3.9; the channel strides
of both sets specialised to 1, as at a launch on channels-last tokens and register rows); the
single-set kernels they replaced (same compiler, same hints), in parentheses for the train
configurations: the per-program pointer and stride selects cost at most 10 registers (sm_80
train; -6 to +3 elsewhere).

  one pass, fp16 (bf16 within 2 registers)     eval            train
  C=64   BLOCK_M 64, BLOCK_H 32, 4 warps       128 / 121       241 / 137 (233 / 135)   no spills
  C=128  BLOCK_M 64, BLOCK_H 64, 8 warps       128 / 159       168 / 242 (167 / 241)   no spills
  C=256  BLOCK_M 64, BLOCK_H 32, 8 warps       174 / 204       227 / 228 (228 / 230)   no spills
  C=512  BLOCK_M 64, any BLOCK_H 16-64, 8 warps: 255 regs + 96-264 B stack on sm_80;
         16 warps: 128 regs + 152-184 B stack on sm_80                         -> spills
  C=512  BLOCK_M 32, BLOCK_H 16-64, 16 warps: 122-126 / 94-122, no spills, but a 32-row tile
         gets no wgmma on sm_90 (HMMA only) and halves the reuse of every weight byte read
         from L2 (the whole 2 x 512 x 2048 weights stream through each program)

  two kernels, C=512, fp16                      eval            train
  up    BLOCK_M 64, BLOCK_N 128, BLOCK_K 64, 8 warps   96 / 102   178 / 105 (171 / 105)   no spills
  down  BLOCK_M 64, BLOCK_N 128, BLOCK_K 64, 8 warps  116 / 74    168 / 90  (165 / 88)    no spills
        (bf16: up train 181 / 104 (171 / 104), down train 168 / 90 (166 / 89))

So: one pass for C <= 256 (MaxViT-T stages 1-3, 9 of its 11 blocks' feed-forwards), two
kernels for C >= 512 (stage 4, 2 blocks, 7x7 maps, where the 4C buffer is small). Larger tiles
(BLOCK_M 128 at C >= 64, or 4 warps at C >= 128) spill in the same survey.

fp32 (exact "ieee" dots run on FMA units with both operands in registers):
  one pass, C=64: BLOCK_M 64, BLOCK_H 16, 8 warps: 128 / 104 eval, 128 / 98 train, no spills
  (BLOCK_H 32 at 64 rows: 10488 B stack). C=128 and 256 spill at 32-64 rows (e.g. C=128 64x16
  w8: sm_90 train 40 B; C=256 32x16 w8: sm_90 train 48 B) and fit only at 16 rows (C=128 16x32
  w4: 96 / 96; C=256 16x16 w4: 168 / 168), where every program streams both weight matrices
  (C=256: 2 MiB) from L2 for 16 tokens: 128 KB of L2 reads per token against the 8 KB per token
  of HBM traffic the two-kernel path's hidden buffer costs. fp32 is bound by FMA throughput
  anyway (16 C^2 FLOP per token), so C >= 128 takes the two-kernel path with small tiles (up
  64x64x16, down 64x32x32, 4 warps: up 108-128 / 128-168, down 80 / 80-116 registers with
  the second row set (single-set 127-128 / 128-168 and 80 / 78-110; down 80 / 80-112 before its
  second A-operand pointer, extra_hidden), no spills). (Survey:
  maxvit_fast.aot.compile_kernels over BLOCK_M 16-64, BLOCK_H 16-32, 4 or 8 warps; the AOT
  test compiles every configuration in use.)
The one-pass kernel's second read of x uses a different eviction policy on purpose: otherwise
the compiler merges it with the first load and keeps the x tile live across the hidden loop
(C=64, 4 warps: 187 registers with 192 B stack instead of 128).

Speed on a GPU: not measured (no GPU in this session). Activation elements read + written per
token in eval (counted, not measured; weights excluded): reference eager LayerNorm 2C, Linear1
5C, GELU 8C, Linear2 5C, residual add 3C = 23C, materialising xn, h, GELU(h), y and out (11C);
one pass 2C (x in, out), materialising out only (C); two kernels 11C (x twice, 4C hidden out
and in, out), materialising the hidden and out (5C).

Backward (one-pass widths: fp16/bf16 C <= 256, fp32 C <= 64)
------------------------------------------------------------
The training forward (the one-pass kernel with WRITE_STATS) also stores each token's LayerNorm
mean and rstd (fp32, 8 bytes per token); the op saves x, the parameters, these statistics and
the seed: no 4C-wide activation. ``ff_fused_mlp_backward_kernel``: one program per BLOCK_M row
tile with all C channels, as the forward. It rebuilds xn from x and the statistics (the
forward's expression, so the same dot operand), forms dy = grad * keep_out * scale_out (the mask
regenerated from the seed, the same philox counters), and loops over the hidden dimension in
BLOCK_H chunks: pre = xn W1_j^T + b1_j (recomputed), act = dropped GELU(pre) (stored: the dW2
operand), d_act = dy W2[:, j], dh = d_act * keep_h * scale_h * (Phi(pre) + pre * phi(pre))
(exact erf GELU derivative; stored: the dW1 operand), dxn += dh W1_j in an fp32 (BLOCK_M, C)
accumulator. After the loop the LayerNorm backward runs on whole rows, dx = rstd * (g dxn -
mean(g dxn) - xhat * mean(g dxn * xhat)) + grad (the residual), written once in x's layout.
Column sums of dh, dy, dxn * xhat and dxn per row tile go to an fp32 (tiles, 4C + 3C) buffer,
summed by one torch reduction into the b1, b2, LayerNorm weight and bias gradients (deterministic,
no atomics; 7C * 4 / BLOCK_M bytes per token, against 4C * 2 bytes per token for a torch
dh.sum(0) pass over dh). The weight gradients are two cuBLAS matmuls in the op layer,
dW1 = dh^T xn and dW2 = dy^T act, on operands the kernel writes: xn (M, C) (cheaper than a
torch recompute from x and the statistics: several elementwise passes) and dy (M, C, only with
output dropout; otherwise dy is grad). Rounding: pre, d_act, dh and dxn stay fp32 in the kernel
(the reference rounds each to the input dtype); dh, act, xn and dy are rounded to the input
dtype once, as dot operands and stored tensors.

Per token (counted, not measured): the kernel reads x and grad (2C, each a second time from L2)
and writes dx, xn, act, dh (and dy) = 10C (11C) elements; the two matmuls read them back (10C).
The recompute backward it replaces regenerated two uint8 masks (5C bytes), re-ran the
reference forward (five passes, two 4C wide) and its autograd backward. TrafficCounter
(maxvit_fast.traffic, bytes written, launches), feed-forward backward of a training step of
MaxViT(dim 32, depth (1, 1), window 2, 2 registers, dropout 0.1), 2 x 3 x 32 x 32 images, fp32,
6 feed-forward calls, 400 tokens: recompute backward 3,483,648 B / 158 launches, backward kernel
1,189,760 B / 24 launches (kernel, partial sum, 2 matmuls per call; fp16/bf16 add one cast of
the 7C sums), eager reference backward 1,482,624 B / 66 launches. Forward + backward: eager
3,083,264 B / 132 launches, fused 1,254,448 B / 36 launches (the fused forward saves no 4C
activation).

Backward of the two-kernel widths (fp16/bf16 C >= 512, fp32 C >= 128)
-----------------------------------------------------------------------
No statistics are saved and no 4C activation either (the forward's hidden buffer is freed).
``ff_up_backward_kernel`` has ff_up_kernel's tiles and row sets and its LayerNorm prologue: per
(BLOCK_M tokens, BLOCK_N hidden columns) tile it recomputes pre = LayerNorm(x) W1^T + b1 and, in
a second fp32 accumulator, d_act = dy W2[:, cols] (K = C for both), then stores act =
Dropout(GELU(pre)) (bitwise the forward's hidden) and dh = d_act * keep * scale * GELU'(pre).
The op layer (maxvit_fast/ops/feedforward.py) does the rest with cuBLAS and torch: dy from the
output-dropout gradient kernel, dW2 = dy^T act, dW1 = dh^T xn, dxn = dh W1, the bias sums, and
per row set kernels/layernorm_backward.py (the LayerNorm recomputed; dx plus the residual's
gradient, xn, the dgamma / dbeta partials). It replaced a recompute of the whole block with torch ops under regenerated uint8
masks, differentiated by torch.func.vjp. Tiles from the resource report (bf16 C = 512, dropout
on, sm_80 / sm_90 registers, no spills anywhere): BLOCK_M 64, BLOCK_N 128, BLOCK_K 64, 8 warps
(ff_up_kernel's) 252 / 171; 64 x 64 x 64, 4 warps 228 / 173; 64 x 64 x 64, 8 warps 97 / 98
(chosen: the two accumulators fit with room; each x row tile's LayerNorm is recomputed by
32 instead of 16 column programs, from L2); 128 x 64 x 64, 8 warps 254 / 170. fp32 (ff_up's
fp32 tiles 64 x 64 x 16, 4 warps): 168 / 142-168 at C = 128..512. GPU speed: not measured.

Tiles (resource report, sm_80 / sm_90 registers, train = both dropouts / p = 0; no GPU
measurement). The backward holds three (BLOCK_M, C) tiles across the hidden loop, xn and dy in
the input dtype and the fp32 dxn accumulator, where the forward holds two, and does three dots
per chunk:

  fp16 (bf16 within 5 registers)              train           p = 0
  C=64   BLOCK_M 64, BLOCK_H 32, 4 warps       248 / 240       231 / 209     no spills
  C=128  BLOCK_M 64, BLOCK_H 32, 8 warps       243 / 225       231 / 202     no spills
  C=256  BLOCK_M 32, BLOCK_H 32, 8 warps       230 / 182       163 / 164     no spills (HMMA
         on sm_90 too: a 32-row tile gets no wgmma)
  C=256  BLOCK_M 64 spills at every setting tried: BLOCK_H 16/32/64 with 8 warps (255 regs,
         64-176 B stack) or 16 warps (128 regs, 224-944 B stack)
  C=64   BLOCK_H 64: 255 + 56 B stack (4 warps), 255 + 16 B (8 warps, sm_80); C=128 BLOCK_H 64
         8 warps: sm_90 255 + 80 B; C=128 4 warps: 255 + 56-256 B           -> spills
  fp32 C=64 BLOCK_M 32, BLOCK_H 16, 4 warps    128 / 134       128 / 134     no spills
  (with ``token0`` and the statistics row stride: fp16/bf16 within -12 / +0 registers of the
  table, fp32 train sm_90 134 from 128; the table is the earlier survey's)
  fp32 C=64 BLOCK_M 64: BLOCK_H 16 8 warps p = 0: sm_90 24 B stack; BLOCK_H 32 8 warps train:
         sm_90 255 + 304 B                                                  -> spills
The forward's WRITE_STATS store costs at most one register (fp16 C=64 train 233 / 135,
C=128 167 / 241, C=256 228 / 230, fp32 C=64 128 / 98), hence in-kernel rather than a separate
statistics pass. Wider layers (the two-kernel widths) would need a (BLOCK_M, C) fp32 dxn
accumulator over C = 512 (or fp32 C >= 128) in registers: already the forward's one-pass
accumulator spills there, so they take ff_up_backward_kernel (below). (Survey:
maxvit_fast.aot.compile_kernels with the AOT test's signatures; the AOT test compiles every
configuration in use: ``pytest tests/test_feedforward.py -k aot -s``.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, interpreter_upcasts_dot, seed_pointer
from .numerics import gelu, gelu_derivative, to_storage


# Dropout streams: the philox counter (column, token, stream, 0) names every random number.
STREAM_HIDDEN = 0
STREAM_OUT = 1
_STREAM_HIDDEN = tl.constexpr(STREAM_HIDDEN)
_STREAM_OUT = tl.constexpr(STREAM_OUT)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation. FP32_DOT: exact fp32 products (fp32 inputs, and
    bf16 under the interpreter, whose bf16 dot is wrong); otherwise tensor-core fp16/bf16."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _keep(seed, rows, cols, STREAM: tl.constexpr, p):
    """(len(rows), len(cols)) dropout keep mask: philox(seed; col, row, STREAM, 0), the top 24
    bits as a uniform u in [0, 1), kept when u >= p (probability 1 - p, as nn.Dropout)."""
    c0 = (cols[None, :] + 0 * rows[:, None]).to(tl.uint32)
    c1 = (rows[:, None] + 0 * cols[None, :]).to(tl.uint32)
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, c1, zero + STREAM, zero)
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= p


@triton.jit
def _token_offsets(rows, D1, stride0, stride1):
    """Element offset of token ``rows`` (flat index over the leading dims, coalesced to two:
    row = i0 * D1 + i1) in a tensor with leading strides (stride0, stride1)."""
    # int32 division (row < M < 2**31), int64 offsets
    return (rows // D1).to(tl.int64) * stride0 + (rows % D1).to(tl.int64) * stride1


@triton.jit
def _row_set_tile(pid_m, x_row_tiles, x_ptr, extra_ptr, M, D1, stride_x0, stride_x1, stride_xc,
                  M_extra, D1_extra, stride_e0, stride_e1, stride_ec, BLOCK_M: tl.constexpr):
    """Row tile ``pid_m`` of the two row sets (x's tiles [0, x_row_tiles), then extra's): each
    row's pointer to its channel 0, the row mask, the token indices (extra's numbered after x's:
    M + row) and the channel stride."""
    is_extra = pid_m >= x_row_tiles
    src = tl.where(is_extra, extra_ptr, x_ptr)
    rows = tl.where(is_extra, pid_m - x_row_tiles, pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.where(is_extra, M_extra, M)
    tokens = rows + tl.where(is_extra, M, 0)
    x_rows = src + _token_offsets(rows, tl.where(is_extra, D1_extra, D1), tl.where(is_extra, stride_e0, stride_x0),
                                  tl.where(is_extra, stride_e1, stride_x1))
    return x_rows, row_ok, tokens, tl.where(is_extra, stride_ec, stride_xc)


@triton.jit
def layernorm_matmul(x_rows, row_ok, stride_xc, ln_w_ptr, ln_b_ptr, eps, w_rows, col_ok,
                     C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                     FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """LayerNorm(x) @ W^T for a (rows, cols) tile, fp32 accumulator: LayerNorm as the prologue of
    the matmul (shared by ff_up_kernel and kernels/layernorm_linear.py).

    ``x_rows``: pointer to channel 0 of each row (channels ``stride_xc`` apart); ``w_rows``:
    pointer to each output column's weight row (C contiguous weights, nn.Linear layout). Padded
    rows and columns are masked by ``row_ok`` / ``col_ok``. The normalised chunk is rounded to
    the weight dtype as the dot operand (as the reference's LayerNorm output is)."""
    # Row statistics, one pass over C in BLOCK_K chunks: each chunk's exact mean and sum of
    # squared deviations, merged into the running ones (Chan et al.), so no E[x^2] - mean^2
    # cancellation. Every chunk but the last is full, so the count before chunk k0 is k0.
    mean = tl.zeros(x_rows.shape, dtype=tl.float32)
    m2 = tl.zeros(x_rows.shape, dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks < C)[None, :]
        xk = tl.load(x_rows[:, None] + ks[None, :] * stride_xc, mask=ok, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(C - k0, BLOCK_K).to(tl.float32)
        chunk_mean = tl.sum(xk, axis=1) / n_chunk
        d = tl.where(ok, xk - chunk_mean[:, None], 0.0)
        n_total = k0 + n_chunk
        delta = chunk_mean - mean
        mean += delta * (n_chunk / n_total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (k0 * n_chunk / n_total)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)

    # The matmul re-reads each x chunk (an L1/L2 hit) and normalises it as it is loaded.
    acc = tl.zeros((x_rows.shape[0], w_rows.shape[0]), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        xk = tl.load(x_rows[:, None] + ks[None, :] * stride_xc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xn = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_LN_WEIGHT:
            xn = xn * tl.load(ln_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LN_BIAS:
            xn = xn + tl.load(ln_b_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        # W^T chunk (BLOCK_K, cols): element (k, n) = W[n, k]; zero on padded channels, so the
        # normalised values there (nonzero without an affine weight) do not contribute
        w = tl.load(w_rows[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(to_storage(xn, w_rows.dtype.element_ty, ROUND_BF16), w, acc, FP32_DOT)
    return acc


# --------------------------------------------------------------------------------------------
# kernel A: the whole MLP in one pass, 4C hidden kept on chip
# --------------------------------------------------------------------------------------------


@triton.jit
def ff_fused_mlp_kernel(
    x_ptr, out_ptr, extra_ptr, extra_out_ptr, ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, stats_ptr,
    M, D1,
    stride_x0, stride_x1, stride_xc, stride_o0, stride_o1, stride_oc,
    M_extra, D1_extra,  # the second row set (extra -> extra_out), coalesced the same way
    stride_e0, stride_e1, stride_ec, stride_eo0, stride_eo1, stride_eoc,
    x_programs, eps, seed_ptr, p_hidden, p_out, scale_hidden, scale_out,
    C: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    DROPOUT_HIDDEN: tl.constexpr, DROPOUT_OUT: tl.constexpr, WRITE_STATS: tl.constexpr,
    FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """One program: BLOCK_M tokens of one row set, all C channels (BLOCK_C >= C, masked):
    programs [0, x_programs) take x -> out, the rest extra -> extra_out (token index M + row,
    for the dropout counters and the statistics). The normalised tile is the A operand of every
    hidden chunk; each (BLOCK_M, BLOCK_H) chunk of the hidden activation goes from the first dot
    through bias, GELU and dropout straight into the second dot, so the 4C-wide hidden never
    leaves the SM.

    W1 is (HIDDEN, C) and W2 is (C, HIDDEN), both contiguous (nn.Linear layout). WRITE_STATS
    (training): the LayerNorm statistics go to stats (fp32, (2, M + M_extra): mean, then rstd,
    by token index) for the backward kernel."""
    pid = tl.program_id(0)
    # this program's row set: source and destination rows, their layout, the first token index
    is_extra = pid >= x_programs
    src = tl.where(is_extra, extra_ptr, x_ptr)
    dst = tl.where(is_extra, extra_out_ptr, out_ptr)
    d1 = tl.where(is_extra, D1_extra, D1)
    stride_s0 = tl.where(is_extra, stride_e0, stride_x0)
    stride_s1 = tl.where(is_extra, stride_e1, stride_x1)
    stride_sc = tl.where(is_extra, stride_ec, stride_xc)
    stride_d0 = tl.where(is_extra, stride_eo0, stride_o0)
    stride_d1 = tl.where(is_extra, stride_eo1, stride_o1)
    stride_dc = tl.where(is_extra, stride_eoc, stride_oc)
    rows = tl.where(is_extra, pid - x_programs, pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.where(is_extra, M_extra, M)
    tokens = rows + tl.where(is_extra, M, 0)
    chans = tl.arange(0, BLOCK_C)
    if DROPOUT_HIDDEN or DROPOUT_OUT:
        seed = tl.load(seed_ptr)  # once, not in the hidden loop (sm_90 C=256 train spilled with it there)
    chan_ok = chans < C
    tile_ok = row_ok[:, None] & chan_ok[None, :]

    x_tile_ptrs = src + _token_offsets(rows, d1, stride_s0, stride_s1)[:, None] + chans[None, :] * stride_sc
    x = tl.load(x_tile_ptrs, mask=tile_ok, other=0.0).to(tl.float32)

    # LayerNorm from the loaded rows: two-pass mean / variance in fp32 (biased, as nn.LayerNorm)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(tile_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    if WRITE_STATS:
        tl.store(stats_ptr + tokens, mean, mask=row_ok)
        tl.store(stats_ptr + (M + M_extra) + tokens, rstd, mask=row_ok)
    gamma = tl.load(ln_w_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    # padded channels: gamma = beta = 0, so they are 0 in the A operand
    xn = to_storage(xc * rstd[:, None] * gamma[None, :] + beta[None, :], x_ptr.dtype.element_ty, ROUND_BF16)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        hid = h0 + tl.arange(0, BLOCK_H)
        hid_ok = hid < HIDDEN
        # W1^T chunk (BLOCK_C, BLOCK_H): element (k, n) = W1[n, k]
        w1 = tl.load(w1_ptr + hid[None, :] * C + chans[:, None], mask=chan_ok[:, None] & hid_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)
        pre = _mma(xn, w1, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), FP32_DOT) + b1[None, :]
        act = gelu(pre)  # padded hidden columns: pre = 0 -> GELU 0, and their W2 rows are 0
        if DROPOUT_HIDDEN:
            act = tl.where(_keep(seed, tokens, hid, _STREAM_HIDDEN, p_hidden), act * scale_hidden, 0.0)
        # W2^T chunk (BLOCK_H, BLOCK_C): element (n, c) = W2[c, n]
        w2 = tl.load(w2_ptr + chans[None, :] * HIDDEN + hid[:, None], mask=hid_ok[:, None] & chan_ok[None, :], other=0.0)
        acc = _mma(to_storage(act, w2_ptr.dtype.element_ty, ROUND_BF16), w2, acc, FP32_DOT)

    b2 = tl.load(b2_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    y = acc + b2[None, :]
    if DROPOUT_OUT:
        y = tl.where(_keep(seed, tokens, chans, _STREAM_OUT, p_out), y * scale_out, 0.0)
    # residual: reload x (an L2 hit) rather than keep the tile, or its pointers, live across
    # the loop; the different eviction policy keeps the compiler from merging the two loads
    x_tile_ptrs = src + _token_offsets(rows, d1, stride_s0, stride_s1)[:, None] + chans[None, :] * stride_sc
    y += tl.load(x_tile_ptrs, mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    out_ptrs = dst + _token_offsets(rows, d1, stride_d0, stride_d1)[:, None] + chans[None, :] * stride_dc
    tl.store(out_ptrs, to_storage(y, out_ptr.dtype.element_ty, ROUND_BF16), mask=tile_ok)


# --------------------------------------------------------------------------------------------
# backward of kernel A: one pass over the hidden dimension per row tile
# --------------------------------------------------------------------------------------------


@triton.jit
def ff_fused_mlp_backward_kernel(
    x_ptr, grad_ptr, dx_ptr, stats_ptr, ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr, w2_ptr,
    xn_ptr, dy_ptr, act_ptr, dh_ptr, partial_ptr,
    M, D1,
    stride_x0, stride_x1, stride_xc, stride_g0, stride_g1, stride_gc, stride_d0, stride_d1, stride_dc,
    token0, stats_cols, seed_ptr, p_hidden, p_out, scale_hidden, scale_out,
    C: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    DROPOUT_HIDDEN: tl.constexpr, DROPOUT_OUT: tl.constexpr, FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Gradients of out = Dropout(GELU(LayerNorm(x) W1^T + b1) dropped W2^T + b2) + x for one
    tile of BLOCK_M tokens and all C channels, given grad = d out and the forward's LayerNorm
    statistics. Row r of this launch is token token0 + r of the forward call (its dropout
    counters; its statistics in column token0 + r of stats, a (2, stats_cols) fp32 tensor: the
    second row set of a two-set forward is a second launch with token0 = the first set's M).
    Writes:

    * dx (strided like x): LayerNorm backward of dxn plus the residual's grad;
    * xn (M, C): the normalised input as the forward's dot operand (dW1 = dh^T xn);
    * dy (M, C) (DROPOUT_OUT only; otherwise dy = grad): grad through the output dropout;
    * act (M, HIDDEN): the dropped GELU output, as the forward's second dot operand (dW2 = dy^T act);
    * dh (M, HIDDEN): d of the first Linear's output (dW1 = dh^T xn);
    * partial (tiles, HIDDEN + 3C) fp32: this tile's column sums of [dh | dy | dxn * xhat | dxn],
      i.e. of the b1, b2, LayerNorm weight and LayerNorm bias gradients.

    The hidden activation is recomputed chunk by chunk from xn (as in the forward), and
    dxn = dh W1 accumulates in fp32 across the chunks, so the LayerNorm backward (a reduction
    over the whole row) runs once after the loop."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    chan_ok = chans < C
    tile_ok = row_ok[:, None] & chan_ok[None, :]
    if DROPOUT_HIDDEN or DROPOUT_OUT:
        seed = tl.load(seed_ptr)
    x_offsets = _token_offsets(rows, D1, stride_x0, stride_x1)[:, None] + chans[None, :] * stride_xc
    g_offsets = _token_offsets(rows, D1, stride_g0, stride_g1)[:, None] + chans[None, :] * stride_gc
    dense_offsets = rows.to(tl.int64)[:, None] * C + chans[None, :]
    partial_row = partial_ptr + pid.to(tl.int64) * (HIDDEN + 3 * C)

    tokens = token0 + rows
    # xn exactly as the forward formed it (same statistics, same expression, same rounding)
    mean = tl.load(stats_ptr + tokens, mask=row_ok, other=0.0)
    rstd = tl.load(stats_ptr + stats_cols + tokens, mask=row_ok, other=0.0)
    x = tl.load(x_ptr + x_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    xhat = tl.where(tile_ok, x - mean[:, None], 0.0) * rstd[:, None]
    gamma = tl.load(ln_w_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    xn = to_storage(xhat * gamma[None, :] + beta[None, :], xn_ptr.dtype.element_ty, ROUND_BF16)
    tl.store(xn_ptr + dense_offsets, xn, mask=tile_ok)

    # padded rows load grad 0, so every gradient below is 0 there
    dy = tl.load(grad_ptr + g_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    if DROPOUT_OUT:
        dy = tl.where(_keep(seed, tokens, chans, _STREAM_OUT, p_out), dy * scale_out, 0.0)
    dy_op = to_storage(dy, w2_ptr.dtype.element_ty, ROUND_BF16)
    if DROPOUT_OUT:
        tl.store(dy_ptr + dense_offsets, dy_op, mask=tile_ok)
    tl.store(partial_row + HIDDEN + chans, tl.sum(dy, axis=0), mask=chan_ok)

    dxn = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        hid = h0 + tl.arange(0, BLOCK_H)
        hid_ok = hid < HIDDEN
        chunk_ok = row_ok[:, None] & hid_ok[None, :]
        # W1^T chunk (BLOCK_C, BLOCK_H): element (k, n) = W1[n, k]; padded hidden columns get
        # pre = 0 and da = 0, so dh = 0 there
        w1t = tl.load(w1_ptr + hid[None, :] * C + chans[:, None], mask=chan_ok[:, None] & hid_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)
        pre = _mma(xn, w1t, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), FP32_DOT) + b1[None, :]
        # W2 chunk (BLOCK_C, BLOCK_H): element (c, n) = W2[c, n]
        w2 = tl.load(w2_ptr + chans[:, None] * HIDDEN + hid[None, :], mask=chan_ok[:, None] & hid_ok[None, :], other=0.0)
        d_act = _mma(dy_op, w2, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), FP32_DOT)
        # exact GELU and its derivative Phi(pre) + pre * phi(pre)
        act = gelu(pre)  # the forward's expression, so act is its second dot operand exactly
        d_gelu = gelu_derivative(pre)
        if DROPOUT_HIDDEN:
            keep = _keep(seed, tokens, hid, _STREAM_HIDDEN, p_hidden)
            act = tl.where(keep, act * scale_hidden, 0.0)
            d_act = tl.where(keep, d_act * scale_hidden, 0.0)
        hidden_offsets = rows.to(tl.int64)[:, None] * HIDDEN + hid[None, :]
        tl.store(act_ptr + hidden_offsets, to_storage(act, act_ptr.dtype.element_ty, ROUND_BF16), mask=chunk_ok)
        dh = d_act * d_gelu
        dh_op = to_storage(dh, dh_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(dh_ptr + hidden_offsets, dh_op, mask=chunk_ok)
        tl.store(partial_row + hid, tl.sum(dh, axis=0), mask=hid_ok)
        # W1 chunk (BLOCK_H, BLOCK_C): element (n, k) = W1[n, k]
        w1 = tl.load(w1_ptr + hid[:, None] * C + chans[None, :], mask=hid_ok[:, None] & chan_ok[None, :], other=0.0)
        dxn = _mma(dh_op, w1, dxn, FP32_DOT)

    # LayerNorm backward over the whole row, + the residual's grad. x and grad are re-read
    # (L2 hits) rather than kept live across the loop.
    x = tl.load(x_ptr + x_offsets, mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    xhat = tl.where(tile_ok, x - mean[:, None], 0.0) * rstd[:, None]
    gamma = tl.load(ln_w_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    dxhat = dxn * gamma[None, :]  # 0 on padded channels (gamma 0) and rows (dxn 0)
    mean_dxhat = tl.sum(dxhat, axis=1) / C
    mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / C
    dx = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
    dx += tl.load(grad_ptr + g_offsets, mask=tile_ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
    dx_ptrs = dx_ptr + _token_offsets(rows, D1, stride_d0, stride_d1)[:, None] + chans[None, :] * stride_dc
    tl.store(dx_ptrs, to_storage(dx, dx_ptr.dtype.element_ty, ROUND_BF16), mask=tile_ok)
    tl.store(partial_row + HIDDEN + C + chans, tl.sum(dxn * xhat, axis=0), mask=chan_ok)
    tl.store(partial_row + HIDDEN + 2 * C + chans, tl.sum(dxn, axis=0), mask=chan_ok)


# --------------------------------------------------------------------------------------------
# kernels B1 + B2: two matmuls through a (M, HIDDEN) buffer, for widths whose accumulator does
# not fit on chip
# --------------------------------------------------------------------------------------------


@triton.jit
def ff_up_kernel(
    x_ptr, extra_ptr, hidden_ptr, ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr,
    M, D1,
    stride_x0, stride_x1, stride_xc,
    M_extra, D1_extra, stride_e0, stride_e1, stride_ec,  # the second row set, coalesced the same way
    x_row_tiles, eps, seed_ptr, p_hidden, scale_hidden,
    C: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT_HIDDEN: tl.constexpr, FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """hidden[tokens, cols] = Dropout(GELU(LayerNorm(rows) @ W1^T + b1)) for a (BLOCK_M,
    BLOCK_N) tile of x's rows (row tiles [0, x_row_tiles)) or of extra's (the rest, tokens
    M + row); hidden is a contiguous (M + M_extra, HIDDEN) buffer in the input dtype, by token."""
    # axis 0 walks the output columns, so the programs that share one row tile run together
    pid_n = tl.program_id(0)
    x_rows, row_ok, tokens, stride_c = _row_set_tile(
        tl.program_id(1), x_row_tiles, x_ptr, extra_ptr, M, D1, stride_x0, stride_x1, stride_xc,
        M_extra, D1_extra, stride_e0, stride_e1, stride_ec, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if DROPOUT_HIDDEN:
        seed = tl.load(seed_ptr)
    col_ok = cols < HIDDEN
    acc = layernorm_matmul(x_rows, row_ok, stride_c, ln_w_ptr, ln_b_ptr, eps,
                           w1_ptr + cols * C, col_ok, C, BLOCK_K, True, True, FP32_DOT, ROUND_BF16)

    b1 = tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    act = gelu(acc + b1[None, :])
    if DROPOUT_HIDDEN:
        act = tl.where(_keep(seed, tokens, cols, _STREAM_HIDDEN, p_hidden), act * scale_hidden, 0.0)
    h_ptrs = hidden_ptr + tokens.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    tl.store(h_ptrs, to_storage(act, hidden_ptr.dtype.element_ty, ROUND_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def ff_up_backward_kernel(
    x_ptr, extra_ptr, dy_ptr, dh_ptr, act_ptr, ln_w_ptr, ln_b_ptr, w1_ptr, b1_ptr, w2_ptr,
    M, D1,
    stride_x0, stride_x1, stride_xc,
    M_extra, D1_extra, stride_e0, stride_e1, stride_ec,  # the second row set, coalesced the same way
    x_row_tiles, eps, seed_ptr, p_hidden, scale_hidden,
    C: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT_HIDDEN: tl.constexpr, FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """The two-kernel widths' backward through the hidden layer, for a (BLOCK_M, BLOCK_N) tile of
    tokens x hidden columns (the tiles and row sets of ff_up_kernel): pre = LayerNorm(rows) @
    W1^T + b1 recomputed as ff_up_kernel computes it, d_act = dy @ W2[:, cols] (dy: the gradient
    at the second Linear's output, contiguous (M + M_extra, C) by token), then

        act = Dropout(GELU(pre))                 the dW2 operand (ff_up_kernel's hidden, bitwise)
        dh  = d_act * keep * scale * GELU'(pre)  the dW1 and dxn operand

    both stored (M + M_extra, HIDDEN) by token in the input dtype. Two fp32 accumulators."""
    pid_n = tl.program_id(0)
    x_rows, row_ok, tokens, stride_c = _row_set_tile(
        tl.program_id(1), x_row_tiles, x_ptr, extra_ptr, M, D1, stride_x0, stride_x1, stride_xc,
        M_extra, D1_extra, stride_e0, stride_e1, stride_ec, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    pre = layernorm_matmul(x_rows, row_ok, stride_c, ln_w_ptr, ln_b_ptr, eps,
                           w1_ptr + cols * C, col_ok, C, BLOCK_K, True, True, FP32_DOT, ROUND_BF16)
    d_act = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dy_rows = dy_ptr + tokens.to(tl.int64) * C
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        dy = tl.load(dy_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W2 chunk (BLOCK_K, cols): W2 is (C, HIDDEN), element (k, n) = W2[k, n]
        w2 = tl.load(w2_ptr + ks[:, None] * HIDDEN + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        d_act = _mma(dy, w2, d_act, FP32_DOT)

    pre += tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = gelu(pre)
    dh = d_act * gelu_derivative(pre)
    if DROPOUT_HIDDEN:
        keep = _keep(tl.load(seed_ptr), tokens, cols, _STREAM_HIDDEN, p_hidden)
        act = tl.where(keep, act * scale_hidden, 0.0)
        dh = tl.where(keep, dh * scale_hidden, 0.0)
    offsets = tokens.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(act_ptr + offsets, to_storage(act, act_ptr.dtype.element_ty, ROUND_BF16), mask=ok)
    tl.store(dh_ptr + offsets, to_storage(dh, dh_ptr.dtype.element_ty, ROUND_BF16), mask=ok)


@triton.jit
def ff_down_kernel(
    hidden_ptr, x_ptr, out_ptr, extra_hidden_ptr, extra_ptr, extra_out_ptr, w2_ptr, b2_ptr,
    M, D1,
    stride_x0, stride_x1, stride_xc, stride_o0, stride_o1, stride_oc,
    M_extra, D1_extra,  # the second row set (residual extra -> extra_out), coalesced the same way
    stride_e0, stride_e1, stride_ec, stride_eo0, stride_eo1, stride_eoc,
    x_row_tiles, seed_ptr, p_out, scale_out,
    C: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT_OUT: tl.constexpr, FP32_DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr = True, STREAM: tl.constexpr = STREAM_OUT,
):
    """out[rows, chans] = Dropout(hidden @ W2^T + b2) + x for a (BLOCK_M, BLOCK_N) tile of x's
    rows (row tiles [0, x_row_tiles)), or extra_out = Dropout(extra_hidden @ W2^T + b2) + extra
    for one of extra's (the rest, tokens M + row: the dropout counters). hidden: contiguous
    (M, HIDDEN), extra_hidden contiguous (M_extra, HIDDEN), by row of their set (the feed-forward
    passes the two halves of its (M + M_extra, HIDDEN) buffer).

    Also the window attention's output projection (linear_dropout_residual: hidden = the
    attention output of the tokens, extra_hidden that of the register rows, HIDDEN = C, no
    bias)."""
    # axis 0 walks the output columns, so the programs that share one row tile run together
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    is_extra = pid_m >= x_row_tiles
    rows = tl.where(is_extra, pid_m - x_row_tiles, pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.where(is_extra, M_extra, M)
    tokens = rows + tl.where(is_extra, M, 0)
    chans = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if DROPOUT_OUT:
        seed = tl.load(seed_ptr)
    chan_ok = chans < C
    h_rows = tl.where(is_extra, extra_hidden_ptr, hidden_ptr) + rows.to(tl.int64)[:, None] * HIDDEN

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HIDDEN
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W2^T chunk (BLOCK_K, BLOCK_N): element (k, c) = W2[c, k]
        w2 = tl.load(w2_ptr + chans[None, :] * HIDDEN + ks[:, None], mask=k_ok[:, None] & chan_ok[None, :], other=0.0)
        acc = _mma(h, w2, acc, FP32_DOT)

    y = acc
    if HAS_BIAS:
        y += tl.load(b2_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    if DROPOUT_OUT:
        y = tl.where(_keep(seed, tokens, chans, STREAM, p_out), y * scale_out, 0.0)
    tile_ok = row_ok[:, None] & chan_ok[None, :]
    # the residual rows and the destination of this program's row set
    d1 = tl.where(is_extra, D1_extra, D1)
    src = tl.where(is_extra, extra_ptr, x_ptr)
    x_offsets = _token_offsets(rows, d1, tl.where(is_extra, stride_e0, stride_x0), tl.where(is_extra, stride_e1, stride_x1))
    x = tl.load(src + x_offsets[:, None] + chans[None, :] * tl.where(is_extra, stride_ec, stride_xc),
                mask=tile_ok, other=0.0)
    y += x.to(tl.float32)
    dst = tl.where(is_extra, extra_out_ptr, out_ptr)
    o_offsets = _token_offsets(rows, d1, tl.where(is_extra, stride_eo0, stride_o0), tl.where(is_extra, stride_eo1, stride_o1))
    out_ptrs = dst + o_offsets[:, None] + chans[None, :] * tl.where(is_extra, stride_eoc, stride_oc)
    tl.store(out_ptrs, to_storage(y, out_ptr.dtype.element_ty, ROUND_BF16), mask=tile_ok)


# --------------------------------------------------------------------------------------------
# dropout mask regeneration (backward)
# --------------------------------------------------------------------------------------------


@triton.jit
def ff_dropout_keep_kernel(
    keep_ptr, M, N, seed_ptr, p,
    STREAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """keep[row, col] (uint8, (M, N) contiguous) = 1 where the forward kept element (row, col)
    of dropout STREAM."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(seed_ptr), rows, cols, STREAM, p)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(keep_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.uint8), mask=ok)


@triton.jit
def ff_dropout_grad_kernel(
    grad_ptr, extra_grad_ptr, out_ptr, M, N, D1, stride_g0, stride_g1, stride_gc,
    M_extra, D1_extra, stride_e0, stride_e1, stride_ec,  # the second row set, coalesced the same way
    x_row_tiles, seed_ptr, p, scale,
    STREAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """out[token, col] (contiguous (M + M_extra, N), grad's dtype) = grad * keep * scale: the
    gradient through the forward's dropout STREAM (the mask regenerated, never stored). Row
    tiles [0, x_row_tiles) read grad (tokens 0..M-1), the rest extra_grad (tokens M + row), as
    ff_down_kernel numbers its two row sets; both (..., N) with rows coalesced to two leading
    dims."""
    pid_m = tl.program_id(0)
    is_extra = pid_m >= x_row_tiles
    rows = tl.where(is_extra, pid_m - x_row_tiles, pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = rows + tl.where(is_extra, M, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < tl.where(is_extra, M_extra, M))[:, None] & (cols < N)[None, :]
    offsets = _token_offsets(rows, tl.where(is_extra, D1_extra, D1), tl.where(is_extra, stride_e0, stride_g0),
                             tl.where(is_extra, stride_e1, stride_g1))
    src = tl.where(is_extra, extra_grad_ptr, grad_ptr)
    g = tl.load(src + offsets[:, None] + cols[None, :] * tl.where(is_extra, stride_ec, stride_gc),
                mask=ok, other=0.0).to(tl.float32)
    g = tl.where(_keep(tl.load(seed_ptr), tokens, cols, STREAM, p), g * scale, 0.0)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * N + cols[None, :],
             to_storage(g, out_ptr.dtype.element_ty, ROUND_BF16), mask=ok)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply in fp32 ("ieee"): fp32 inputs, and bf16 under the
    interpreter (its bf16 tl.dot is wrong, triton issue 11584)."""
    return dtype == torch.float32 or interpreter_upcasts_dot(dtype)


# One-pass kernel tiles by BLOCK_C = next_power_of_2(C), for fp16/bf16 (the header gives the
# resource report behind each entry). Wider layers, and fp32 (whose exact "ieee" dots run on
# FMA units with operands in registers), use the two-kernel path.
FUSED_MLP_TILES = {
    16: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=3),
    32: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=3),
    64: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=3),
    128: dict(BLOCK_M=64, BLOCK_H=64, num_warps=8, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_H=32, num_warps=8, num_stages=3),
}
UP_TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
DOWN_TILES = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
UP_TILES_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)
DOWN_TILES_FP32 = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
# ff_up_backward_kernel (two accumulators): see "Backward of the two-kernel widths" in the header
UP_BACKWARD_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
UP_BACKWARD_TILES_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)


# fp32 (exact "ieee" dots on the FMA units, operands in registers): one pass only up to C = 64,
# with 16-wide hidden chunks (header: the survey behind it).
FUSED_MLP_TILES_FP32 = {
    16: dict(BLOCK_M=64, BLOCK_H=16, num_warps=8, num_stages=2),
    32: dict(BLOCK_M=64, BLOCK_H=16, num_warps=8, num_stages=2),
    64: dict(BLOCK_M=64, BLOCK_H=16, num_warps=8, num_stages=2),
}


# Backward kernel tiles by BLOCK_C (header, "Backward": the resource report behind them). The
# backward exists for the widths whose forward is one pass.
BACKWARD_TILES = {
    16: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=2),
    32: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=2),
    64: dict(BLOCK_M=64, BLOCK_H=32, num_warps=4, num_stages=2),
    128: dict(BLOCK_M=64, BLOCK_H=32, num_warps=8, num_stages=2),
    256: dict(BLOCK_M=32, BLOCK_H=32, num_warps=8, num_stages=2),
}
BACKWARD_TILES_FP32 = {
    16: dict(BLOCK_M=32, BLOCK_H=16, num_warps=4, num_stages=2),
    32: dict(BLOCK_M=32, BLOCK_H=16, num_warps=4, num_stages=2),
    64: dict(BLOCK_M=32, BLOCK_H=16, num_warps=4, num_stages=2),
}


def backward_config(C: int, dtype: torch.dtype) -> dict | None:
    """Tiles of the backward kernel for width C, or None where the op layer's recompute
    backward is used (the two-kernel widths)."""
    tiles = BACKWARD_TILES_FP32 if dtype == torch.float32 else BACKWARD_TILES
    return tiles.get(triton.next_power_of_2(C))


def fused_mlp_config(C: int, dtype: torch.dtype) -> dict | None:
    """Tiles of the one-pass kernel for width C, or None where the two-kernel path is used."""
    tiles = FUSED_MLP_TILES_FP32 if dtype == torch.float32 else FUSED_MLP_TILES
    return tiles.get(triton.next_power_of_2(C))


def _default_fused_config(C: int) -> dict:
    # a forced one-pass launch outside the table (tests of the one-pass kernel at any width)
    return dict(BLOCK_M=32, BLOCK_H=32, num_warps=4, num_stages=2)


def two_pass_configs(C: int, hidden: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Tiles of (ff_up_kernel, ff_down_kernel)."""
    if dtype == torch.float32:
        return UP_TILES_FP32, DOWN_TILES_FP32
    return UP_TILES, DOWN_TILES


def _coalesce_leading(shape, *strides):
    """Merge adjacent leading dims that are one run of memory in every tensor (size-1 dims
    dropped), keeping row-major order. Returns (sizes, [strides per tensor])."""
    sizes, merged = [], [[] for _ in strides]
    for i, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(m[-1] == s[i] * size for m, s in zip(merged, strides)):
            sizes[-1] *= size
            for m, s in zip(merged, strides):
                m[-1] = s[i]
            continue
        sizes.append(size)
        for m, s in zip(merged, strides):
            m.append(s[i])
    return sizes, merged


def _two_leading(sizes, strides):
    """(D1, stride0, stride1) for a coalesced layout of at most two leading dims."""
    if len(sizes) == 0:
        return 1, 0, 0
    if len(sizes) == 1:
        return sizes[0], 0, strides[0]
    return sizes[1], strides[0], strides[1]


def _check_params(x, ln_weight, ln_bias, w1, b1, w2, b2=None):
    C = x.shape[-1]
    hidden = w1.shape[0]
    expected = {
        "ln_weight": (ln_weight, (C,)), "ln_bias": (ln_bias, (C,)), "w1": (w1, (hidden, C)),
        "b1": (b1, (hidden,)), "w2": (w2, (C, hidden)), "b2": (b2, (C,)),
    }
    for name, (t, shape) in expected.items():
        if t is None:  # b2: not an input of the backward
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} for width {C}, hidden {hidden}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def _io_layout(src: torch.Tensor, dst: torch.Tensor):
    """Leading dims of a row set's input and output, coalesced jointly to at most two:
    ``(src, dst, D1, (s0, s1, sc), (d0, d1, dc))``, where src / dst are the tensors the kernel
    uses (contiguous copies when the leading dims do not coalesce; never for the model's
    channels-last views and register rows)."""
    sizes, (ss, sd) = _coalesce_leading(src.shape[:-1], src.stride()[:-1], dst.stride()[:-1])
    if len(sizes) > 2:
        src = src.contiguous()
        dst = dst if dst.is_contiguous() else torch.empty_like(src, memory_format=torch.contiguous_format)
        sizes, (ss, sd) = _coalesce_leading(src.shape[:-1], src.stride()[:-1], dst.stride()[:-1])
    D1, s0, s1 = _two_leading(sizes, ss)
    _, d0, d1 = _two_leading(sizes, sd)
    return src, dst, D1, (s0, s1, src.stride(-1)), (d0, d1, dst.stride(-1))


def _check_out(out, x, name):
    if out is None:
        return torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; its input is "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    return out


def feedforward_residual(
    x: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    p_hidden: float = 0.0, p_out: float = 0.0, seed=None,
    out: torch.Tensor | None = None, path: str | None = None, stats: torch.Tensor | None = None,
    extra: torch.Tensor | None = None, extra_out: torch.Tensor | None = None,
):
    """``Dropout_out(Linear2(Dropout_hidden(GELU(Linear1(LayerNorm(x)))))) + x`` per token.

    x is (..., C) with any strides; the result (``out``, or a new tensor laid out like x) has the
    same shape. ``out`` may be ``x`` itself (in place): each output tile is written by the
    program that last reads the same x tile. Dropout keeps element (token, column) of each
    stream by philox(seed; column, token, stream); token is the row-major index over x's leading
    dims. ``path`` forces "fused" (hidden on chip) or "two_pass"; None picks by width.

    ``extra`` (..., C), any leading shape and strides: a second row set through the same
    feed-forward in the same launch(es) (the block step's register rows next to its tokens);
    its tokens are numbered after x's (M + row-major index), so the dropout masks of the two
    sets are those of one call on their concatenation. Its result goes to ``extra_out`` (or a
    new tensor laid out like extra; may be extra itself), and the call returns
    ``(out, extra_out)``; without ``extra`` it returns ``out``.

    ``stats`` (one-pass kernel only): a contiguous fp32 (2, M + M_extra) tensor that receives
    the LayerNorm mean and rstd of every token, by token index, for
    :func:`feedforward_residual_backward`.
    """
    _check_params(x, ln_weight, ln_bias, w1, b1, w2, b2)
    C = x.shape[-1]
    hidden = w1.shape[0]
    out = _check_out(out, x, "out")
    if extra is not None:
        if extra.shape[-1:] != x.shape[-1:] or extra.dtype != x.dtype or extra.device != x.device:
            raise ValueError(f"extra is {tuple(extra.shape)} {extra.dtype} on {extra.device}; x is "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        extra_out = _check_out(extra_out, extra, "extra_out")
    elif extra_out is not None:
        raise ValueError("extra_out without extra")
    result = out if extra is None else (out, extra_out)
    M = x.numel() // C if C else 0
    M_extra = extra.numel() // C if extra is not None and C else 0
    if M + M_extra == 0:
        return result
    if M + M_extra >= 2**31:
        raise ValueError(f"{M + M_extra} tokens: at most 2**31 - 1 per call")
    dropout = _dropout_args(p_hidden, p_out, seed, w2)
    if stats is not None:
        _check_stats(stats, M + M_extra, x.device)

    kernel_x, kernel_out, D1, (sx0, sx1, sxc), (so0, so1, soc) = _io_layout(x, out)
    if extra is not None:
        kernel_e, kernel_eo, D1_e, (se0, se1, sec), (seo0, seo1, seoc) = _io_layout(extra, extra_out)
    else:  # no second row set: no program reads these
        kernel_e, kernel_eo, D1_e, (se0, se1, sec), (seo0, seo1, seoc) = kernel_x, kernel_out, 1, (0, 0, sxc), (0, 0, soc)
    two_sets = (M_extra, D1_e, se0, se1, sec, seo0, seo1, seoc)

    ln_weight, ln_bias, w1, b1, w2, b2 = (t.contiguous() for t in (ln_weight, ln_bias, w1, b1, w2, b2))
    use_fp32_dot = fp32_dot(x.dtype)
    round_bf16 = INTERPRET and x.dtype == torch.bfloat16

    fused_cfg = fused_mlp_config(C, x.dtype)
    if path is None:
        path = "fused" if fused_cfg is not None else "two_pass"
    if stats is not None and path != "fused":
        raise ValueError("only the one-pass kernel writes the LayerNorm statistics (stats=)")
    if path == "fused":
        cfg = dict(fused_cfg or _default_fused_config(C))
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        x_programs = triton.cdiv(M, cfg["BLOCK_M"])
        grid = (x_programs + triton.cdiv(M_extra, cfg["BLOCK_M"]),)
        ff_fused_mlp_kernel[grid](
            kernel_x, kernel_out, kernel_e, kernel_eo, ln_weight, ln_bias, w1, b1, w2, b2,
            x if stats is None else stats,
            M, D1, sx0, sx1, sxc, so0, so1, soc, *two_sets, x_programs,
            float(eps), dropout["seed"], dropout["p_hidden"], dropout["p_out"],
            dropout["scale_hidden"], dropout["scale_out"],
            C=C, HIDDEN=hidden, BLOCK_C=triton.next_power_of_2(C), **cfg,
            DROPOUT_HIDDEN=p_hidden > 0, DROPOUT_OUT=p_out > 0, WRITE_STATS=stats is not None,
            FP32_DOT=use_fp32_dot, ROUND_BF16=round_bf16,
            num_warps=num_warps, num_stages=num_stages,
        )
    elif path == "two_pass":
        up_cfg, down_cfg = (dict(c) for c in two_pass_configs(C, hidden, x.dtype))
        # the hidden activation of both row sets, by token (x's rows, then extra's)
        hidden_buf = torch.empty((M + M_extra, hidden), dtype=x.dtype, device=x.device)
        nw, ns = up_cfg.pop("num_warps"), up_cfg.pop("num_stages")
        x_row_tiles = triton.cdiv(M, up_cfg["BLOCK_M"])
        grid = (triton.cdiv(hidden, up_cfg["BLOCK_N"]), x_row_tiles + triton.cdiv(M_extra, up_cfg["BLOCK_M"]))
        ff_up_kernel[grid](
            kernel_x, kernel_e, hidden_buf, ln_weight, ln_bias, w1, b1,
            M, D1, sx0, sx1, sxc, M_extra, D1_e, se0, se1, sec, x_row_tiles,
            float(eps), dropout["seed"], dropout["p_hidden"], dropout["scale_hidden"],
            C=C, HIDDEN=hidden, **up_cfg, DROPOUT_HIDDEN=p_hidden > 0, FP32_DOT=use_fp32_dot, ROUND_BF16=round_bf16,
            num_warps=nw, num_stages=ns,
        )
        nw, ns = down_cfg.pop("num_warps"), down_cfg.pop("num_stages")
        x_row_tiles = triton.cdiv(M, down_cfg["BLOCK_M"])
        grid = (triton.cdiv(C, down_cfg["BLOCK_N"]), x_row_tiles + triton.cdiv(M_extra, down_cfg["BLOCK_M"]))
        ff_down_kernel[grid](
            hidden_buf, kernel_x, kernel_out, hidden_buf[M:] if M_extra else hidden_buf, kernel_e, kernel_eo, w2, b2,
            M, D1, sx0, sx1, sxc, so0, so1, soc, *two_sets, x_row_tiles,
            dropout["seed"], dropout["p_out"], dropout["scale_out"],
            C=C, HIDDEN=hidden, **down_cfg, DROPOUT_OUT=p_out > 0, FP32_DOT=use_fp32_dot, ROUND_BF16=round_bf16,
            HAS_BIAS=True, STREAM=STREAM_OUT, num_warps=nw, num_stages=ns,
        )
    else:
        raise ValueError(f"path must be 'fused', 'two_pass' or None, got {path!r}")
    if kernel_out is not out:
        out.copy_(kernel_out)
    if extra is not None and kernel_eo is not extra_out:
        extra_out.copy_(kernel_eo)
    return result


def up_backward_config(dtype: torch.dtype) -> dict:
    """Tiles of ff_up_backward_kernel."""
    return UP_BACKWARD_TILES_FP32 if dtype == torch.float32 else UP_BACKWARD_TILES


def feedforward_hidden_backward(
    x: torch.Tensor, dy: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, p_hidden: float = 0.0, seed=None,
    extra: torch.Tensor | None = None, out: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, act) of the feed-forward's hidden layer for tokens x (..., C) and, numbered after
    them, ``extra`` (the two-kernel path's two row sets), in one launch of
    ff_up_backward_kernel: act = Dropout_hidden(GELU(LayerNorm(x) @ W1^T + b1)) (recomputed,
    the same mask: stream STREAM_HIDDEN of ``seed``) and dh = d(loss)/d(LayerNorm(x) @ W1^T +
    b1) from ``dy``, the gradient at the second Linear's output, contiguous (M + M_extra, C) by
    token. Both (M + M_extra, 4C) in x's dtype; ``out``: two preallocated such tensors."""
    _check_params(x, ln_weight, ln_bias, w1, b1, w2)
    C, hidden = x.shape[-1], w1.shape[0]
    if extra is not None and (extra.shape[-1:] != x.shape[-1:] or extra.dtype != x.dtype or extra.device != x.device):
        raise ValueError(f"extra is {tuple(extra.shape)} {extra.dtype} on {extra.device}; x is "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    M = x.numel() // C if C else 0
    M_extra = extra.numel() // C if extra is not None and C else 0
    if dy.shape != (M + M_extra, C) or dy.dtype != x.dtype or not dy.is_contiguous() or dy.device != x.device:
        raise ValueError(f"dy must be a contiguous ({M + M_extra}, {C}) {x.dtype} tensor on {x.device}, got "
                         f"{tuple(dy.shape)} {dy.dtype} on {dy.device}")
    if out is None:
        out = tuple(torch.empty((M + M_extra, hidden), dtype=x.dtype, device=x.device) for _ in range(2))
    elif len(out) != 2 or any(t.shape != (M + M_extra, hidden) or t.dtype != x.dtype or not t.is_contiguous()
                               for t in out):
        raise ValueError(f"out must be two contiguous ({M + M_extra}, {hidden}) {x.dtype} tensors (dh, act)")
    dh, act = out
    if M + M_extra == 0 or hidden == 0:
        return dh, act
    if M + M_extra >= 2**31:
        raise ValueError(f"{M + M_extra} tokens: at most 2**31 - 1 per call")
    dropout = _dropout_args(p_hidden, 0.0, seed, w2)
    kernel_x, _, D1, (sx0, sx1, sxc), _ = _io_layout(x, x)
    if extra is not None:
        kernel_e, _, D1_e, (se0, se1, sec), _ = _io_layout(extra, extra)
    else:  # no second row set: no program reads these
        kernel_e, D1_e, (se0, se1, sec) = kernel_x, 1, (0, 0, sxc)
    ln_weight, ln_bias, w1, b1, w2 = (t.contiguous() for t in (ln_weight, ln_bias, w1, b1, w2))
    cfg = dict(up_backward_config(x.dtype))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    x_row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    grid = (triton.cdiv(hidden, cfg["BLOCK_N"]), x_row_tiles + triton.cdiv(M_extra, cfg["BLOCK_M"]))
    ff_up_backward_kernel[grid](
        kernel_x, kernel_e, dy, dh, act, ln_weight, ln_bias, w1, b1, w2,
        M, D1, sx0, sx1, sxc, M_extra, D1_e, se0, se1, sec, x_row_tiles,
        float(eps), dropout["seed"], dropout["p_hidden"], dropout["scale_hidden"],
        C=C, HIDDEN=hidden, **cfg, DROPOUT_HIDDEN=p_hidden > 0, FP32_DOT=fp32_dot(x.dtype),
        ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16, num_warps=nw, num_stages=ns,
    )
    return dh, act


def _check_stats(stats, M, device, at_least=False):
    """stats: contiguous fp32 (2, M), or (2, >= M) with ``at_least`` (the backward of one row
    set reads its tokens' columns of the whole call's statistics)."""
    cols_ok = stats.ndim == 2 and (stats.shape[1] >= M if at_least else stats.shape[1] == M)
    if not cols_ok or stats.shape[0] != 2 or stats.dtype != torch.float32 or not stats.is_contiguous() \
            or stats.device != device:
        raise ValueError(f"stats must be a contiguous float32 (2, {'>= ' if at_least else ''}{M}) tensor on {device}, "
                         f"got {stats.dtype} {tuple(stats.shape)} on {stats.device}")


def _dropout_args(p_hidden, p_out, seed, placeholder):
    if not (0.0 <= p_hidden <= 1.0 and 0.0 <= p_out <= 1.0):
        raise ValueError(f"dropout probabilities must be in [0, 1], got {p_hidden}, {p_out}")
    return dict(
        seed=seed_pointer(seed, p_hidden > 0 or p_out > 0, placeholder),
        p_hidden=float(p_hidden), scale_hidden=1.0 / (1.0 - p_hidden) if p_hidden < 1.0 else 0.0,
        p_out=float(p_out), scale_out=1.0 / (1.0 - p_out) if p_out < 1.0 else 0.0,
    )


def feedforward_residual_backward(
    x: torch.Tensor, grad: torch.Tensor, stats: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    p_hidden: float = 0.0, p_out: float = 0.0, seed=None, out: tuple | None = None, token0: int = 0,
):
    """The backward kernel of :func:`feedforward_residual` (one-pass widths): given x, the
    gradient ``grad`` of the output and the forward's LayerNorm statistics (``stats``), returns

    ``(dx, xn, dy, act, dh, partials)``: dx (x's shape and layout, or ``dx``) = d x including the
    residual; xn (M, C), the normalised input (dot operand dtype); dy (M, C) = grad through the
    output dropout (None without output dropout: then dy is grad); act (M, hidden), the dropped
    GELU output; dh (M, hidden), d of the first Linear's output; partials (tiles, hidden + 3C)
    fp32, per row tile the column sums of [dh | dy | dxn * xhat | dxn]: summed over tiles they
    are the gradients of b1, b2, the LayerNorm weight and bias. The weight gradients are
    dW1 = dh^T xn and dW2 = dy^T act (left to a matmul library). ``out``: those six tensors
    preallocated (shapes and dtypes as returned; dy None without output dropout).

    ``token0``: x's first token index in the forward call (0, or M for the ``extra`` row set
    of a two-set forward): its dropout counters and its statistics columns start there
    (``stats`` is the call's (2, tokens) tensor).
    """
    _check_params(x, ln_weight, ln_bias, w1, b1, w2)
    C, hidden = x.shape[-1], w1.shape[0]
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"grad is {tuple(grad.shape)} {grad.dtype} on {grad.device}; x is {tuple(x.shape)} {x.dtype} on {x.device}")
    cfg = backward_config(C, x.dtype)
    if cfg is None:
        raise ValueError(f"no backward kernel for width {C} in {x.dtype} (the two-kernel widths)")
    M = x.numel() // C if C else 0
    if token0 < 0:
        raise ValueError(f"token0 must be >= 0, got {token0}")
    _check_stats(stats, token0 + M, x.device, at_least=True)
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    shapes = dict(dx=(x.shape, x.dtype), xn=((M, C), x.dtype), dy=((M, C), x.dtype) if p_out > 0 else None,
                  act=((M, hidden), x.dtype), dh=((M, hidden), x.dtype),
                  partials=((tiles, hidden + 3 * C), torch.float32))
    if out is None:
        out = [None if sd is None else torch.empty(sd[0], dtype=sd[1], device=x.device) for sd in shapes.values()]
        out[0] = torch.empty_like(x)  # dx laid out like x
    for (name, sd), t in zip(shapes.items(), out):
        if (sd is None) != (t is None) or (t is not None and (
                t.shape != sd[0] or t.dtype != sd[1] or t.device != x.device or (name != "dx" and not t.is_contiguous()))):
            raise ValueError(f"out {name}: expected {'None' if sd is None else (tuple(sd[0]), sd[1])}, got "
                             f"{None if t is None else (tuple(t.shape), t.dtype, t.device, t.stride())}")
    dx, xn, dy, act, dh, partials = out
    if M == 0:
        return dx, xn, dy, act, dh, partials

    kernel_x, kernel_g, kernel_dx = x, grad, dx
    strides = (x.stride()[:-1], grad.stride()[:-1], dx.stride()[:-1])
    sizes, (sx, sg, sd) = _coalesce_leading(x.shape[:-1], *strides)
    if len(sizes) > 2:
        kernel_x, kernel_g = x.contiguous(), grad.contiguous()
        kernel_dx = dx if dx.is_contiguous() else torch.empty_like(x, memory_format=torch.contiguous_format)
        strides = (kernel_x.stride()[:-1], kernel_g.stride()[:-1], kernel_dx.stride()[:-1])
        sizes, (sx, sg, sd) = _coalesce_leading(x.shape[:-1], *strides)
    D1, stride_x0, stride_x1 = _two_leading(sizes, sx)
    _, stride_g0, stride_g1 = _two_leading(sizes, sg)
    _, stride_d0, stride_d1 = _two_leading(sizes, sd)

    ln_weight, ln_bias, w1, b1, w2 = (t.contiguous() for t in (ln_weight, ln_bias, w1, b1, w2))
    dropout = _dropout_args(p_hidden, p_out, seed, w2)
    ff_fused_mlp_backward_kernel[(tiles,)](
        kernel_x, kernel_g, kernel_dx, stats, ln_weight, ln_bias, w1, b1, w2,
        xn, xn if dy is None else dy, act, dh, partials,
        M, D1, stride_x0, stride_x1, kernel_x.stride(-1), stride_g0, stride_g1, kernel_g.stride(-1),
        stride_d0, stride_d1, kernel_dx.stride(-1), token0, stats.shape[1],
        dropout["seed"], dropout["p_hidden"], dropout["p_out"], dropout["scale_hidden"], dropout["scale_out"],
        C=C, HIDDEN=hidden, BLOCK_C=triton.next_power_of_2(C), **cfg,
        DROPOUT_HIDDEN=p_hidden > 0, DROPOUT_OUT=p_out > 0,
        FP32_DOT=fp32_dot(x.dtype), ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if kernel_dx is not dx:
        dx.copy_(kernel_dx)
    return dx, xn, dy, act, dh, partials


def dropout_keep_mask(M: int, N: int, p: float, seed, stream: int, device) -> torch.Tensor:
    """The (M, N) bool keep mask the forward kernels used for dropout ``stream``
    (STREAM_HIDDEN: N = hidden width, STREAM_OUT: N = C)."""
    keep = torch.empty((M, N), dtype=torch.uint8, device=device)
    if M and N:
        BLOCK_M, BLOCK_N = 32, 64
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        ff_dropout_keep_kernel[grid](keep, M, N, seed_pointer(seed, True, keep), float(p), STREAM=stream, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return keep.view(torch.bool)


# --------------------------------------------------------------------------------------------
# shared launcher: matmul + dropout + residual (ff_down_kernel), and the dropout gradient
# --------------------------------------------------------------------------------------------

# ff_down_kernel tiles for linear_dropout_residual by output width (K = N in the attention's
# projection): 64-wide column tiles at N = 64 (a 128-wide tile would be half masked), else the
# feed-forward's down-projection tiles. Resource report with the second row set in use (the
# register rows; HAS_BIAS off, dropout on; Triton 3.9, maxvit_fast.aot, ``pytest
# tests/test_output_projection.py -k compile -s``), registers sm_80 / sm_90, STACK = LOCAL = 0
# in every entry, HMMA on sm_80 and HGMMA on sm_90 for fp16/bf16:
#   C = 64   64x64x64, 4 warps, 3 stages    fp16/bf16 130-131 / 101    fp32 (64x32x32, 4 warps) 80 / 80
#   C = 128-512  64x128x64, 8 warps, 3 st.  fp16 168-170 / 80, bf16 168 / 80    fp32 80 / 80
# (one row set per launch, before: C = 64 129 / 103, C = 128-512 168-173 / 80, fp32 80-96 / 80)
# ff_dropout_grad_kernel (32 x 64 tile, 4 warps, two row sets): 68 / 50 registers (fp32 64 / 51;
# one set: 71 / 56, fp32 63 / 51), no spills.
PROJECTION_TILES_N64 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def linear_dropout_residual_config(N: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(DOWN_TILES_FP32)
    return dict(PROJECTION_TILES_N64 if N <= 64 else DOWN_TILES)


def _row_layout(t: torch.Tensor, *others: torch.Tensor):
    """(t, D1, (stride0, stride1)) of t's leading dims coalesced jointly with ``others``' (same
    leading shape) to at most two; t made contiguous where they do not coalesce (never for the
    model's channels-last maps and expanded register rows)."""
    sizes, (st, *_) = _coalesce_leading(t.shape[:-1], t.stride()[:-1], *(o.stride()[:-1] for o in others))
    if len(sizes) > 2:
        t = t.contiguous()
        sizes, (st, *_) = _coalesce_leading(t.shape[:-1], t.stride()[:-1], *(o.stride()[:-1] for o in others))
    D1, s0, s1 = _two_leading(sizes, st)
    return t, D1, (s0, s1)


def _matmul_rows(a: torch.Tensor, K_: int) -> torch.Tensor:
    rows = a.reshape(-1, K_)
    return rows if rows.is_contiguous() else rows.contiguous()


def linear_dropout_residual(
    a: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, p: float = 0.0, seed=None,
    stream: int = STREAM_OUT, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    a_extra: torch.Tensor | None = None, residual_extra: torch.Tensor | None = None,
    extra_out: torch.Tensor | None = None,
):
    """``Dropout(a @ weight^T + bias) + residual`` per row, one ff_down_kernel launch.

    a (..., K) (rows made contiguous if they are not), weight (N, K), residual (..., N) with any
    strides (the same leading shape as a). Dropout keeps element (row, column) by
    philox(seed; column, row, ``stream``), row = the row-major index over the leading dims (the
    feed-forward's counter formula; :func:`dropout_grad` regenerates it). Returns ``out`` or a
    new contiguous (..., N) tensor.

    ``a_extra`` (..., K) with ``residual_extra`` (..., N) (any strides, e.g. shared rows expanded
    with stride 0): a second row set in the same launch, its rows numbered after a's (row = M +
    row-major index over its leading dims: the dropout counters, so its masks are those of one
    call on the concatenation and never repeat a's). Its result goes to ``extra_out`` (contiguous)
    or a new tensor, and the call returns ``(out, extra_out)``."""
    K_, N = a.shape[-1], weight.shape[0]
    if weight.shape != (N, K_) or residual.shape[:-1] != a.shape[:-1] or residual.shape[-1] != N:
        raise ValueError(f"a {tuple(a.shape)}, weight {tuple(weight.shape)}, residual {tuple(residual.shape)}: "
                         "expected (..., K), (N, K), (..., N)")
    if (a_extra is None) != (residual_extra is None):
        raise ValueError("a_extra and residual_extra come together")
    if a_extra is None and extra_out is not None:
        raise ValueError("extra_out without a_extra")
    if a_extra is not None and (a_extra.shape[-1] != K_ or residual_extra.shape[:-1] != a_extra.shape[:-1]
                                or residual_extra.shape[-1] != N):
        raise ValueError(f"a_extra {tuple(a_extra.shape)}, residual_extra {tuple(residual_extra.shape)}: expected "
                         f"(..., {K_}), (..., {N})")
    for name, t in (("weight", weight), ("residual", residual), ("bias", bias), ("out", out), ("a_extra", a_extra),
                    ("residual_extra", residual_extra), ("extra_out", extra_out)):
        if t is not None and (t.dtype != a.dtype or t.device != a.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; a is {a.dtype} on {a.device}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"a must be float16, bfloat16 or float32, got {a.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")

    def output(t, res, name):
        if t is None:
            return torch.empty(res.shape, dtype=a.dtype, device=a.device)
        if t.shape != res.shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {tuple(res.shape)} tensor, got {tuple(t.shape)}")
        return t

    out = output(out, residual, "out")
    extra = a_extra is not None
    if extra:
        extra_out = output(extra_out, residual_extra, "extra_out")
    result = (out, extra_out) if extra else out
    M = a.numel() // K_ if K_ else 0
    M_extra = a_extra.numel() // K_ if extra and K_ else 0
    if M + M_extra == 0 or N == 0:
        return result
    if M + M_extra >= 2**31:
        raise ValueError(f"{M + M_extra} rows: at most 2**31 - 1 per call")
    rows = _matmul_rows(a, K_)
    residual, D1, (stride_r0, stride_r1) = _row_layout(residual, out)
    _, _, (stride_o0, stride_o1) = _row_layout(out, residual)
    if extra:
        rows_e = _matmul_rows(a_extra, K_)
        residual_e, D1_e, (stride_e0, stride_e1) = _row_layout(residual_extra, extra_out)
        _, _, (stride_eo0, stride_eo1) = _row_layout(extra_out, residual_e)
        out_e = extra_out
    else:  # no second row set: no program reads these
        rows_e, residual_e, out_e, D1_e, stride_e0, stride_e1, stride_eo0, stride_eo1 = rows, residual, out, 1, 0, 0, 0, 0
    dropout = _dropout_args(0.0, p, seed, weight)
    cfg = linear_dropout_residual_config(N, a.dtype)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    x_row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), x_row_tiles + triton.cdiv(M_extra, cfg["BLOCK_M"]))
    ff_down_kernel[grid](
        rows, residual, out, rows_e, residual_e, out_e, weight.contiguous(),
        weight if bias is None else bias.contiguous(),
        M, D1, stride_r0, stride_r1, residual.stride(-1), stride_o0, stride_o1, out.stride(-1),
        M_extra, D1_e, stride_e0, stride_e1, residual_e.stride(-1), stride_eo0, stride_eo1, out_e.stride(-1),
        x_row_tiles, dropout["seed"], dropout["p_out"], dropout["scale_out"],
        C=N, HIDDEN=K_, **cfg, DROPOUT_OUT=p > 0, FP32_DOT=fp32_dot(a.dtype),
        ROUND_BF16=INTERPRET and a.dtype == torch.bfloat16, HAS_BIAS=bias is not None, STREAM=stream,
        num_warps=nw, num_stages=ns,
    )
    return result


def dropout_grad(grad: torch.Tensor, p: float, seed, stream: int = STREAM_OUT,
                 out: torch.Tensor | None = None, grad_extra: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * keep * 1/(1-p)`` as a contiguous (rows, N) tensor in grad's dtype, keep the mask
    the forward kernels drew for dropout ``stream`` (rows = the row-major index over grad's
    leading dims). ``grad_extra`` (..., N): the gradient of a second row set numbered after
    grad's rows (``linear_dropout_residual``'s ``a_extra``), in the same launch; its rows follow
    grad's in the (M + M_extra, N) result. One launch; the mask is regenerated, not stored."""
    N = grad.shape[-1]
    if grad_extra is not None and (grad_extra.shape[-1] != N or grad_extra.dtype != grad.dtype
                                   or grad_extra.device != grad.device):
        raise ValueError(f"grad_extra is {tuple(grad_extra.shape)} {grad_extra.dtype} on {grad_extra.device}; grad "
                         f"is {tuple(grad.shape)} {grad.dtype} on {grad.device}")
    M = grad.numel() // N if N else 0
    M_extra = grad_extra.numel() // N if grad_extra is not None and N else 0
    if out is None:
        out = torch.empty((M + M_extra, N), dtype=grad.dtype, device=grad.device)
    elif out.shape != (M + M_extra, N) or out.dtype != grad.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({M + M_extra}, {N}) {grad.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if M + M_extra == 0 or N == 0:
        return out
    if M + M_extra >= 2**31:
        raise ValueError(f"{M + M_extra} rows: at most 2**31 - 1 per call")
    grad, D1, (stride_g0, stride_g1) = _row_layout(grad)
    if grad_extra is not None:
        grad_e, D1_e, (stride_e0, stride_e1) = _row_layout(grad_extra)
    else:  # no second row set: no program reads these
        grad_e, D1_e, stride_e0, stride_e1 = grad, 1, 0, 0
    dropout = _dropout_args(0.0, p, seed, grad)
    BLOCK_M, BLOCK_N = 32, 64
    x_row_tiles = triton.cdiv(M, BLOCK_M)
    grid = (x_row_tiles + triton.cdiv(M_extra, BLOCK_M), triton.cdiv(N, BLOCK_N))
    ff_dropout_grad_kernel[grid](
        grad, grad_e, out, M, N, D1, stride_g0, stride_g1, grad.stride(-1),
        M_extra, D1_e, stride_e0, stride_e1, grad_e.stride(-1), x_row_tiles,
        dropout["seed"], float(p), dropout["scale_out"],
        STREAM=stream, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ROUND_BF16=INTERPRET and grad.dtype == torch.bfloat16,
    )
    return out
