"""LayerNorm + Linear over two sets of rows in one kernel launch (``kernels/layernorm_linear.py``),
as the ``maxvit_fast::layernorm_linear`` torch.library op (fake implementation, autograd).

Used by the window attention for the q/k/v projection of a step's tokens and register rows.

Backward: the forward saves its inputs only (no normalised rows between forward and backward).
Per row set (the tokens; the extra rows with their weight rows ``first:``) the backward recomputes
the LayerNorm with ``aten.native_layer_norm`` (one launch: the rounded normalised rows xn and the
fp32 per-row mean / rstd), then

    dxn = dout @ W[first:]          dW[first:] += dout^T xn          db[first:] += dout.sum(0)
    dx, dln_w, dln_b = aten.native_layer_norm_backward(dxn, x, mean, rstd, ...)

which are exactly the ops autograd runs for ``F.linear(F.layer_norm(x))`` (same operands, same
rounding: the gradients equal the reference's). The previous backward differentiated a recompute
of the whole op with ``torch.func.vjp``, so it also recomputed the 3C-wide projection (discarded)
and, for the weight slice ``W[first:]``, zero-filled a full weight gradient (``slice_backward``).

Decision: recompute the statistics rather than have the forward kernel store them (8 B per row, as
the feed-forward's WRITE_STATS): xn is needed as the dW operand anyway, and rebuilding it from
stored statistics is one launch writing xn as well (a Triton kernel) or four elementwise torch
launches, so stored statistics would save nothing in launches or bytes written.

Counted with ``maxvit_fast.traffic`` (dry run, MaxViT-T, 224 x 224, batch 1, bf16 training
step; ``maxvit-bench --traffic --train --dtype bf16``), over the 22 attention steps: 66 fewer
matmul launches (the two qkv recomputes per step gone; the extra rows' dW is one addmm_ into
dW[first:]), no slice_backward (22 launches, 10.2 MiB of zero-filled weight gradients), 22 fewer
adds. GPU speed: not measured.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .library import custom_op


def reference(x, extra, ln_weight, ln_bias, weight, bias, eps: float, extra_first_col: int):
    """The op in torch ops: (LayerNorm(x) @ W^T + b, LayerNorm(extra) @ W[first:]^T + b[first:]
    or an empty tensor without extra rows)."""
    c = x.shape[-1]
    out = F.linear(F.layer_norm(x, (c,), ln_weight, ln_bias, eps), weight, bias)
    if extra is None:
        return out, x.new_empty((0,))
    extra_bias = None if bias is None else bias[extra_first_col:]
    extra_out = F.linear(F.layer_norm(extra, (c,), ln_weight, ln_bias, eps), weight[extra_first_col:], extra_bias)
    return out, extra_out


def unsupported_reason(x: torch.Tensor, extra: torch.Tensor | None) -> str | None:
    """Why the kernel cannot run on these rows (None when it can). Only call when the Triton
    kernels can run at all (dispatch.use_kernels): this imports the kernel module."""
    from ..kernels import layernorm_linear as K

    return K.unsupported_reason(x, extra)


@custom_op("layernorm_linear")
def layernorm_linear_op(
    x: torch.Tensor, extra: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
    extra_first_col: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x) @ W^T + b, LayerNorm(extra) @ W[first:]^T + b[first:]) in one launch; the
    second output is an empty tensor when ``extra`` is None. Outputs are contiguous."""
    from ..kernels import layernorm_linear as K

    out, extra_out = K.layernorm_linear(x, ln_weight, ln_bias, eps, weight, bias, extra=extra,
                                        extra_first_col=extra_first_col)
    return out, (x.new_empty((0,)) if extra_out is None else extra_out)


@layernorm_linear_op.register_fake
def _(x, extra, ln_weight, ln_bias, weight, bias, eps, extra_first_col):
    n = weight.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    if extra is None:
        return out, x.new_empty((0,))
    return out, extra.new_empty((*extra.shape[:-1], n - extra_first_col))


def _setup_context(ctx, inputs, output):
    *tensors, eps, extra_first_col = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps, ctx.extra_first_col = eps, extra_first_col


def _row_set_backward(d_out, x, ln_weight, ln_bias, weight, eps, needs, dw=None):
    """Gradients of ``F.linear(F.layer_norm(x), weight)`` (bias excluded) for one row set:
    (dx, d ln_weight, d ln_bias, dW), None where not needed (``needs``: x, ln_weight, ln_bias,
    weight). ``dw``: a weight gradient to accumulate this row set's into (in place)."""
    c, n = x.shape[-1], weight.shape[0]
    xn, mean, rstd = torch.ops.aten.native_layer_norm(x, (c,), ln_weight, ln_bias, eps)
    d_flat = d_out.reshape(-1, n)
    if needs[3]:
        if dw is None:
            dw = d_flat.t().mm(xn.reshape(-1, c))
        else:
            dw.addmm_(d_flat.t(), xn.reshape(-1, c))
    if not any(needs[:3]):
        return None, None, None, dw
    dxn = d_flat.mm(weight).view(x.shape)
    dx, dg, db = torch.ops.aten.native_layer_norm_backward(
        dxn, x, (c,), mean, rstd, ln_weight, ln_bias,
        [needs[0], needs[1] and ln_weight is not None, needs[2] and ln_bias is not None])
    return dx, dg, db, dw


def _backward(ctx, d_out, d_extra_out):
    x, extra, ln_weight, ln_bias, weight, bias = ctx.saved_tensors
    first = ctx.extra_first_col
    nx, ne, ng, nb, nw, nbias = ctx.needs_input_grad[:6]
    dx, dg, db, dw = _row_set_backward(d_out, x, ln_weight, ln_bias, weight, ctx.eps, (nx, ng, nb, nw))
    d_extra = None
    if extra is not None:
        # the extra rows' weight gradient goes straight into rows first: of dW (one addmm_)
        d_extra, dg_e, db_e, _ = _row_set_backward(d_extra_out, extra, ln_weight, ln_bias, weight[first:], ctx.eps,
                                                   (ne, ng, nb, nw), None if dw is None else dw[first:])
        dg = None if dg is None else dg + dg_e
        db = None if db is None else db + db_e
    d_bias = None
    if bias is not None and nbias:
        d_bias = d_out.reshape(-1, weight.shape[0]).sum(0)
        if extra is not None:
            d_bias[first:] += d_extra_out.reshape(-1, weight.shape[0] - first).sum(0)
    return dx, d_extra, dg, db, dw, d_bias, None, None


layernorm_linear_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm_linear(x, extra, ln_weight, ln_bias, weight, bias, eps: float, extra_first_col: int = 0,
                     use_kernel: bool = True):
    """The op (one Triton launch) when ``use_kernel``, else the torch reference (LayerNorm + cuBLAS
    per row set). Returns (out, extra_out or None); kernel outputs are contiguous."""
    if not use_kernel:
        out, extra_out = reference(x, extra, ln_weight, ln_bias, weight, bias, eps, extra_first_col)
    else:
        out, extra_out = layernorm_linear_op(x, extra, ln_weight, ln_bias, weight, bias, float(eps),
                                             int(extra_first_col))
    return out, (None if extra is None else extra_out)
