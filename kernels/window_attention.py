"""Window attention core of the MaxViT block and grid steps (forward and backward).

What runs here, per window and head: gather the window's q/k/v rows straight from the
(B, H, W, 3C) qkv map by index arithmetic (pattern "block": pixel (X*w + a, Y*w + b); "grid":
pixel (a*nX + X, b*nY + Y)) plus the r register rows from a small (Breg, r, Creg) tensor, add the
relative-position bias gathered from the ((2w-1)^2 + 1, heads) table, softmax, attention dropout,
P @ V, and write each head's output straight to its pixel. The backward recomputes S and P from
q, k and the saved row logsumexp. Nothing per window is materialised in memory: no partition
copies, no (heads, n, n) bias, no probabilities.

Fusion decision (what is fused here, what runs before and after, and why):
- LayerNorm and the qkv projection run before this kernel, in ONE Triton launch for the tokens
  and the register rows together (kernels/layernorm_linear.py: LayerNorm as the prologue of the
  matmul, the normalised rows never written): the whole (B, H, W, C) map -> (B, H, W, 3C), and
  the register rows once per block (block step: the r shared rows, q/k/v) or once per image
  (grid step: r rows per image, k/v only) -> (1 or B, r, 3C or 2C), read here through
  reg_q_off / reg_k_off / reg_v_off. Not inside this kernel: every window would project the same
  register rows again (once per window instead of once per block or image), and each program
  would need the C x 3C weight (C = 512 at MaxViT-T: 1.5 MiB in bf16, far over shared memory),
  i.e. a K-loop GEMM per window tile re-reading the weight for 53 rows, for no saving over one
  GEMM that writes qkv once (3C per token) and this kernel reading it once.
- Fused here: window partition + register prepend + bias gather + masked softmax + dropout +
  P @ V + scatter back to pixels (forward); recompute + dropout mask + dV, dP, dS, dQ, dK +
  register-row and bias-table partial sums (backward).
- The output projection and the residual add are one cuBLAS call in the caller (addmm with the
  residual as input, beta = 1), and for the block step's register rows one baddbmm (the shared
  (1, r, C) rows as the broadcast input, the weight expanded over the windows); the output
  dropout, when training, is torch's.

Tiles: the whole sequence n = r + w*w sits in one key tile BLOCK_N = next_pow2(n) (16..128), so the
softmax is a plain max-subtracted softmax (no online rescaling); queries are split into BLOCK_M <= 64
row tiles (grid axis 2). A forward program handles one head and query tile of a group of
consecutive windows (about 4096 programs in all; not tuned), gathering the bias tile once and
holding it in the table's dtype (re-gathering it per window cost ~75 more registers on sm_80: the
64-bit addresses of a 64 x 64 gather). These one-tile kernels serve n <= 128, i.e. every w <= 10 with
r <= 16 and w = 11 with r <= 7; longer sequences (up to MAX_LONG_SEQ = 640: w = 12, 14, 16, ...) run
the key-loop kernels described under "Long sequences" below.
Padded keys get -inf before the max, and every row has at least one real key (n >= 2), so no row
is fully masked; padded query rows are never stored, and in the backward their logsumexp is
loaded as +inf so their probabilities are exactly 0.

Backward: one program per (window, head, query tile). It recomputes S and P from q, k and the
saved base-2 row logsumexp, regenerates the dropout mask, and computes dP = dO V^T (masked and
scaled like P), delta = rowsum(P * dP) in fp32 (the whole row is in the tile, so unlike flash
attention it needs neither O nor its rounding: O is not saved), dS = P (dP - delta),
dV = P_drop^T dO, dQ = dS K scale, dK = dS^T Q scale. Token rows' dQ/dK/dV go straight to their
pixels of dqkv (with several query tiles dK/dV go to per-tile fp32 partials that torch sums);
register rows' dQ/dK/dV go per window to an fp32 buffer that torch sums over the windows sharing
them (all windows in the block step, those of one image in the grid step).
Bias gradient: dS (fp32) is atomically added (relaxed, fire-and-forget `red`) into one of 32
partial (heads, queries, keys) sums chosen by window % 32 (zero-filled by one torch.zeros); then
one launch of bias_table_gradient_kernel, one program per (table entry, head), sums the slots over
the (query, key) pairs of its entry, found by inverting the forward's index formula (token entry
(dx, dy): query token (a, b), key token (a - dx, b - dy); the last entry: every pair with a
register), and stores the table gradient in the table's dtype. It replaced a torch chain (sum over
slots, a zero-filled scatter buffer, scatter_, a sum over query rows, two register sums, two adds,
the cast: 8 launches per attention step, 176 per MaxViT-T training step) and the (n, n)
index map as an input of the ops. The order of the atomic adds is not fixed, so the bias-table gradient is NOT bitwise
deterministic (fp32 rounding-level differences between runs); every other gradient is.
Why atomics and not per-program partials over a loop of windows (the deterministic design):
with a window loop the (BLOCK_M x BLOCK_N) fp32 dS accumulator is live across iterations and
ptxas spills (window loop, w=7 r=4 dim_head=32 fp16, num_warps 4: sm_80 255 registers + 56 B
stack with dropout; sm_90 255 + 80 B without dropout, 255 + 152 B with it; unrolling 2 windows:
up to 120 B). One window per program has no spills (numbers below). Writing each window's dS
to memory instead would add ~11 KB per window and head (fp32 53 x 53) to the ~24 KB the
backward moves anyway (q, k, v, dO in; dq, dk, dv out; fp16); the atomics stay in L2 (the 32 slots are 0.7 MB). Not measured on a GPU.

Dropout: keep element (i, j) (query i, key j, sequence indices) of window `win`, head `h` when
its 16 random bits >= round(p * 2^16); kept values are scaled by 2^16 / (2^16 - threshold), the
exact inverse of the keep probability (p is used to 2^-16 resolution). The bits come from
tl.philox(seed, c0 = i * ceil(n / 8) + j // 8, c1:c2 = win * heads + h (64 bits), c3 = 0): one
Philox call gives 4 x 32 bits = eight 16-bit numbers for eight consecutive keys. The mask depends
on the seed and the element only (not on tiles: the key-loop kernels add their key tile's first key
/ 8 to the counter, and key tiles start at multiples of 8), and the backward regenerates it. One Philox call
per element instead (tl.rand) cost ~100 more registers in the forward (sm_80: 255 + spills).

Numerics: fp32 accumulation; scores in base 2 (q.k * scale * log2(e) + bias * log2(e), exp2); P is
rounded to the input dtype before P @ V and dS before dQ/dK (as flash attention does). fp32 inputs
use input_precision="ieee" dots (no TF32), so fp32 meets 1e-5. Under the Triton interpreter, for
bf16 only (UPCAST_DOT; fp16 runs the GPU's code path there), the dot operands are upcast to fp32 after rounding to the input dtype, because the
interpreter's bf16 tl.dot is wrong (triton issue 11584), and fp32 -> bf16 rounding is done on the
bits, because the interpreter's conversion truncates (measured: half of 4096 random values
differ from torch's round-to-nearest-even; it made the interpreted bf16 attention output 2.5x less
accurate than on a GPU).

Layout and alignment: every tensor the kernels read or write row-wise has contiguous channels; the
launcher computes the largest power-of-two byte alignment (<= 16) of all row starts and passes it
as ALIGN, which the kernels assert with tl.multiple_of / tl.max_contiguous (vectorised 16-byte
accesses; without it every element is its own 2-byte load and the forward needed 255 registers).
Offsets inside one image are int32 (checked by the launcher), image and window terms int64.

Resource report: `python -m pytest tests/test_window_attention.py -k compile -s` (ahead-of-time
compile through maxvit_fast.aot, Triton 3.9, no GPU needed). Default model: w=7, r=4, dim_head=32,
BLOCK_M = BLOCK_N = 64, num_warps 4, forward num_stages 2 (the window loop prefetches the next
window with cp.async), backward 1. Registers per thread (stack = spill bytes; all 0; LOCAL 0; no
LDL/STL), fp16 and bf16 identical:

    kernel                      sm_80 (HMMA)   sm_90 (HGMMA)
    forward  block  eval         128            120
    forward  block  dropout      237            179
    forward  grid   eval         128            111
    forward  grid   dropout      230            166
    backward block  dropout      238            217
    backward grid   dropout      232            214
    (backward without dropout, used when training with dropout 0: sm_80 232 / 220, sm_90 176 / 166)

Other configurations (not asserted by the tests; same compile helper, dropout on, block step):
fp32 (FMA dots, input_precision="ieee") spilled up to 5 KB at 4 warps, so fp32 uses 8 warps:
forward 128 / 153 registers (sm_80 / sm_90), backward 190 / 255 + 16 B stack. 128-key tiles
(w = 8 with r = 4, w = 7 with r = 16, w = 10; 8 warps): forward no spills; backward spills
32-128 B of stack (w=8 r=4 dim_head=32 fp16: 64 B sm_80, 112 B sm_90). dim_head 64 at w=7: no
spills; dim_head 128: forward sm_80 24 B, backward sm_80 216 B / sm_90 16 B. These run correctly
but are not tuned (a 32-row query tile or a key loop would be the next step). w=3 r=1 (16-tiles):
56-72 registers. 8 warps on a 64-row tile do not help: Triton puts all warps of a dot chain along
the rows (warpsPerCTA [8, 1]), i.e. 16-row MMA tiles for 8 rows per warp, duplicated work.

Long sequences (n = r + w*w > 128; window 12 at MaxViT 384, 16 at 512): separate kernels
(window_attention_long_*; the one-tile kernels above and their compiled code are unchanged: the
AOT report of the default model's kernels is identical before and after this addition).
- Forward (window_attention_long_fwd_kernel): one program per (window, head, query tile of
  BLOCK_M), a loop over key tiles of BLOCK_N with flash attention's online softmax in base 2
  (running row max m and sum l of exp2(s - m); acc and l rescaled by exp2(m_old - m_new)); the
  bias tile is gathered from the table per (query tile, key tile); padded keys are -inf, and every
  key tile holds a real key (tiles start below n), so m is finite after the first tile. Dropout
  multiplies exp2(s - m) by the keep mask and 1/(1-p) after it entered l (l sums the undropped
  probabilities); P is rounded to the input dtype unnormalised (values in [0, 1/(1-p)]) before P @ V
  and O = acc / l at the end. The row logsumexp m + log2(l) is saved as in the one-tile kernel.
  No window loop (one window per program: e.g. 2048 windows x 2 heads x 3 query tiles = 12288
  programs at stage 1 of MaxViT-T, 384 px, batch 32).
- Backward, delta: with several key tiles delta_i = sum_j P_ij dP_ij cannot be formed in one
  tile. Chosen: delta_i = dO_i . O_i (fp32 products and sum) from the forward's stored output O
  (with dropout too: O = P_drop V, so dO_i . O_i = sum_j P_ij dP_ij with dP = keep/(1-p) * dO V^T),
  as flash attention does. The alternative, a first pass over the key tiles recomputing S and dP,
  costs 2 more dots per (query tile, key tile) pair (9 instead of 7 below). O is the per-head
  output the op already has (`o` before the output projection; the projection's backward keeps it
  for its weight gradient, so saving it here costs no memory); the op passes O (and the register
  rows' outputs) to the backward only for long sequences. delta is rounded like O (relative
  ~2^-8 in bf16), as in flash attention; the tests hold bf16/fp16 gradients to 2x the reference
  module's own error.
- Backward, kernels: two launches, flash attention 2's split. (1) window_attention_long_bwd_dq_kernel,
  one program per (window, head, query tile): delta (written to a (windows, heads, n - q0) fp32
  buffer), then a loop over key tiles: S, P from the lse, dP = dO V^T (masked and scaled),
  dS = P (dP - delta), dQ += dS K scale (fp32 accumulator, stored once); the bias-gradient atomics.
  (2) window_attention_long_bwd_dkv_kernel, one program per (window, head, key tile): a loop over
  query tiles reading q, dO, lse and delta: dV += P_drop^T dO, dK += dS^T Q scale, stored once.
  Every dQ/dK/dV element is written by exactly one program, straight into dqkv (register rows:
  into the per-window fp32 buffer, then summed by torch as in the one-tile path): no fp32 partial
  sums and no atomics, so dq/dk/dv and the register-row gradients are deterministic. Cost: S and
  dP are computed in both kernels (7 dots per tile pair instead of 5). Rejected: one query-major
  kernel with per-query-tile dK/dV partials (q_tiles x tokens x 2C fp32: 4x the fp16 dqkv bytes at
  w = 12, 6.7x at w = 16, plus a torch sum), or one key-major kernel with dQ partials or atomics.
- Backward, bias table: dS is atomically added (fp32, relaxed `red`) into partial (heads, n - q0,
  n) sums as in the one-tile kernel, but with fewer slots for long sequences: slots =
  min(windows, 32, DBIAS_LONG_BUDGET (32 MiB) // (heads (n - q0) n 4 B)), at least 1
  (long_dbias_slots). n = 148, 2 heads: 32 slots, 5.6 MB; n = 148, 16 heads: 23 slots, 32 MB;
  n = 260, 16 heads: 7 slots, 30 MB; n = 272, 16 heads: 7 slots, 33 MB (32 slots would be 151 MB).
  Not bitwise deterministic (the order of the atomic adds), as in the one-tile path; the
  reduction into the table is the same bias_table_gradient kernel. The atomics are the dQ
  kernel's largest register cost: with them 194 registers (sm_80, fp16, no dropout), 128 without.
- Limit: MAX_LONG_SEQ = 640 (w <= 25); nothing in the kernels depends on n beyond loop counts, the
  limit bounds the n^2 bias-gradient buffers (one slot at n = 640, 16 heads: 26 MB). Tested (interpreter) at n = 129, 148, 260; AOT-checked at n = 148 and 260.
- Tiles (ahead-of-time survey with maxvit_fast.aot, Triton 3.9; w = 12 and 16, r = 4, dim_head 32,
  block and grid step, forward eval/dropout, both backward kernels with dropout):
  fp16/bf16: BLOCK_M = 64 queries, BLOCK_N = 32 keys, 4 warps, 2 stages (cp.async prefetch of the
  next tile's rows) in all three kernels: no spills, HMMA (sm_80) / HGMMA (sm_90; the dK/dV
  kernel's 32-row dots are HMMA). 64 x 64 tiles spilled (dQ kernel 255 registers + 248 B stack on
  sm_80, + 160 B on sm_90; forward eval 223 registers on sm_80); 32 x 64: dQ kernel + 32 B on sm_90.
  fp32 (FMA dots, "ieee"): BLOCK_M = 32, BLOCK_N = 16, 4 warps, forward 2 stages, backward 1: no
  spills. 8 warps did not fit without spills: 64 x 32 with 2 backward stages spilled ~3 KB in the
  dK/dV kernel; with 1 stage ptxas capped at 80 registers and spilled 8 B in 4 of 48
  configurations; 32 x 32 at 8 warps 8-16 B in 3; 64 x 64 at 8 warps 40-256 B.
  Registers per thread (all STACK 0, LOCAL 0; fp16 / bf16; w = 12 block, w = 12 grid, w = 16 block,
  w = 16 grid):

    kernel                 sm_80                                      sm_90
    fwd eval        128/126 128/128 124/124 128/128          78/80   80/80   80/80   96/96
    fwd dropout     158/155 157/160 156/154 160/158         119/121 117/119 122/120 120/120
    bwd dQ dropout  242/246 236/240 238/242 234/238         182/183 168/170 188/190 182/184
    bwd dKV dropout 218/218 215/215 222/222 224/224         183/183 189/189 181/181 195/195
    (fp16 backward without dropout: dQ 194 182 190 180 / 136 127 138 128, dKV 168 162 158 160 /
    144 144 142 164)
    fp32 (w = 12 block, grid, w = 16 block, grid): fwd eval 80 88 80 80 / 92 72 88 86, fwd dropout
    128 136 128 128 / 140 138 138 135, dQ dropout 168 168 168 168 / 184 181 184 181, dKV dropout
    128 128 128 128 / 77 72 80 72.

  The test (`-k compile`) compiles fp16 and bf16 at w = 12, fp16 at w = 16 and fp32 at w = 12 and
  asserts no spills and tensor-core instructions (fp16/bf16). Not tuned for speed.

GPU speed: not measured (no GPU in this session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, interpreter_upcasts_dot, seed_pointer
from .numerics import round_fp32_to_bf16_nearest_even

LOG2E = 1.4426950408889634

# Tests set this to True so every buffer the kernels should write completely starts as NaN.
POISON_OUTPUTS = False

MAX_SEQ_TILE = 128
# Longest sequence r + w*w of the key-loop kernels (n > MAX_SEQ_TILE); see "Long sequences" in the header.
MAX_LONG_SEQ = 640
# Tiles of the key-loop kernels, fp16/bf16 (False) and fp32 (True); from the resource report in the header.
LONG_TILES = {
    False: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, fwd_stages=2, bwd_stages=2),
    True: dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, fwd_stages=2, bwd_stages=1),
}
# Bytes the long path's bias-gradient partial sums may take (fewer slots for long sequences).
DBIAS_LONG_BUDGET = 32 * 2**20
# Partial sums of the bias gradient that the backward's atomic adds are spread over (window % slots).
DBIAS_SLOTS = 32


# ----------------------------------------------------------------------------------------------
# index helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_pixel(tok, X, Y, nX, nY, WINDOW: tl.constexpr, GRID_PATTERN: tl.constexpr):
    """(row, col) of token ``tok`` (row-major (a, b) inside the window) of window (X, Y)."""
    a = tok // WINDOW
    b = tok % WINDOW
    if GRID_PATTERN:
        row = a * nX + X
        col = b * nY + Y
    else:
        row = X * WINDOW + a
        col = Y * WINDOW + b
    return row, col


@triton.jit
def _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k,
               SEQ: tl.constexpr, NUM_REG: tl.constexpr, WINDOW: tl.constexpr):
    """Relative-position bias of query rows seq_q and key rows seq_k gathered from the table (in
    the table's dtype); -inf on padded keys."""
    span: tl.constexpr = 2 * WINDOW - 1
    tq = tl.maximum(seq_q - NUM_REG, 0)
    tk = tl.maximum(seq_k - NUM_REG, 0)
    # (i1 - j1 + w - 1) * span + (i2 - j2 + w - 1) is a query part minus a key part
    q_part = (tq // WINDOW) * span + tq % WINDOW
    k_part = (tk // WINDOW) * span + tk % WINDOW
    idx = q_part[:, None] - k_part[None, :] + (WINDOW - 1) * (span + 1)
    with_register = (seq_q < NUM_REG)[:, None] | (seq_k < NUM_REG)[None, :]
    idx = tl.where(with_register, span * span, idx)
    valid = (seq_q < SEQ)[:, None] & (seq_k < SEQ)[None, :]
    bias = tl.load(table_ptr + idx * stride_table_t + head * stride_table_h, mask=valid, other=0.0)
    return tl.where((seq_k < SEQ)[None, :], bias, float("-inf"))


@triton.jit
def _round(x, ELEM: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x rounded to ELEM as the GPU does (round to nearest even). The interpreter's fp32 -> bf16
    conversion truncates instead (biased, twice the error), so under it (UPCAST_DOT) bf16
    rounding is done on the fp32 bits first."""
    if UPCAST_DOT:
        if ELEM == tl.bfloat16:
            x = round_fp32_to_bf16_nearest_even(x.to(tl.float32))
    return x.to(ELEM)


@triton.jit
def _dot_operand(x, ELEM: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Round to the input dtype (the GPU's tensor-core operand); under the interpreter compute
    the dot in fp32 on the rounded values (its bf16 tl.dot is wrong, triton issue 11584)."""
    x = _round(x, ELEM, UPCAST_DOT)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _keep_mask(seed_ptr, win, head, heads, seq_q, key_start, dropout_threshold, SEQ: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Dropout keep mask of query rows seq_q and keys key_start .. key_start + BLOCK_N - 1 (key_start
    a multiple of 8) of one window and head; the seed is read from device memory (a 1-element int64
    tensor) so that a captured CUDA graph replays with the seed its replay draws, not the one drawn
    at capture.

    16 random bits per element (kept when >= dropout_threshold = round(p * 2^16)), eight elements
    per Philox call: counter (i * ceil(n / 8) + j // 8, window * heads + head (64 bits), 0), output
    (j % 8) // 2, half j % 2. The mask depends on the seed and the element only, not on tiles."""
    CALLS: tl.constexpr = (SEQ + 7) // 8
    counter = seq_q[:, None] * CALLS + (key_start // 8 + tl.arange(0, BLOCK_N // 8))[None, :]
    stream = win * heads + head
    zero = counter * 0
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = tl.philox(seed, counter, (stream & 0xFFFFFFFF).to(tl.int32) + zero,
                               (stream >> 32).to(tl.int32) + zero, zero)
    bits = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    bits = tl.join(bits & 0xFFFF, (bits >> 16) & 0xFFFF)
    bits = tl.reshape(bits, (seq_q.shape[0], BLOCK_N))
    return bits.to(tl.int32) >= dropout_threshold


@triton.jit
def _tile_ptrs(rows, ch, ALIGN: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(rows, HEAD_DIM) pointers from per-row pointers: each row's HEAD_DIM channels are contiguous
    and (the launcher checks) start ALIGN-byte aligned, so loads and stores vectorise."""
    ptrs = rows[:, None] + ch[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [ALIGN, ALIGN]), [1, HEAD_DIM])


@triton.jit
def _window_coords(win_index, nX, nY):
    win = tl.cast(win_index, tl.int64)  # a tensor also under the interpreter (where range yields ints)
    img = win // (nX * nY)
    X = ((win % (nX * nY)) // nY).to(tl.int32)
    Y = (win % nY).to(tl.int32)
    return win, img, X, Y


@triton.jit
def _program_window_head(nX, nY, HEAD_DIM: tl.constexpr):
    """Window (grid axis 0: index win, image img, window position X, Y) and head (axis 1) of a
    one-window program, and the head's channels ch."""
    win, img, X, Y = _window_coords(tl.program_id(0), nX, nY)
    head = tl.program_id(1)
    ch = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    return win, img, X, Y, head, ch


@triton.jit
def _seq_tile(start, X, Y, nX, nY, SIZE: tl.constexpr, SEQ: tl.constexpr, NUM_REG: tl.constexpr,
              WINDOW: tl.constexpr, GRID_PATTERN: tl.constexpr):
    """Sequence rows start .. start + SIZE - 1 of window (X, Y) ([0, NUM_REG) registers, then the
    window's tokens): their indices seq, which are real (seq < SEQ), and each token's pixel (row,
    col) (token 0's for register and padded rows)."""
    seq = start + tl.arange(0, SIZE)
    row, col = _token_pixel(tl.maximum(seq - NUM_REG, 0), X, Y, nX, nY, WINDOW, GRID_PATTERN)
    return seq, seq < SEQ, row, col


@triton.jit
def _seq_rows(map_img, reg_rows, stride_map_h, stride_map_w, stride_reg_r, seq, row, col, NUM_REG: tl.constexpr):
    """Row pointers of sequence rows ``seq`` (token pixels (row, col) from _token_pixel): register
    rows at reg_rows + seq * stride_reg_r, token rows at their pixel of the (H, W, ...) map starting
    at map_img (both already offset to the wanted channel block)."""
    return tl.where(seq < NUM_REG, reg_rows + seq * stride_reg_r, map_img + row * stride_map_h + col * stride_map_w)


@triton.jit
def _load_seq_rows(map_img, reg_rows, stride_map_h, stride_map_w, stride_reg_r, seq, row, col, ch,
                   SEQ: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    """(seq, channels ch) tile of sequence rows (row pointers as in _seq_rows); zeros on padded rows."""
    rows = _seq_rows(map_img, reg_rows, stride_map_h, stride_map_w, stride_reg_r, seq, row, col, NUM_REG)
    return tl.load(_tile_ptrs(rows, ch, ALIGN, HEAD_DIM), mask=(seq < SEQ)[:, None], other=0.0)


@triton.jit
def _store_seq_rows(map_img, reg_rows, stride_map_h, stride_map_w, stride_reg_r, seq, row, col, ch, x,
                    SEQ: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                    UPCAST_DOT: tl.constexpr):
    """Store tile x (rounded to the map's dtype) to sequence rows seq (row pointers as in
    _seq_rows); padded rows are not stored."""
    rows = _seq_rows(map_img, reg_rows, stride_map_h, stride_map_w, stride_reg_r, seq, row, col, NUM_REG)
    tl.store(_tile_ptrs(rows, ch, ALIGN, HEAD_DIM), _round(x, map_img.dtype.element_ty, UPCAST_DOT),
             mask=(seq < SEQ)[:, None])


@triton.jit
def _load_kv(qkv_img, reg_img, stride_qkv_h, stride_qkv_w, stride_reg_r, reg_k_off, reg_v_off, C, seq_k, k_row, k_col,
             ch, SEQ: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    """k and v rows seq_k of one window and head: register rows from the register tensor, token rows
    from their pixels of the qkv map; zeros on padded rows."""
    k = _load_seq_rows(qkv_img + C, reg_img + reg_k_off, stride_qkv_h, stride_qkv_w, stride_reg_r, seq_k, k_row, k_col,
                       ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    v = _load_seq_rows(qkv_img + 2 * C, reg_img + reg_v_off, stride_qkv_h, stride_qkv_w, stride_reg_r, seq_k, k_row,
                       k_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    return k, v


@triton.jit
def _load_qkv(qkv_img, reg_img, stride_qkv_h, stride_qkv_w, stride_reg_r, reg_q_off, reg_k_off, reg_v_off, C,
              seq_q, seq_k, q_row, q_col, k_row, k_col, ch,
              SEQ: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    """q rows seq_q and k, v rows seq_k of one window and head: register rows from the register
    tensor, token rows from their pixels of the qkv map; zeros on padded rows."""
    q_is_reg = seq_q < NUM_REG
    k_is_reg = seq_k < NUM_REG
    q_rows = tl.where(q_is_reg, reg_img + reg_q_off + seq_q * stride_reg_r,
                      qkv_img + q_row * stride_qkv_h + q_col * stride_qkv_w)
    k_rows = tl.where(k_is_reg, reg_img + reg_k_off + seq_k * stride_reg_r,
                      qkv_img + C + k_row * stride_qkv_h + k_col * stride_qkv_w)
    v_rows = tl.where(k_is_reg, reg_img + reg_v_off + seq_k * stride_reg_r,
                      qkv_img + 2 * C + k_row * stride_qkv_h + k_col * stride_qkv_w)
    q = tl.load(_tile_ptrs(q_rows, ch, ALIGN, HEAD_DIM), mask=(seq_q < SEQ)[:, None], other=0.0)
    k = tl.load(_tile_ptrs(k_rows, ch, ALIGN, HEAD_DIM), mask=(seq_k < SEQ)[:, None], other=0.0)
    v = tl.load(_tile_ptrs(v_rows, ch, ALIGN, HEAD_DIM), mask=(seq_k < SEQ)[:, None], other=0.0)
    return q, k, v


@triton.jit
def _row_stat_ptrs(stat_ptr, stride_win, stride_h, win, head, seq_q, Q_START: tl.constexpr):
    """Pointers of a per-query-row fp32 statistic (lse, delta: (windows, heads, n - Q_START)) of
    query rows seq_q of one window and head."""
    return stat_ptr + win * stride_win + head * stride_h + (seq_q - Q_START)


@triton.jit
def _store_grad_rows(token_rows, reg_rows, stride_reg_r, seq, ch, grad, SEQ: tl.constexpr, NUM_REG: tl.constexpr,
                     HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Gradient tile of sequence rows seq: token rows to their pixels (per-row pointers token_rows,
    rounded to that map's dtype), register rows in fp32 to reg_rows + seq * stride_reg_r (the
    per-window buffer that torch sums); padded rows are not stored."""
    is_reg = seq < NUM_REG
    tl.store(_tile_ptrs(token_rows, ch, ALIGN, HEAD_DIM), _round(grad, token_rows.dtype.element_ty, UPCAST_DOT),
             mask=((seq < SEQ) & ~is_reg)[:, None])
    tl.store(_tile_ptrs(reg_rows + seq * stride_reg_r, ch, 16, HEAD_DIM), grad, mask=is_reg[:, None])


@triton.jit
def _recompute_probs(q_op, k_op, do_op, v_op, bias, lse, qk_scale_log2, seed_ptr, win, head, heads, seq_q, key_start,
                     dropout_threshold, keep_scale, SEQ: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Backward recompute for query rows seq_q and the key tile at key_start: P from the scores,
    the bias and the saved base-2 row logsumexp lse (0 on padded keys, and on padded query rows,
    whose lse is +inf), P after dropout, and dP = dO V^T masked and scaled like P."""
    s = tl.dot(q_op, tl.trans(k_op), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale_log2 + bias.to(tl.float32) * 1.4426950408889634 - lse[:, None])
    dp = tl.dot(do_op, tl.trans(v_op), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _keep_mask(seed_ptr, win, head, heads, seq_q, key_start, dropout_threshold, SEQ, BLOCK_N)
        p_dropped = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    else:
        p_dropped = p
    return p, p_dropped, dp


@triton.jit
def _add_bias_grad(dbias_head, stride_dbias_q, seq_q, seq_k, ds, Q_START: tl.constexpr, SEQ: tl.constexpr):
    """Bias gradient: fp32 atomic adds of dS (query rows seq_q, keys seq_k) into one window's slot
    of the partial (heads, n - Q_START, n) sums, dbias_head pointing at its head;
    bias_table_gradient_kernel then sums the slots into the table. The order of the adds into a slot is not fixed, so
    this gradient is not bitwise deterministic (everything else is)."""
    offsets = (seq_q - Q_START)[:, None] * stride_dbias_q + seq_k[None, :]
    tl.atomic_add(dbias_head + offsets, ds, mask=(seq_q < SEQ)[:, None] & (seq_k < SEQ)[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def window_attention_fwd_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_h, stride_qkv_w,  # (B, H, W, 3C): q | k | v channels
    reg_ptr, stride_reg_b, stride_reg_r, reg_q_off, reg_k_off, reg_v_off,  # register rows (Breg, r, Creg)
    table_ptr, stride_table_t, stride_table_h,  # ((2w-1)^2 + 1, heads)
    out_ptr, stride_out_b, stride_out_h, stride_out_w,  # (B, H, W, C) per-head outputs
    reg_out_ptr, stride_reg_out_win, stride_reg_out_r,  # (windows, r, C) register-row outputs
    lse_ptr, stride_lse_win, stride_lse_h,  # (windows, heads, n - Q_START) fp32, base 2
    C, heads, nX, nY, num_windows, windows_per_program,
    qk_scale_log2, seed_ptr, dropout_threshold, keep_scale,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID_PATTERN: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    group = tl.program_id(0)
    head = tl.program_id(1)
    q_tile = tl.program_id(2)

    # Sequence rows: [0, NUM_REG) registers, then window tokens. Queries start at Q_START
    # (NUM_REG when the register outputs are not needed: the grid step drops them).
    seq_q = Q_START + q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    seq_k = tl.arange(0, BLOCK_N)
    q_valid = seq_q < SEQ
    q_tok = tl.maximum(seq_q - NUM_REG, 0)
    k_tok = tl.maximum(seq_k - NUM_REG, 0)
    ch = head * HEAD_DIM + tl.arange(0, HEAD_DIM)

    # Gathered once per program, held in the table's dtype across its windows (re-gathering it
    # per window costs ~75 more registers on sm_80: 64-bit addresses of a 64 x 64 gather).
    bias = _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k, SEQ, NUM_REG, WINDOW)

    win_start = group * windows_per_program
    win_end = tl.minimum(win_start + windows_per_program, num_windows)
    for win_index in range(win_start, win_end):
        win, img, X, Y = _window_coords(win_index, nX, nY)
        q_row, q_col = _token_pixel(q_tok, X, Y, nX, nY, WINDOW, GRID_PATTERN)
        k_row, k_col = _token_pixel(k_tok, X, Y, nX, nY, WINDOW, GRID_PATTERN)
        q, k, v = _load_qkv(qkv_ptr + img * stride_qkv_b, reg_ptr + img * stride_reg_b, stride_qkv_h, stride_qkv_w,
                            stride_reg_r, reg_q_off, reg_k_off, reg_v_off, C, seq_q, seq_k, q_row, q_col, k_row, k_col,
                            ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)

        s = tl.dot(_dot_operand(q, ELEM, UPCAST_DOT), tl.trans(_dot_operand(k, ELEM, UPCAST_DOT)),
                   input_precision=DOT_PRECISION)
        s = s * qk_scale_log2 + bias.to(tl.float32) * 1.4426950408889634
        row_max = tl.max(s, 1)
        p = tl.math.exp2(s - row_max[:, None])
        row_sum = tl.sum(p, 1)
        p = p * (1.0 / row_sum)[:, None]
        lse = row_max + tl.math.log2(row_sum)
        if DROPOUT:
            keep = _keep_mask(seed_ptr, win, head, heads, seq_q, 0, dropout_threshold, SEQ, BLOCK_N)
            p = tl.where(keep, p * keep_scale, 0.0)
        o = tl.dot(_dot_operand(p, ELEM, UPCAST_DOT), _dot_operand(v, ELEM, UPCAST_DOT),
                   input_precision=DOT_PRECISION)

        _store_seq_rows(out_ptr + img * stride_out_b, reg_out_ptr + win * stride_reg_out_win, stride_out_h,
                        stride_out_w, stride_reg_out_r, seq_q, q_row, q_col, ch, o, SEQ, NUM_REG, HEAD_DIM, ALIGN,
                        UPCAST_DOT)
        tl.store(_row_stat_ptrs(lse_ptr, stride_lse_win, stride_lse_h, win, head, seq_q, Q_START), lse, mask=q_valid)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def window_attention_bwd_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_h, stride_qkv_w,
    reg_ptr, stride_reg_b, stride_reg_r, reg_q_off, reg_k_off, reg_v_off,
    table_ptr, stride_table_t, stride_table_h,
    dout_ptr, stride_dout_b, stride_dout_h, stride_dout_w,  # dO
    dreg_out_ptr, stride_dreg_out_win, stride_dreg_out_r,
    lse_ptr, stride_lse_win, stride_lse_h,
    dq_ptr, stride_dq_b, stride_dq_h, stride_dq_w,  # token dQ: channels [0, C) of this map
    dkv_ptr, stride_dkv_tile, stride_dkv_b, stride_dkv_h, stride_dkv_w, dk_off, dv_off,  # token dK, dV
    dreg_ptr, stride_dreg_tile, stride_dreg_win, stride_dreg_r,  # fp32 register-row dq|dk|dv per window
    dbias_ptr, stride_dbias_slot, stride_dbias_h, stride_dbias_q, dbias_slots,  # fp32 (slots, heads, n - Q_START, n)
    C, heads, nX, nY,
    qk_scale_log2, sm_scale, seed_ptr, dropout_threshold, keep_scale,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID_PATTERN: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (window, head, query tile), no loop over windows: a loop-carried bias-gradient
    # accumulator made ptxas spill (see the resource report in the header).
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    win, img, X, Y, head, ch = _program_window_head(nX, nY, HEAD_DIM)
    q_tile = tl.program_id(2)
    seq_q, q_valid, q_row, q_col = _seq_tile(Q_START + q_tile * BLOCK_M, X, Y, nX, nY, BLOCK_M, SEQ, NUM_REG, WINDOW,
                                             GRID_PATTERN)
    seq_k, k_valid, k_row, k_col = _seq_tile(0, X, Y, nX, nY, BLOCK_N, SEQ, NUM_REG, WINDOW, GRID_PATTERN)

    q, k, v = _load_qkv(qkv_ptr + img * stride_qkv_b, reg_ptr + img * stride_reg_b, stride_qkv_h, stride_qkv_w,
                        stride_reg_r, reg_q_off, reg_k_off, reg_v_off, C, seq_q, seq_k, q_row, q_col, k_row, k_col,
                        ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    # dO of query rows: at the token's pixel, or in the per-window register-output rows.
    do = _load_seq_rows(dout_ptr + img * stride_dout_b, dreg_out_ptr + win * stride_dreg_out_win, stride_dout_h,
                        stride_dout_w, stride_dreg_out_r, seq_q, q_row, q_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    lse = tl.load(_row_stat_ptrs(lse_ptr, stride_lse_win, stride_lse_h, win, head, seq_q, Q_START), mask=q_valid,
                  other=float("inf"))  # padded query rows: P = 0 exactly
    bias = _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k, SEQ, NUM_REG, WINDOW)

    q_op = _dot_operand(q, ELEM, UPCAST_DOT)
    k_op = _dot_operand(k, ELEM, UPCAST_DOT)
    do_op = _dot_operand(do, ELEM, UPCAST_DOT)
    p, p_dropped, dp = _recompute_probs(q_op, k_op, do_op, _dot_operand(v, ELEM, UPCAST_DOT), bias, lse,
                                        qk_scale_log2, seed_ptr, win, head, heads, seq_q, 0, dropout_threshold,
                                        keep_scale, SEQ, BLOCK_N, DROPOUT, DOT_PRECISION)
    # Gradient of the natural-units score q.k*scale + bias. The whole row is in this tile, so
    # delta_i = sum_j P_ij dP_ij is summed here in fp32 rather than taken as dO_i . O_i from the
    # rounded output (as flash attention must): each row of dS then sums to 0 up to fp32
    # rounding, and O is neither saved nor read.
    delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    _add_bias_grad(dbias_ptr + (win % dbias_slots) * stride_dbias_slot + head * stride_dbias_h, stride_dbias_q,
                   seq_q, seq_k, ds, Q_START, SEQ)

    dv = tl.dot(tl.trans(_dot_operand(p_dropped, ELEM, UPCAST_DOT)), do_op, input_precision=DOT_PRECISION)
    ds_op = _dot_operand(ds * sm_scale, ELEM, UPCAST_DOT)
    dq = tl.dot(ds_op, k_op, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(ds_op), q_op, input_precision=DOT_PRECISION)

    # Token rows straight to their pixels; register rows to the per-window fp32 buffer.
    dreg_win = dreg_ptr + q_tile.to(tl.int64) * stride_dreg_tile + win * stride_dreg_win
    _store_grad_rows(dq_ptr + img * stride_dq_b + q_row * stride_dq_h + q_col * stride_dq_w, dreg_win + reg_q_off,
                     stride_dreg_r, seq_q, ch, dq, SEQ, NUM_REG, HEAD_DIM, ALIGN, UPCAST_DOT)
    dkv_rows = dkv_ptr + q_tile.to(tl.int64) * stride_dkv_tile + img * stride_dkv_b \
        + k_row * stride_dkv_h + k_col * stride_dkv_w
    _store_grad_rows(dkv_rows + dk_off, dreg_win + reg_k_off, stride_dreg_r, seq_k, ch, dk, SEQ, NUM_REG, HEAD_DIM,
                     ALIGN, UPCAST_DOT)
    _store_grad_rows(dkv_rows + dv_off, dreg_win + reg_v_off, stride_dreg_r, seq_k, ch, dv, SEQ, NUM_REG, HEAD_DIM,
                     ALIGN, UPCAST_DOT)


# ----------------------------------------------------------------------------------------------
# long sequences (n = r + w*w > 128): key-tile loop, online softmax (see "Long sequences" above)
# ----------------------------------------------------------------------------------------------


@triton.jit
def window_attention_long_fwd_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_h, stride_qkv_w,  # (B, H, W, 3C): q | k | v channels
    reg_ptr, stride_reg_b, stride_reg_r, reg_q_off, reg_k_off, reg_v_off,  # register rows (Breg, r, Creg)
    table_ptr, stride_table_t, stride_table_h,  # ((2w-1)^2 + 1, heads)
    out_ptr, stride_out_b, stride_out_h, stride_out_w,  # (B, H, W, C) per-head outputs
    reg_out_ptr, stride_reg_out_win, stride_reg_out_r,  # (windows, r, C) register-row outputs
    lse_ptr, stride_lse_win, stride_lse_h,  # (windows, heads, n - Q_START) fp32, base 2
    C, heads, nX, nY,
    qk_scale_log2, seed_ptr, dropout_threshold, keep_scale,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID_PATTERN: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (window, head, query tile); a loop over key tiles with the running row max
    # m and running sum l of exp2(s - m) (flash attention's online softmax, base 2).
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    win, img, X, Y, head, ch = _program_window_head(nX, nY, HEAD_DIM)
    seq_q, q_valid, q_row, q_col = _seq_tile(Q_START + tl.program_id(2) * BLOCK_M, X, Y, nX, nY, BLOCK_M, SEQ,
                                             NUM_REG, WINDOW, GRID_PATTERN)
    qkv_img = qkv_ptr + img * stride_qkv_b
    reg_img = reg_ptr + img * stride_reg_b
    q = _load_seq_rows(qkv_img, reg_img + reg_q_off, stride_qkv_h, stride_qkv_w, stride_reg_r, seq_q, q_row, q_col, ch,
                       SEQ, NUM_REG, HEAD_DIM, ALIGN)
    q_op = _dot_operand(q, ELEM, UPCAST_DOT)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # Every key tile holds at least one real key (key_start < SEQ), so the running max is finite
    # after the first tile and padded keys (-inf) contribute exp2(-inf) = 0.
    for key_start in range(0, SEQ, BLOCK_N):
        seq_k, k_valid, k_row, k_col = _seq_tile(key_start, X, Y, nX, nY, BLOCK_N, SEQ, NUM_REG, WINDOW, GRID_PATTERN)
        k, v = _load_kv(qkv_img, reg_img, stride_qkv_h, stride_qkv_w, stride_reg_r, reg_k_off, reg_v_off, C, seq_k,
                        k_row, k_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
        bias = _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k, SEQ, NUM_REG, WINDOW)

        s = tl.dot(q_op, tl.trans(_dot_operand(k, ELEM, UPCAST_DOT)), input_precision=DOT_PRECISION)
        s = s * qk_scale_log2 + bias.to(tl.float32) * 1.4426950408889634
        new_max = tl.maximum(row_max, tl.max(s, 1))
        rescale = tl.math.exp2(row_max - new_max)  # 0 on the first tile (row_max = -inf)
        p = tl.math.exp2(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep_mask(seed_ptr, win, head, heads, seq_q, key_start, dropout_threshold, SEQ, BLOCK_N)
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = tl.dot(_dot_operand(p, ELEM, UPCAST_DOT), _dot_operand(v, ELEM, UPCAST_DOT), acc * rescale[:, None],
                     input_precision=DOT_PRECISION)
        row_max = new_max

    o = acc * (1.0 / row_sum)[:, None]
    lse = row_max + tl.math.log2(row_sum)
    _store_seq_rows(out_ptr + img * stride_out_b, reg_out_ptr + win * stride_reg_out_win, stride_out_h, stride_out_w,
                    stride_reg_out_r, seq_q, q_row, q_col, ch, o, SEQ, NUM_REG, HEAD_DIM, ALIGN, UPCAST_DOT)
    tl.store(_row_stat_ptrs(lse_ptr, stride_lse_win, stride_lse_h, win, head, seq_q, Q_START), lse, mask=q_valid)


@triton.jit
def window_attention_long_bwd_dq_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_h, stride_qkv_w,
    reg_ptr, stride_reg_b, stride_reg_r, reg_q_off, reg_k_off, reg_v_off,
    table_ptr, stride_table_t, stride_table_h,
    out_ptr, stride_out_b, stride_out_h, stride_out_w,  # the forward's O (for delta)
    reg_out_ptr, stride_reg_out_win, stride_reg_out_r,
    dout_ptr, stride_dout_b, stride_dout_h, stride_dout_w,  # dO
    dreg_out_ptr, stride_dreg_out_win, stride_dreg_out_r,
    lse_ptr, stride_lse_win, stride_lse_h,
    delta_ptr, stride_delta_win, stride_delta_h,  # out: fp32 rowsum(dO * O), read by the dK/dV kernel
    dq_ptr, stride_dq_b, stride_dq_h, stride_dq_w,  # token dQ: channels [0, C) of this map
    dreg_ptr, stride_dreg_win, stride_dreg_r,  # fp32 register-row dq|dk|dv per window (q part here)
    dbias_ptr, stride_dbias_slot, stride_dbias_h, stride_dbias_q, dbias_slots,  # fp32 (slots, heads, n - Q_START, n)
    C, heads, nX, nY,
    qk_scale_log2, sm_scale, seed_ptr, dropout_threshold, keep_scale,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID_PATTERN: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (window, head, query tile): delta, dQ over a loop of key tiles, bias gradient.
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    win, img, X, Y, head, ch = _program_window_head(nX, nY, HEAD_DIM)
    seq_q, q_valid, q_row, q_col = _seq_tile(Q_START + tl.program_id(2) * BLOCK_M, X, Y, nX, nY, BLOCK_M, SEQ,
                                             NUM_REG, WINDOW, GRID_PATTERN)
    qkv_img = qkv_ptr + img * stride_qkv_b
    reg_img = reg_ptr + img * stride_reg_b
    q = _load_seq_rows(qkv_img, reg_img + reg_q_off, stride_qkv_h, stride_qkv_w, stride_reg_r, seq_q, q_row, q_col, ch,
                       SEQ, NUM_REG, HEAD_DIM, ALIGN)
    do = _load_seq_rows(dout_ptr + img * stride_dout_b, dreg_out_ptr + win * stride_dreg_out_win, stride_dout_h,
                        stride_dout_w, stride_dreg_out_r, seq_q, q_row, q_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    o = _load_seq_rows(out_ptr + img * stride_out_b, reg_out_ptr + win * stride_reg_out_win, stride_out_h,
                       stride_out_w, stride_reg_out_r, seq_q, q_row, q_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    lse = tl.load(_row_stat_ptrs(lse_ptr, stride_lse_win, stride_lse_h, win, head, seq_q, Q_START), mask=q_valid,
                  other=float("inf"))  # padded query rows: P = 0 exactly
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (with dropout too: O = P_drop V), in fp32 from the
    # stored (rounded) O, as flash attention does: the row spans several key tiles.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(_row_stat_ptrs(delta_ptr, stride_delta_win, stride_delta_h, win, head, seq_q, Q_START), delta,
             mask=q_valid)
    q_op = _dot_operand(q, ELEM, UPCAST_DOT)
    do_op = _dot_operand(do, ELEM, UPCAST_DOT)
    dbias_head = dbias_ptr + (win % dbias_slots) * stride_dbias_slot + head * stride_dbias_h

    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for key_start in range(0, SEQ, BLOCK_N):
        seq_k, k_valid, k_row, k_col = _seq_tile(key_start, X, Y, nX, nY, BLOCK_N, SEQ, NUM_REG, WINDOW, GRID_PATTERN)
        k, v = _load_kv(qkv_img, reg_img, stride_qkv_h, stride_qkv_w, stride_reg_r, reg_k_off, reg_v_off, C, seq_k,
                        k_row, k_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
        bias = _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k, SEQ, NUM_REG, WINDOW)
        k_op = _dot_operand(k, ELEM, UPCAST_DOT)

        p, _, dp = _recompute_probs(q_op, k_op, do_op, _dot_operand(v, ELEM, UPCAST_DOT), bias, lse, qk_scale_log2,
                                    seed_ptr, win, head, heads, seq_q, key_start, dropout_threshold, keep_scale, SEQ,
                                    BLOCK_N, DROPOUT, DOT_PRECISION)  # P after dropout: not needed for dQ
        ds = p * (dp - delta[:, None])
        _add_bias_grad(dbias_head, stride_dbias_q, seq_q, seq_k, ds, Q_START, SEQ)
        dq = tl.dot(_dot_operand(ds * sm_scale, ELEM, UPCAST_DOT), k_op, dq, input_precision=DOT_PRECISION)

    _store_grad_rows(dq_ptr + img * stride_dq_b + q_row * stride_dq_h + q_col * stride_dq_w,
                     dreg_ptr + win * stride_dreg_win + reg_q_off, stride_dreg_r, seq_q, ch, dq, SEQ, NUM_REG, HEAD_DIM,
                     ALIGN, UPCAST_DOT)


@triton.jit
def window_attention_long_bwd_dkv_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_h, stride_qkv_w,
    reg_ptr, stride_reg_b, stride_reg_r, reg_q_off, reg_k_off, reg_v_off,
    table_ptr, stride_table_t, stride_table_h,
    dout_ptr, stride_dout_b, stride_dout_h, stride_dout_w,  # dO
    dreg_out_ptr, stride_dreg_out_win, stride_dreg_out_r,
    lse_ptr, stride_lse_win, stride_lse_h,
    delta_ptr, stride_delta_win, stride_delta_h,  # written by the dQ kernel
    dkv_ptr, stride_dkv_b, stride_dkv_h, stride_dkv_w,  # token dK, dV: channels [C, 3C) of dqkv
    dreg_ptr, stride_dreg_win, stride_dreg_r,  # fp32 register-row dq|dk|dv per window (k, v parts here)
    C, heads, nX, nY,
    qk_scale_log2, sm_scale, seed_ptr, dropout_threshold, keep_scale,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, HEAD_DIM: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID_PATTERN: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGN: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (window, head, key tile): dK and dV over a loop of query tiles (no partial
    # sums: each key row's gradient is complete in one program).
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    win, img, X, Y, head, ch = _program_window_head(nX, nY, HEAD_DIM)
    key_start = tl.program_id(2) * BLOCK_N
    seq_k, k_valid, k_row, k_col = _seq_tile(key_start, X, Y, nX, nY, BLOCK_N, SEQ, NUM_REG, WINDOW, GRID_PATTERN)
    k_is_reg = seq_k < NUM_REG
    qkv_img = qkv_ptr + img * stride_qkv_b
    reg_img = reg_ptr + img * stride_reg_b
    k, v = _load_kv(qkv_img, reg_img, stride_qkv_h, stride_qkv_w, stride_reg_r, reg_k_off, reg_v_off, C, seq_k, k_row,
                    k_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
    k_op = _dot_operand(k, ELEM, UPCAST_DOT)
    v_op = _dot_operand(v, ELEM, UPCAST_DOT)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for query_start in range(Q_START, SEQ, BLOCK_M):
        seq_q, q_valid, q_row, q_col = _seq_tile(query_start, X, Y, nX, nY, BLOCK_M, SEQ, NUM_REG, WINDOW,
                                                 GRID_PATTERN)
        q = _load_seq_rows(qkv_img, reg_img + reg_q_off, stride_qkv_h, stride_qkv_w, stride_reg_r, seq_q, q_row, q_col,
                           ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
        do = _load_seq_rows(dout_ptr + img * stride_dout_b, dreg_out_ptr + win * stride_dreg_out_win, stride_dout_h,
                            stride_dout_w, stride_dreg_out_r, seq_q, q_row, q_col, ch, SEQ, NUM_REG, HEAD_DIM, ALIGN)
        q_op = _dot_operand(q, ELEM, UPCAST_DOT)
        do_op = _dot_operand(do, ELEM, UPCAST_DOT)
        lse = tl.load(_row_stat_ptrs(lse_ptr, stride_lse_win, stride_lse_h, win, head, seq_q, Q_START), mask=q_valid,
                      other=float("inf"))  # padded query rows: P = 0
        delta = tl.load(_row_stat_ptrs(delta_ptr, stride_delta_win, stride_delta_h, win, head, seq_q, Q_START),
                        mask=q_valid, other=0.0)
        bias = _bias_tile(table_ptr, stride_table_t, stride_table_h, head, seq_q, seq_k, SEQ, NUM_REG, WINDOW)

        p, p_dropped, dp = _recompute_probs(q_op, k_op, do_op, v_op, bias, lse, qk_scale_log2, seed_ptr, win, head,
                                            heads, seq_q, key_start, dropout_threshold, keep_scale, SEQ, BLOCK_N,
                                            DROPOUT, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dv = tl.dot(tl.trans(_dot_operand(p_dropped, ELEM, UPCAST_DOT)), do_op, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(_dot_operand(ds * sm_scale, ELEM, UPCAST_DOT)), q_op, dk, input_precision=DOT_PRECISION)

    # Written out here rather than through _store_grad_rows: with the helper (per-tensor store order)
    # ptxas gave this kernel up to 26 more registers (sm_90, w = 16, fp16, no dropout: 142 -> 168).
    dkv_rows = dkv_ptr + img * stride_dkv_b + k_row * stride_dkv_h + k_col * stride_dkv_w
    k_tok_mask = (k_valid & ~k_is_reg)[:, None]
    tl.store(_tile_ptrs(dkv_rows + C, ch, ALIGN, HEAD_DIM), _round(dk, dkv_ptr.dtype.element_ty, UPCAST_DOT),
             mask=k_tok_mask)
    tl.store(_tile_ptrs(dkv_rows + 2 * C, ch, ALIGN, HEAD_DIM), _round(dv, dkv_ptr.dtype.element_ty, UPCAST_DOT),
             mask=k_tok_mask)
    dreg_win = dreg_ptr + win * stride_dreg_win
    tl.store(_tile_ptrs(dreg_win + reg_k_off + seq_k * stride_dreg_r, ch, 16, HEAD_DIM), dk, mask=k_is_reg[:, None])
    tl.store(_tile_ptrs(dreg_win + reg_v_off + seq_k * stride_dreg_r, ch, 16, HEAD_DIM), dv, mask=k_is_reg[:, None])


# ----------------------------------------------------------------------------------------------
# bias-table gradient: the partial dS sums -> the (table_size, heads) table gradient
# ----------------------------------------------------------------------------------------------


@triton.jit
def _slot_sum(base, stride_slot, slots, offsets, mask):
    """sum over the partial-sum slots (slots >= 1) of one tile of (query, key) offsets (fp32, 0
    where masked)."""
    acc = tl.load(base + offsets, mask=mask, other=0.0)
    for slot in range(1, slots):
        acc += tl.load(base + slot * stride_slot + offsets, mask=mask, other=0.0)
    return acc


@triton.jit
def bias_table_gradient_kernel(
    dbias_ptr, stride_slot, stride_head, stride_q, slots,
    out_ptr, stride_out_t, stride_out_h,
    WINDOW: tl.constexpr, NUM_REG: tl.constexpr, Q_START: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16_RTNE: tl.constexpr,
):
    # One program per (table entry, head): the sum, over the slots and over every (query, key)
    # pair whose bias is that entry, of dbias[slot, head, query - Q_START, key]. The pairs of an
    # entry follow from _bias_tile's index formula, inverted: token entry e is the offset
    # (dx, dy) = (e // span, e % span) - (w - 1) between query token (a, b) and key token
    # (a - dx, b - dy); the last entry takes every pair with a register query or key. Fixed
    # summation order: deterministic.
    entry = tl.program_id(0)
    head = tl.program_id(1)
    span: tl.constexpr = 2 * WINDOW - 1
    SEQ: tl.constexpr = NUM_REG + WINDOW * WINDOW
    base = dbias_ptr + head.to(tl.int64) * stride_head
    if entry < span * span:
        dx = entry // span - (WINDOW - 1)
        dy = entry % span - (WINDOW - 1)
        t = tl.arange(0, BLOCK_T)  # the query token (a, b) = (t // w, t % w)
        ka = t // WINDOW - dx
        kb = t % WINDOW - dy
        valid = (t < WINDOW * WINDOW) & (ka >= 0) & (ka < WINDOW) & (kb >= 0) & (kb < WINDOW)
        offsets = (NUM_REG + t - Q_START) * stride_q + NUM_REG + ka * WINDOW + kb
        total = tl.sum(_slot_sum(base, stride_slot, slots, offsets, valid), axis=0)
    else:
        # register keys of every query row, then (with register queries, Q_START = 0) the token
        # keys of the register query rows
        r = tl.arange(0, BLOCK_R)
        total = 0.0
        for q0 in range(Q_START, SEQ, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            tile = _slot_sum(base, stride_slot, slots, (q - Q_START)[:, None] * stride_q + r[None, :],
                             (q < SEQ)[:, None] & (r < NUM_REG)[None, :])
            total += tl.sum(tl.sum(tile, axis=1), axis=0)
        if Q_START < NUM_REG:
            for k0 in range(NUM_REG, SEQ, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                tile = _slot_sum(base, stride_slot, slots, (r - Q_START)[:, None] * stride_q + k[None, :],
                                 (r < NUM_REG)[:, None] & (k < SEQ)[None, :])
                total += tl.sum(tl.sum(tile, axis=1), axis=0)
    value = total.to(tl.float32)
    if EMULATE_BF16_RTNE:
        value = round_fp32_to_bf16_nearest_even(value)
    tl.store(out_ptr + entry * stride_out_t + head * stride_out_h, value.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def is_long_sequence(window: int, num_registers: int) -> bool:
    """Whether r + w*w needs more than one key tile (the key-loop kernels, whose backward also
    reads the forward's output O)."""
    return _next_pow2(num_registers + window * window) > MAX_SEQ_TILE


def tile_config(window: int, num_registers: int, register_queries: bool, dtype: torch.dtype = torch.float16) -> dict:
    """Tile sizes, warps and pipeline stages for one window sequence (chosen from the compiled
    code's resource report, see the header). ``long`` selects the key-loop kernels (n > 128);
    raises ValueError beyond MAX_LONG_SEQ."""
    seq = num_registers + window * window
    q_start = 0 if register_queries else num_registers
    if is_long_sequence(window, num_registers):
        if seq > MAX_LONG_SEQ:
            raise ValueError(f"sequence r + w*w = {seq} is longer than {MAX_LONG_SEQ}")
        tiles = LONG_TILES[dtype == torch.float32]
        block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
        return dict(seq=seq, q_start=q_start, long=True, BLOCK_M=block_m, BLOCK_N=block_n,
                    q_tiles=triton.cdiv(seq - q_start, block_m), k_tiles=triton.cdiv(seq, block_n),
                    num_warps=tiles["num_warps"], fwd_stages=tiles["fwd_stages"], bwd_stages=tiles["bwd_stages"])
    block_n = max(16, _next_pow2(seq))
    block_m = max(16, min(64, _next_pow2(seq - q_start)))
    q_tiles = triton.cdiv(seq - q_start, block_m)
    # fp16/bf16: 4 warps for a 64-key tile (the chained dots put all warps along the 64 query rows;
    # 8 would duplicate work), 8 for 128 keys. fp32 (FMA dots) spills at 4 warps, not at 8.
    num_warps = 4 if block_n <= 64 and dtype != torch.float32 else 8
    # the forward's window loop prefetches the next window's q/k/v with 2 stages; the backward has
    # no loop
    return dict(seq=seq, q_start=q_start, long=False, BLOCK_M=block_m, BLOCK_N=block_n, q_tiles=q_tiles,
                k_tiles=1, num_warps=num_warps, fwd_stages=2, bwd_stages=1)


DROPOUT_BITS = 16


def dropout_threshold(p: float) -> tuple[int, float]:
    """The kernels keep an element when its 16 random bits are >= round(p * 2^16) and scale kept
    elements by 2^16 / (2^16 - threshold), the exact inverse of the keep probability (p is used
    to 2^-16 resolution)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    threshold = int(round(p * 2**DROPOUT_BITS))
    if threshold >= 2**DROPOUT_BITS:
        raise ValueError(f"dropout probability {p} rounds to 1 at {DROPOUT_BITS}-bit resolution")
    return threshold, 2**DROPOUT_BITS / (2**DROPOUT_BITS - threshold)


def unsupported_reason(window: int, num_registers: int, head_dim: int, dtype: torch.dtype,
                       dropout_p: float = 0.0) -> str | None:
    """Why these kernels cannot run this configuration, or None."""
    if dropout_p > 1.0 - 2.0 ** -(DROPOUT_BITS + 1):
        return f"attention dropout {dropout_p} rounds to 1 at the kernels' {DROPOUT_BITS}-bit resolution"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"window attention kernels support fp16/bf16/fp32, got {dtype}"
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"window attention kernels need dim_head a power of two in [16, 128], got {head_dim}"
    seq = num_registers + window * window
    if seq > MAX_LONG_SEQ:
        return (f"window attention kernels need r + w*w <= {MAX_LONG_SEQ}, got {num_registers} + "
                f"{window}*{window} = {seq}")
    return None


def _windows_per_program(num_windows: int, other_programs: int, target_programs: int, minimum: int) -> int:
    per = max(minimum, triton.cdiv(num_windows * other_programs, target_programs))
    return max(1, min(per, num_windows))


def _alloc(shape, dtype, device, fill_nan_when_poisoning=True):
    if POISON_OUTPUTS and fill_nan_when_poisoning:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _register_layout(reg_qkv: torch.Tensor, C: int, register_queries: bool):
    """Channel offsets of q, k, v inside the register rows: (r, 3C) with queries, (r, 2C) without."""
    if register_queries:
        if reg_qkv.shape[-1] != 3 * C:
            raise ValueError(f"register q/k/v rows must have {3 * C} channels, got {reg_qkv.shape[-1]}")
        return 0, C, 2 * C
    if reg_qkv.shape[-1] != 2 * C:
        raise ValueError(f"register k/v rows must have {2 * C} channels, got {reg_qkv.shape[-1]}")
    return 0, 0, C


def _check_inputs(qkv, reg_qkv, table, window, num_registers, heads, head_dim):
    if qkv.ndim != 4:
        raise ValueError(f"qkv must be (B, H, W, 3C), got shape {tuple(qkv.shape)}")
    B, H, W, C3 = qkv.shape
    C = heads * head_dim
    if C3 != 3 * C:
        raise ValueError(f"qkv has {C3} channels, expected 3 * heads * dim_head = {3 * C}")
    if H % window or W % window:
        raise ValueError(f"feature map {H}x{W} does not divide into {window}x{window} windows")
    if reg_qkv.ndim != 3 or reg_qkv.shape[1] != num_registers or reg_qkv.shape[0] not in (1, B):
        raise ValueError(f"register rows must be (1 or B, r={num_registers}, channels), got {tuple(reg_qkv.shape)}")
    if table.shape != ((2 * window - 1) ** 2 + 1, heads):
        raise ValueError(f"bias table must be {((2 * window - 1) ** 2 + 1, heads)}, got {tuple(table.shape)}")
    for name, t in (("qkv", qkv), ("register rows", reg_qkv)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have contiguous channels (stride 1), got strides {t.stride()}")
    if reg_qkv.dtype != qkv.dtype:
        raise ValueError(f"register rows are {reg_qkv.dtype}, qkv is {qkv.dtype}")
    return B, H, W, C


def _launch_geometry(qkv, reg_qkv, table, window, num_registers, heads, head_dim, register_queries):
    """Checked shapes, window counts, tile configuration and register q/k/v column offsets,
    shared by the forward and backward launchers."""
    B, H, W, C = _check_inputs(qkv, reg_qkv, table, window, num_registers, heads, head_dim)
    cfg = tile_config(window, num_registers, register_queries, qkv.dtype)
    offsets = _register_layout(reg_qkv, C, register_queries)
    nX, nY = H // window, W // window
    return (B, H, W, C, nX, nY, B * nX * nY), cfg, offsets


def _alignment(tensors, element_offsets, itemsize) -> int:
    """Largest power-of-two byte alignment (<= 16) of every row start the kernels form: tensor
    base addresses, row/pixel/batch strides and channel offsets (in elements)."""
    values = [t.data_ptr() for t in tensors if t is not None]
    for t in tensors:
        if t is not None:
            values += [st * itemsize for st, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1]
    values += [o * itemsize for o in element_offsets]
    align = 16
    while align > itemsize and any(v % align for v in values):
        align //= 2
    return align


def _check_int32_image(*tensors):
    # Offsets inside one image (pixel * stride + channel) are int32 in the kernels; the image and
    # window terms are int64.
    for t in tensors:
        if t is not None and t.dim() >= 4:
            extent = sum((n - 1) * st for n, st in zip(t.shape[-3:], t.stride()[-3:]))
            if extent >= 2**31:
                raise ValueError(f"one image spans {extent} elements; the kernels index inside an image with int32")


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def window_attention_forward(
    qkv, reg_qkv, table, *, window, num_registers, heads, head_dim, grid_pattern, register_queries,
    scale, dropout_p=0.0, seed=None, out=None, reg_out=None, lse=None,
):
    """Attention core over every window.

    qkv: (B, H, W, 3C) token q|k|v (channels contiguous). reg_qkv: (1 or B, r, 3C) register q|k|v
    when ``register_queries`` (block step), else (1 or B, r, 2C) register k|v (grid step); a batch
    of 1 is shared by every image. table: ((2w-1)^2 + 1, heads).
    Returns (out (B, H, W, C), reg_out (B, nX, nY, r, C) or None, lse (windows, heads, n - q0) fp32).
    ``out``/``reg_out``/``lse`` may be passed preallocated (contiguous).
    """
    (B, H, W, C, nX, nY, num_windows), cfg, (q_off, k_off, v_off) = _launch_geometry(
        qkv, reg_qkv, table, window, num_registers, heads, head_dim, register_queries)
    dev, dtype = qkv.device, qkv.dtype
    if out is None:
        out = _alloc((B, H, W, C), dtype, dev)
    if register_queries and reg_out is None:
        reg_out = _alloc((B, nX, nY, num_registers, C), dtype, dev)
    if lse is None:
        lse = _alloc((num_windows, heads, cfg["seq"] - cfg["q_start"]), torch.float32, dev)
    reg_out_arg = reg_out if register_queries else out
    reg_out_view = reg_out_arg.view(num_windows, num_registers, C) if register_queries else None
    if num_windows == 0:
        return out, reg_out, lse

    _check_int32_image(qkv, out)
    threshold, keep_scale = dropout_threshold(dropout_p)
    align = _alignment([qkv, reg_qkv, out, reg_out], [C, k_off, v_off], qkv.element_size())
    reg_batch_stride = reg_qkv.stride(0) if reg_qkv.shape[0] > 1 else 0
    args = (
        qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        reg_qkv, reg_batch_stride, reg_qkv.stride(1), q_off, k_off, v_off,
        table, table.stride(0), table.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        reg_out_arg, *((reg_out_view.stride(0), reg_out_view.stride(1)) if register_queries else (0, 0)),
        lse, lse.stride(0), lse.stride(1),
    )
    scalars = (float(scale) * LOG2E, seed_pointer(seed, threshold > 0, table), threshold, keep_scale)
    constexprs = dict(
        WINDOW=window, NUM_REG=num_registers, HEAD_DIM=head_dim, Q_START=cfg["q_start"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GRID_PATTERN=bool(grid_pattern),
        DROPOUT=threshold > 0, ALIGN=align, UPCAST_DOT=interpreter_upcasts_dot(dtype), DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["fwd_stages"],
    )
    if cfg["long"]:  # one window per program, a loop over key tiles
        window_attention_long_fwd_kernel[(num_windows, heads, cfg["q_tiles"])](
            *args, C, heads, nX, nY, *scalars, **constexprs)
        return out, reg_out, lse
    wpp = _windows_per_program(num_windows, heads * cfg["q_tiles"], target_programs=4096, minimum=1)
    grid = (triton.cdiv(num_windows, wpp), heads, cfg["q_tiles"])
    window_attention_fwd_kernel[grid](*args, C, heads, nX, nY, num_windows, wpp, *scalars, **constexprs)
    return out, reg_out, lse


def window_attention_backward(
    qkv, reg_qkv, table, lse, d_out, d_reg_out, *, window, num_registers,
    heads, head_dim, grid_pattern, register_queries, scale, dropout_p=0.0, seed=None, dqkv=None,
    out=None, reg_out=None,
):
    """Gradients of :func:`window_attention_forward` (same arguments; its output lse; d_out
    (B, H, W, C) and d_reg_out (B, nX, nY, r, C), or None without register queries).
    Long sequences (``is_long_sequence``) also need the forward's outputs ``out`` and, with
    register queries, ``reg_out`` (delta = rowsum(dO * O)); the one-tile kernel ignores them.

    Returns (dqkv (B, H, W, 3C) in qkv's dtype, d_reg (reg_qkv's shape, fp32: summed over the
    windows sharing each row), d_table (table's shape and dtype)).
    """
    (B, H, W, C, nX, nY, num_windows), cfg, (q_off, k_off, v_off) = _launch_geometry(
        qkv, reg_qkv, table, window, num_registers, heads, head_dim, register_queries)
    dev, dtype = qkv.device, qkv.dtype
    seq, q_start, q_tiles = cfg["seq"], cfg["q_start"], cfg["q_tiles"]
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if d_out.shape != (B, H, W, C) or d_out.stride(-1) != 1:
        raise ValueError(f"d_out must be (B, H, W, C) with contiguous channels, got {tuple(d_out.shape)} {d_out.stride()}")
    if dqkv is None:
        dqkv = _alloc((B, H, W, 3 * C), dtype, dev)
    if num_windows == 0:
        return dqkv.zero_(), torch.zeros(reg_qkv.shape, dtype=torch.float32, device=dev), \
            torch.zeros(table.shape, dtype=table.dtype, device=dev)

    if register_queries:
        d_reg_out_v = d_reg_out.reshape(num_windows, num_registers, C)
        if d_reg_out_v.stride(-1) != 1:
            d_reg_out_v = d_reg_out_v.contiguous()
        d_reg_out_strides = (d_reg_out_v.stride(0), d_reg_out_v.stride(1))
    else:  # no register query rows: never read
        d_reg_out_v, d_reg_out_strides = d_out, (0, 0)
    if cfg["long"]:
        return _long_backward(
            qkv, reg_qkv, table, lse, d_out, d_reg_out_v, d_reg_out_strides, out, reg_out, dqkv,
            (B, H, W, C, nX, nY, num_windows), cfg, (q_off, k_off, v_off), window=window, num_registers=num_registers,
            heads=heads, head_dim=head_dim, grid_pattern=grid_pattern, register_queries=register_queries, scale=scale,
            dropout_p=dropout_p, seed=seed)

    # Token dK/dV: straight into dqkv with one query tile, else per-tile fp32 partials.
    if q_tiles == 1:
        dkv, dkv_tile_stride, dk_off, dv_off = dqkv, 0, C, 2 * C
    else:
        dkv = _alloc((q_tiles, B, H, W, 2 * C), torch.float32, dev)
        dkv_tile_stride, dk_off, dv_off = dkv.stride(0), 0, C
    dkv_strides = (dkv.stride(-4), dkv.stride(-3), dkv.stride(-2))
    c_reg = reg_qkv.shape[-1]
    if q_tiles == 1:
        dreg = _alloc((1, num_windows, num_registers, c_reg), torch.float32, dev)
    else:  # register query rows sit in tile 0 only: the other tiles' q part must read as zero
        dreg = torch.zeros((q_tiles, num_windows, num_registers, c_reg), dtype=torch.float32, device=dev)

    _check_int32_image(qkv, d_out, dqkv)
    threshold, keep_scale = dropout_threshold(dropout_p)
    align = _alignment([qkv, reg_qkv, d_out, d_reg_out_v if register_queries else None, dqkv],
                       [C, k_off, v_off], qkv.element_size())
    if q_tiles > 1:
        align = min(align, _alignment([dkv], [C], dkv.element_size()))
    slots = min(num_windows, DBIAS_SLOTS)
    dbias = _zeroed_bias_partials(slots, heads, seq, q_start, dev)
    reg_batch_stride = reg_qkv.stride(0) if reg_qkv.shape[0] > 1 else 0
    window_attention_bwd_kernel[(num_windows, heads, q_tiles)](
        qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        reg_qkv, reg_batch_stride, reg_qkv.stride(1), q_off, k_off, v_off,
        table, table.stride(0), table.stride(1),
        d_out, d_out.stride(0), d_out.stride(1), d_out.stride(2),
        d_reg_out_v, *d_reg_out_strides,
        lse, lse.stride(0), lse.stride(1),
        dqkv, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
        dkv, dkv_tile_stride, *dkv_strides, dk_off, dv_off,
        dreg, dreg.stride(0), dreg.stride(1), dreg.stride(2),
        dbias, dbias.stride(0), dbias.stride(1), dbias.stride(2), slots,
        C, heads, nX, nY,
        float(scale) * LOG2E, float(scale), seed_pointer(seed, threshold > 0, table), threshold, keep_scale,
        WINDOW=window, NUM_REG=num_registers, HEAD_DIM=head_dim, Q_START=q_start,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GRID_PATTERN=bool(grid_pattern),
        DROPOUT=threshold > 0, ALIGN=align, UPCAST_DOT=interpreter_upcasts_dot(dtype), DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["bwd_stages"],
    )
    if q_tiles > 1:
        dqkv[..., C:] = dkv.sum(0).to(dtype)

    # Register rows: sum over the windows that share them (all windows, or those of one image).
    if reg_qkv.shape[0] == 1:
        d_reg = dreg.sum(dim=(0, 1)).unsqueeze(0)
    else:
        d_reg = dreg.view(q_tiles, B, nX * nY, num_registers, c_reg).sum(dim=(0, 2))

    # Bias table: the slots' dS sums -> table entries, in the table's dtype (one launch)
    d_table = bias_table_gradient(dbias, window=window, num_registers=num_registers, q_start=q_start,
                                  table_size=table.shape[0], dtype=table.dtype)
    return dqkv, d_reg, d_table


def long_dbias_slots(num_windows: int, heads: int, seq: int, q_start: int) -> int:
    """Partial sums of the bias gradient for the key-loop kernels: up to DBIAS_SLOTS, fewer where
    DBIAS_SLOTS (heads, n - q0, n) fp32 sums would pass DBIAS_LONG_BUDGET bytes (at least one)."""
    per_slot = heads * (seq - q_start) * seq * 4
    return max(1, min(num_windows, DBIAS_SLOTS, DBIAS_LONG_BUDGET // per_slot))


def _long_backward(qkv, reg_qkv, table, lse, d_out, d_reg_out_v, d_reg_out_strides, out, reg_out,
                   dqkv, geometry, cfg, offsets, *, window, num_registers, heads, head_dim, grid_pattern,
                   register_queries, scale, dropout_p, seed):
    """Backward of the key-loop forward: the dQ kernel (delta, dQ, bias gradient) then the dK/dV
    kernel (which reads the dQ kernel's delta)."""
    B, H, W, C, nX, nY, num_windows = geometry
    q_off, k_off, v_off = offsets
    dev, dtype = qkv.device, qkv.dtype
    seq, q_start = cfg["seq"], cfg["q_start"]
    if out is None or out.shape != (B, H, W, C) or out.stride(-1) != 1:
        raise ValueError(f"sequences longer than {MAX_SEQ_TILE} need the forward's output (B, H, W, C) with "
                         f"contiguous channels (out=), got {None if out is None else tuple(out.shape)}")
    if register_queries:
        if reg_out is None or reg_out.shape != (B, nX, nY, num_registers, C):
            raise ValueError(f"sequences longer than {MAX_SEQ_TILE} with register queries need the forward's "
                             "register outputs (reg_out=)")
        reg_out_v = reg_out.reshape(num_windows, num_registers, C)
        if reg_out_v.stride(-1) != 1:
            reg_out_v = reg_out_v.contiguous()
        reg_out_strides = (reg_out_v.stride(0), reg_out_v.stride(1))
    else:  # no register query rows: never read
        reg_out_v, reg_out_strides = out, (0, 0)

    c_reg = reg_qkv.shape[-1]
    dreg = _alloc((num_windows, num_registers, c_reg), torch.float32, dev)  # q part: dQ kernel; k, v: dK/dV kernel
    delta = _alloc((num_windows, heads, seq - q_start), torch.float32, dev)
    slots = long_dbias_slots(num_windows, heads, seq, q_start)
    dbias = _zeroed_bias_partials(slots, heads, seq, q_start, dev)

    _check_int32_image(qkv, d_out, dqkv, out)
    threshold, keep_scale = dropout_threshold(dropout_p)
    align = _alignment([qkv, reg_qkv, d_out, out, d_reg_out_v if register_queries else None,
                        reg_out_v if register_queries else None, dqkv], [C, k_off, v_off], qkv.element_size())
    reg_batch_stride = reg_qkv.stride(0) if reg_qkv.shape[0] > 1 else 0
    inputs = (
        qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        reg_qkv, reg_batch_stride, reg_qkv.stride(1), q_off, k_off, v_off,
        table, table.stride(0), table.stride(1),
    )
    grads_in = (
        d_out, d_out.stride(0), d_out.stride(1), d_out.stride(2),
        d_reg_out_v, *d_reg_out_strides,
        lse, lse.stride(0), lse.stride(1),
        delta, delta.stride(0), delta.stride(1),
    )
    scalars = (C, heads, nX, nY, float(scale) * LOG2E, float(scale), seed_pointer(seed, threshold > 0, table),
               threshold, keep_scale)
    constexprs = dict(
        WINDOW=window, NUM_REG=num_registers, HEAD_DIM=head_dim, Q_START=q_start,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GRID_PATTERN=bool(grid_pattern),
        DROPOUT=threshold > 0, ALIGN=align, UPCAST_DOT=interpreter_upcasts_dot(dtype), DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["bwd_stages"],
    )
    window_attention_long_bwd_dq_kernel[(num_windows, heads, cfg["q_tiles"])](
        *inputs,
        out, out.stride(0), out.stride(1), out.stride(2),
        reg_out_v, *reg_out_strides,
        *grads_in,
        dqkv, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
        dreg, dreg.stride(0), dreg.stride(1),
        dbias, dbias.stride(0), dbias.stride(1), dbias.stride(2), slots,
        *scalars, **constexprs,
    )
    window_attention_long_bwd_dkv_kernel[(num_windows, heads, cfg["k_tiles"])](
        *inputs,
        *grads_in,
        dqkv, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
        dreg, dreg.stride(0), dreg.stride(1),
        *scalars, **constexprs,
    )

    # Register rows: sum over the windows that share them (all windows, or those of one image).
    if reg_qkv.shape[0] == 1:
        d_reg = dreg.sum(0).unsqueeze(0)
    else:
        d_reg = dreg.view(B, nX * nY, num_registers, c_reg).sum(1)
    d_table = bias_table_gradient(dbias, window=window, num_registers=num_registers, q_start=q_start,
                                  table_size=table.shape[0], dtype=table.dtype)
    return dqkv, d_reg, d_table


def _zeroed_bias_partials(slots, heads, seq, q_start, device):
    """The zero-filled fp32 (slots, heads, n - q_start, n) partial sums the backward kernels
    atomically add dS into."""
    return torch.zeros((slots, heads, seq - q_start, seq), dtype=torch.float32, device=device)


def bias_table_gradient(dbias, *, window: int, num_registers: int, q_start: int, table_size: int,
                        dtype: torch.dtype, out=None):
    """The (table_size, heads) gradient of the relative-position bias table, in ``dtype``, from the
    partial dS sums ``dbias`` (slots, heads, n - q_start, n) fp32: one launch (one program per
    table entry and head), deterministic. ``out``: a preallocated (table_size, heads) tensor."""
    slots, heads, rows, seq = dbias.shape
    span = 2 * window - 1
    if seq != num_registers + window * window or rows != seq - q_start or q_start not in (0, num_registers):
        raise ValueError(f"dbias {tuple(dbias.shape)} does not match window {window}, {num_registers} registers, "
                         f"first query row {q_start}")
    if table_size != span * span + 1:
        raise ValueError(f"a window of {window} has a bias table of {span * span + 1} entries, got {table_size}")
    if dbias.dtype != torch.float32 or dbias.stride(-1) != 1:
        raise ValueError("dbias must be fp32 with contiguous keys")
    if out is None:
        out = _alloc((table_size, heads), dtype, dbias.device)
    elif out.shape != (table_size, heads) or out.dtype != dtype:
        raise ValueError(f"out must be a ({table_size}, {heads}) {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    if heads == 0:
        return out
    if slots == 0:
        return out.zero_()
    bias_table_gradient_kernel[(table_size, heads)](
        dbias, dbias.stride(0), dbias.stride(1), dbias.stride(2), slots,
        out, out.stride(0), out.stride(1),
        WINDOW=window, NUM_REG=num_registers, Q_START=q_start,
        BLOCK_T=triton.next_power_of_2(window * window), BLOCK_Q=32,
        BLOCK_R=max(2, triton.next_power_of_2(num_registers)), BLOCK_K=64,
        EMULATE_BF16_RTNE=INTERPRET and dtype == torch.bfloat16, num_warps=4,
    )
    return out
