"""Window attention + residual for the block and grid steps of a MaxViT block.

Layout contract: ``x`` is a (B, H, W, C) tensor of any strides (usually the channels-last
view ``nchw.permute(0, 2, 3, 1)`` of the feature map); the result is a new (B, H, W, C)
tensor. Windows are

- ``"block"``: contiguous w x w tiles, pixel (X*w + a, Y*w + b) is token (a, b) of window (X, Y);
- ``"grid"``: dilated, with n = H // w, pixel (a*n + X, b*n + Y) is token (a, b) of window (X, Y).

Each window's sequence is [r register rows, w*w tokens]. ``registers`` is (r, C) for rows shared
by every window of every image (block step) or (B, r, C) for rows shared by the windows of one
image (grid step).

Fused path (``fused=True`` where the kernels can run; see ``kernels/window_attention.py``), per
step, in eval mode 4 launches (block step) or 3 (grid step):

1. LayerNorm + qkv projection of the tokens AND the register rows in one Triton launch
   (``maxvit_fast::layernorm_linear``, ``kernels/layernorm_linear.py``): the tokens' q/k/v over the
   whole map, the register rows' once per block when they are shared (q/k/v) or once per image in
   the grid step (k/v only: their outputs are dropped). Its backward recomputes the LayerNorm
   only (not the projection) and runs the linear and LayerNorm backward with torch ops (exact
   gradients; see ops/layernorm_linear.py). Where that kernel cannot run (more rows than its int32
   indexing allows) LayerNorm + cuBLAS per row set, as before.
2. The Triton attention core (``maxvit_fast::window_attention_core``, Triton backward). Sequences
   r + w*w > 128 (window >= 12) run the key-loop kernels, whose backward takes delta = rowsum(dO * O):
   for them (only) the op saves its outputs O for the backward (no extra memory: the output
   projection's backward keeps O anyway).
3. Output projection + residual as one ``addmm`` for the tokens; for the register rows of every
   window (block step) one ``baddbmm`` with the shared rows as the broadcast residual (no
   per-window copy of them). When autograd records (training), the register rows keep an
   ``addmm`` over an expanded copy of their residual (the baddbmm's weight gradient would be a
   (windows, C, C) batch summed afterwards). With output dropout (training), projection, dropout
   and residual add of the tokens AND (block step) the register rows of every window are one
   Triton launch (``maxvit_fast::linear_dropout_residual``, ops/output_projection.py: the
   feed-forward's ff_down_kernel without bias, the register rows as its second row set, their
   residual the shared (1, r, C) rows expanded over the windows with stride 0, no copy); the
   mask is drawn in the kernel from the attention core's seed on stream 1 (the core's counters
   never use it), the register rows numbered after the tokens (rows B*H*W + i), and regenerated
   in the backward: one dropout_grad launch for both sets, one mm for both input gradients and
   mm + in-place addmm_ for the weight gradient. Eval keeps cuBLAS (one launch either way, a
   tuned GEMM). With autograd recording, the tokens' residual is added with x detached and its
   gradient reaches step 1's backward through that op's carrier output
   (``route_residual_gradient``, ops/layernorm_linear.py), which adds it inside the LayerNorm
   backward kernel: no autograd sum of x's two gradients (-1 launch and one x-sized write per
   step in the backward).

Training step, counted (``maxvit_fast.traffic``, Triton launches dry-run; MaxViT-T, 224 x 224,
batch 1; ``TRITON_INTERPRET=1 maxvit-bench --traffic --train --dtype bf16``), attention forward
sections before -> after the fused path: block 143 -> 44 launches, 16.5 -> 9.1 MiB/image; grid
88 -> 44 launches, 15.7 -> 8.8 MiB/image (fp32: 32.9 -> 18.0 and 31.2 -> 17.4 MiB). Backward
section: 165 fewer launches and 32.7 MiB less (bf16; fp32 61.9 MiB less before the one-launch
output projection, not recounted): no qkv recompute, no slice_backward, no stored dropout
masks, one zero-fill instead of two, no transpose copy for the bias-table gradient, and the
output projection's two row sets in one launch. That last change alone (block step, training
with output dropout): forward 55 -> 44 launches, 9.07 -> 9.07 MiB/image (the same outputs
written, one launch instead of two); backward 1397 -> 1364 launches, 293.16 -> 291.45
MiB/image (per block step: dropout_grad 2 -> 1, matmuls 4 -> 3 (mm, mm, in-place addmm_), the
add of the two weight gradients gone: -3 launches and the (C, C) add's output).
One block step at C = 64 (56 x 56, r = 4, bf16): forward 13 -> 4 launches, backward 39 -> 30,
then 22 with the bias-table gradient as one launch (kernels/window_attention.py
bias_table_gradient; 4.61 -> 4.46 MiB; the reference's autograd: 26 launches, 10.3 MiB).
Eval: unchanged (4 / 3 launches per step). GPU speed: not measured.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import kernels_unavailable_reason, use_kernels
from ..reference import Attention
from .layernorm_linear import layernorm_linear, route_residual_gradient
from .layernorm_linear import unsupported_reason as layernorm_linear_unsupported
from .library import custom_op, draw_seed, seed_tensor
from .output_projection import linear_dropout_residual

# philox stream of the output dropout (kernels/feedforward.py: STREAM_OUT), tokens and register
# rows alike: the register rows are numbered after the tokens (rows M + i, M = B*H*W)
_STREAM_OUT = 1


def window_partition(x: torch.Tensor, window: int, pattern: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, nX, nY, w*w, C) window tokens in row-major (a, b) order."""
    b, h, w_, c = x.shape
    nx, ny = h // window, w_ // window
    if pattern == "block":
        t = x.reshape(b, nx, window, ny, window, c).permute(0, 1, 3, 2, 4, 5)
    elif pattern == "grid":
        t = x.reshape(b, window, nx, window, ny, c).permute(0, 2, 4, 1, 3, 5)
    else:
        raise ValueError(f"pattern must be 'block' or 'grid', got {pattern!r}")
    return t.reshape(b, nx, ny, window * window, c)


def window_unpartition(t: torch.Tensor, window: int, pattern: str) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B, nX, nY, w*w, C) -> (B, H, W, C)."""
    b, nx, ny, _, c = t.shape
    t = t.reshape(b, nx, ny, window, window, c)
    if pattern == "block":
        t = t.permute(0, 1, 3, 2, 4, 5)  # b, X, a, Y, b, c
        return t.reshape(b, nx * window, ny * window, c)
    if pattern == "grid":
        t = t.permute(0, 3, 1, 4, 2, 5)  # b, a, X, b, Y, c
        return t.reshape(b, window * nx, window * ny, c)
    raise ValueError(f"pattern must be 'block' or 'grid', got {pattern!r}")


def _reference(x, registers, attn: Attention, pattern: str):
    w, r = attn.window_size, attn.num_registers
    b, _, _, c = x.shape
    tokens = window_partition(x, w, pattern)  # (B, nX, nY, w*w, C)
    nx, ny = tokens.shape[1:3]
    if registers.ndim == 2:
        regs = registers.expand(b, nx, ny, r, c)
    else:
        regs = registers[:, None, None].expand(b, nx, ny, r, c)
    seq = torch.cat([regs, tokens], dim=3).reshape(b * nx * ny, r + w * w, c)
    seq = attn(seq) + seq
    seq = seq.reshape(b, nx, ny, r + w * w, c)
    return window_unpartition(seq[:, :, :, r:], w, pattern), seq[:, :, :, :r]


def _check_arguments(x, registers, attn, pattern):
    if pattern not in ("block", "grid"):
        raise ValueError(f"pattern must be 'block' or 'grid', got {pattern!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {tuple(x.shape)}")
    b, h, w_, c = x.shape
    w, r = attn.window_size, attn.num_registers
    if c != attn.heads * attn.dim_head:
        raise ValueError(f"x has {c} channels, the attention module expects {attn.heads * attn.dim_head}")
    if h % w or w_ % w:
        raise ValueError(f"feature map {h}x{w_} does not divide into {w}x{w} windows")
    if registers.shape not in ((r, c), (b, r, c)):
        raise ValueError(f"registers must be ({r}, {c}) or ({b}, {r}, {c}), got {tuple(registers.shape)}")


def _fused_unsupported(x, registers, attn) -> str | None:
    if kernels_unavailable_reason(x) is not None:
        # use_kernels reports that itself; importing the kernel module now would create its
        # @triton.jit functions in the wrong mode (interpreter off) for the rest of the process
        return None
    from ..kernels import window_attention as K
    attn_p = float(attn.attend[1].p) if attn.training else 0.0
    reason = K.unsupported_reason(attn.window_size, attn.num_registers, attn.dim_head, x.dtype, attn_p)
    if reason is not None:
        return reason
    tensors = [t for t in (registers, attn.norm.weight, attn.norm.bias, attn.to_qkv.weight, attn.to_qkv.bias,
                           attn.to_out[0].weight, attn.rel_pos_bias.weight) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        return "window attention kernels need x, registers and the attention weights in one dtype"
    if any(t.device != x.device for t in tensors):
        return "window attention kernels need x, registers and the attention weights on one device"
    return None


# torch.library ops: the Triton attention core (forward and backward) as opaque ops with
# shape-only fake implementations, so torch.compile traces the fused model without graph breaks.
# The dropout seed is a 1-element int64 tensor on the inputs' device (None without dropout).

@custom_op("window_attention_core")
def window_attention_core_op(
    qkv: torch.Tensor, reg_qkv: torch.Tensor, table: torch.Tensor, window: int,
    num_registers: int, heads: int, head_dim: int, grid_pattern: bool, register_queries: bool, scale: float,
    dropout_p: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) (dropout) @ v over every window.

    qkv (B, H, W, 3C), register rows reg_qkv (1 or B, r, 3C or 2C), the bias table. Returns the
    per-head outputs (B, H, W, C), the register rows' (B, nX, nY, r, C) with register queries
    (else an empty tensor) and the fp32 log-sum-exp the backward needs.
    """
    from ..kernels import window_attention as K

    out, reg_out, lse = K.window_attention_forward(
        qkv, reg_qkv, table, window=window, num_registers=num_registers, heads=heads, head_dim=head_dim,
        grid_pattern=grid_pattern, register_queries=register_queries, scale=scale, dropout_p=dropout_p,
        seed=seed,
    )
    if reg_out is None:
        reg_out = qkv.new_empty((0,))
    return out, reg_out, lse


@window_attention_core_op.register_fake
def _(qkv, reg_qkv, table, window, num_registers, heads, head_dim, grid_pattern,
      register_queries, scale, dropout_p, seed):
    from ..kernels import window_attention as K

    b, h, w, _ = qkv.shape
    c, nx, ny = heads * head_dim, h // window, w // window
    cfg = K.tile_config(window, num_registers, register_queries, qkv.dtype)
    out = qkv.new_empty((b, h, w, c))
    reg_out = qkv.new_empty((b, nx, ny, num_registers, c) if register_queries else (0,))
    lse = qkv.new_empty((b * nx * ny, heads, cfg["seq"] - cfg["q_start"]), dtype=torch.float32)
    return out, reg_out, lse


@custom_op("window_attention_core_backward")
def window_attention_core_backward_op(
    qkv: torch.Tensor, reg_qkv: torch.Tensor, table: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor,
    d_reg_out: Optional[torch.Tensor], window: int, num_registers: int, heads: int,
    head_dim: int, grid_pattern: bool, register_queries: bool, scale: float, dropout_p: float,
    seed: Optional[torch.Tensor], out: Optional[torch.Tensor] = None, reg_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d qkv, d reg_qkv, d table) in the dtypes of qkv, reg_qkv and table (Triton backward).

    ``out`` / ``reg_out``: the forward's outputs, needed (and read) only for sequences longer than
    one key tile (r + w*w > 128: delta = rowsum(dO * O)); ``reg_out`` only with register queries."""
    from ..kernels import window_attention as K

    dqkv, d_reg, d_table = K.window_attention_backward(
        qkv, reg_qkv, table, lse, d_out, d_reg_out, window=window, num_registers=num_registers,
        heads=heads, head_dim=head_dim, grid_pattern=grid_pattern, register_queries=register_queries, scale=scale,
        dropout_p=dropout_p, seed=seed, out=out, reg_out=reg_out,
    )
    return dqkv, d_reg.to(reg_qkv.dtype).contiguous(), d_table  # d_table: the table's dtype already


@window_attention_core_backward_op.register_fake
def _(qkv, reg_qkv, table, lse, d_out, d_reg_out, window, num_registers, heads, head_dim,
      grid_pattern, register_queries, scale, dropout_p, seed, out=None, reg_out=None):
    return (torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device),
            torch.empty(reg_qkv.shape, dtype=reg_qkv.dtype, device=reg_qkv.device),
            torch.empty(table.shape, dtype=table.dtype, device=table.device))


_CORE_CONFIG = ("window", "num_registers", "heads", "head_dim", "grid_pattern", "register_queries", "scale",
                "dropout_p", "seed")


def _is_long_sequence(window: int, num_registers: int) -> bool:
    """Sequences over one key tile (r + w*w > 128): their backward also needs the outputs O."""
    from ..kernels import window_attention as K

    return K.is_long_sequence(window, num_registers)


def _core_setup_context(ctx, inputs, output):
    qkv, reg_qkv, table, *config = inputs
    ctx.cfg = dict(zip(_CORE_CONFIG, config))
    saved = [qkv, reg_qkv, table, output[2]]
    # The one-tile backward forms delta = rowsum(P * dP) inside its tile and needs only the lse;
    # the key-loop backward takes delta = rowsum(dO * O), so it keeps O (the output projection's
    # backward keeps the same tensors for its weight gradient: no extra memory).
    if _is_long_sequence(ctx.cfg["window"], ctx.cfg["num_registers"]):
        saved += [output[0], output[1]]
    ctx.save_for_backward(*saved)
    # no zero-filled gradient for the lse (never used) or an unused output: None reaches the
    # backward, which fills only what its kernels read
    ctx.set_materialize_grads(False)


def _core_backward(ctx, d_out, d_reg_out, _d_lse):
    qkv, reg_qkv, table, lse, *outputs = ctx.saved_tensors
    cfg = ctx.cfg
    B, H, W, C3 = qkv.shape
    if d_out is None:
        d_out = qkv.new_zeros((B, H, W, C3 // 3))
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    if not cfg["register_queries"]:
        d_reg_out = None
    elif d_reg_out is None:
        w = cfg["window"]
        d_reg_out = qkv.new_zeros((B, H // w, W // w, cfg["num_registers"], C3 // 3))
    out, reg_out = outputs if outputs else (None, None)
    if not cfg["register_queries"]:
        reg_out = None
    dqkv, d_reg, d_table = window_attention_core_backward_op(
        qkv, reg_qkv, table, lse, d_out, d_reg_out, *cfg.values(), out, reg_out
    )
    return dqkv, d_reg, d_table, None, *(None for _ in _CORE_CONFIG)


window_attention_core_op.register_autograd(_core_backward, setup_context=_core_setup_context)


def _draw_seed(device) -> torch.Tensor:
    """The in-kernel dropout seed (tests replace this to fix it)."""
    return draw_seed(device)


def _project_residual(o, residual, weight):
    """``residual + o @ weight^T``: one cuBLAS addmm with the residual as input (no dropout)."""
    c = o.shape[-1]
    flat = torch.addmm(residual.reshape(-1, c), o.reshape(-1, c), weight.t())
    return flat.view(o.shape)


def _expand_registers(regs, o_reg):
    """The (1 or B, r, C) register rows as the (B, nX, nY, r, C) residual of every window: an
    expanded view (stride 0 over the windows), no copy."""
    b, nx, ny, r, c = o_reg.shape
    return regs[:, None, None].expand(b, nx, ny, r, c)


def _project_register_rows(o_reg, regs, weight):
    """``regs + o_reg @ weight^T`` for the register rows of every window (B, nX, nY, r, C), no
    output dropout.

    Shared register rows (block step, regs (1, r, C)) and no autograd graph: one ``baddbmm``
    over the windows with the (1, r, C) rows as the broadcast input and the weight expanded over
    the window batch (batch stride 0), so the residual rows are never copied per window. On
    CUDA, torch's baddbmm passes the expanded weight to cuBLAS strided-batched GEMM as batch
    stride 0 without a copy (read from aten/native/cuda/Blas.cpp; not verified on a GPU in this
    session); on the CPU torch 2.13 does not copy it for fp32/fp16 but makes a contiguous copy
    for bf16 (CPU runs are tests, not a target). With autograd the expanded weight's gradient
    would be a (windows, C, C) batch summed afterwards, so training keeps the addmm over an
    expanded copy of the (windows * r, C) residual rows."""
    r, c = regs.shape[-2], regs.shape[-1]
    windows = o_reg.numel() // (r * c)
    needs_graph = torch.is_grad_enabled() and (o_reg.requires_grad or regs.requires_grad or weight.requires_grad)
    if regs.shape[0] == 1 and not needs_graph:
        out = torch.baddbmm(regs, o_reg.view(windows, r, c), weight.t().expand(windows, c, c))
        return out.view(o_reg.shape)
    return _project_residual(o_reg, _expand_registers(regs, o_reg), weight)


def _fused(x, registers, attn: Attention, pattern: str, need_register_outputs: bool):
    c = x.shape[-1]
    w, r = attn.window_size, attn.num_registers
    norm, qkv_weight = attn.norm, attn.to_qkv.weight
    register_queries = bool(need_register_outputs)

    # LayerNorm + q/k/v projection of the tokens and the register rows: one Triton launch
    # (kernels/layernorm_linear.py); the register rows only need k and v without register queries
    # (grid step), so their output columns start at C. Where that kernel cannot run (rows beyond
    # its int32 indexing), LayerNorm + cuBLAS per row set.
    regs = registers if registers.ndim == 3 else registers.unsqueeze(0)  # (1 or B, r, C)
    use_kernel = layernorm_linear_unsupported(x, regs) is None
    # Training: x's two gradients (the residual's and the LayerNorm's) are summed inside the
    # LayerNorm backward kernel instead of by autograd in a pass over the map: the residual is
    # added with x detached, and its gradient reaches the LayerNorm + qkv op's backward through
    # the op's carrier output (route_residual_gradient).
    carry = use_kernel and torch.is_grad_enabled() and x.requires_grad
    qkv, reg_qkv, carrier = layernorm_linear(
        x, regs, norm.weight, norm.bias, qkv_weight, attn.to_qkv.bias, norm.eps,
        extra_first_col=0 if register_queries else c, use_kernel=use_kernel, residual_carrier=carry)
    residual = x.detach() if carry else x

    def joined(out):
        return route_residual_gradient(out, carrier) if carry else out

    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()

    training = attn.training
    attn_p = float(attn.attend[1].p) if training else 0.0
    out_weight, out_p = attn.to_out[0].weight, (float(attn.to_out[1].p) if training else 0.0)
    # one seed for the attention dropout and the output dropout (disjoint philox streams)
    seed = None
    if attn_p > 0.0 or out_p > 0.0:
        seed = seed_tensor(_draw_seed(x.device), x.device)
    o, o_reg, _ = window_attention_core_op(
        qkv, reg_qkv, attn.rel_pos_bias.weight, w, r, attn.heads, attn.dim_head, pattern == "grid",
        register_queries, float(attn.scale), attn_p, seed if attn_p > 0.0 else None,
    )

    if out_p > 0.0:
        # training with output dropout: projection, dropout and residual add of the tokens and
        # (block step) the register rows of every window in one Triton launch, the register
        # rows' residual the shared rows expanded (stride 0) and their dropout rows numbered
        # after the tokens'; one dropout_grad launch for both in the backward
        if not register_queries:
            return joined(linear_dropout_residual(o, out_weight, residual, out_p, seed, _STREAM_OUT)), None
        out, reg_out = linear_dropout_residual(o, out_weight, residual, out_p, seed, _STREAM_OUT, o_reg,
                                               _expand_registers(regs, o_reg))
        return joined(out), reg_out
    out = joined(_project_residual(o, residual, out_weight))
    reg_out = _project_register_rows(o_reg, regs, out_weight) if register_queries else None
    return out, reg_out


def window_attention_residual(
    x: torch.Tensor,
    registers: torch.Tensor,
    attn: Attention,
    pattern: str,
    fused: bool = False,
    need_register_outputs: bool = True,
):
    """``seq = attn(seq) + seq`` over every window of ``x``.

    Returns ``(x_new, register_rows)`` where ``register_rows`` is (B, nX, nY, r, C), the
    updated register rows of every window, or None when ``need_register_outputs`` is False
    (the grid step drops them, so the fused path does not compute their queries).
    """
    _check_arguments(x, registers, attn, pattern)
    if fused and use_kernels(x, fused, unsupported=_fused_unsupported(x, registers, attn)):
        return _fused(x, registers, attn, pattern, need_register_outputs)
    out, regs = _reference(x, registers, attn, pattern)
    return out, (regs if need_register_outputs else None)
