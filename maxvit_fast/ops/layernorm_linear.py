"""LayerNorm + Linear over two sets of rows in one kernel launch (``kernels/layernorm_linear.py``),
as the ``maxvit_fast::layernorm_linear`` torch.library op (fake implementation, autograd).

Used by the window attention for the q/k/v projection of a step's tokens and register rows.

Backward: the forward saves its inputs only (no normalised rows between forward and backward).
Per row set (the tokens; the extra rows with their weight rows ``first:``):

    dxn = dout @ W[first:]                                       (cuBLAS)
    dx, xn, dgamma / dbeta partials = LayerNorm backward(x, dxn)  (kernels/layernorm_backward.py)
    dW[first:] += dout^T xn          db[first:] += dout.sum(0)

The LayerNorm backward kernel recomputes the row statistics from x (they never leave the
program) and writes dx, the normalised rows xn (the dW operand, rounded as the forward's
LayerNorm output) and per-tile dgamma / dbeta sums into one buffer for both row sets; one sum and
one cast give dgamma and dbeta (``layernorm_backward_rows``, shared with the wide feed-forwards'
backward). Before, per row set ``aten.native_layer_norm`` (the recompute) and
``aten.native_layer_norm_backward``, and two adds for the parameter gradients of the two sets:
``maxvit-bench --traffic --train`` (MaxViT-T, 224, batch 1), training-step backward bf16 844 -> 793
launches, fp32 911 -> 792 (the fp32 feed-forwards from width 128 take the same kernel). Rows
wider than 4096 channels keep the aten ops; with no gradient for x, the rows or the LayerNorm
parameters only xn is recomputed (aten). Earlier still, the backward differentiated a recompute
of the whole op with ``torch.func.vjp``, so it also recomputed the 3C-wide projection (discarded)
and, for the weight slice ``W[first:]``, zero-filled a full weight gradient (``slice_backward``).

Residual gradient (training, the attention step ``x + proj(attn(LayerNorm(x)))``): x feeds this
op and the residual, so autograd would sum x's two gradients in a pass over the map (read two,
write one). Instead the op can return a third output, a carrier of x's shape that holds one
element (zeroed by the kernel, expanded with stride 0), the caller adds the residual with x
detached and joins the result with ``route_residual_gradient(y, carrier)``, an identity whose
backward hands y's gradient to the carrier too; this op's backward receives it as the carrier's
gradient and the LayerNorm backward kernel adds it into dx (its residual_grad input). Counted
(``maxvit-bench --traffic --train``, MaxViT-T, 224, batch 1): 22 launches and 3.45 MiB (bf16) /
6.9 MiB (fp32) fewer per training step, the 22 x-sized adds. (A custom op's outputs may not
alias its inputs or each other, so the carrier cannot be a view of x or of qkv; a zero-filled
one-element tensor made with torch would cost the launch the change saves.)

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


def _residual_carrier(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The op's third output: with ``wanted``, a tensor of x's shape over one element (expanded,
    stride 0: nothing allocated or written per element; the kernel zeroes the element), whose
    gradient is the residual gradient of x (see route_residual_gradient); else an empty tensor."""
    return x.new_empty((1,)).expand(x.shape) if wanted else x.new_empty((0,))


@custom_op("layernorm_linear")
def layernorm_linear_op(
    x: torch.Tensor, extra: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
    extra_first_col: int, residual_carrier: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LayerNorm(x) @ W^T + b, LayerNorm(extra) @ W[first:]^T + b[first:], carrier) in one launch;
    the second output is an empty tensor when ``extra`` is None. The first two are contiguous.
    ``residual_carrier``: the third output carries x's residual gradient into this op's backward
    (route_residual_gradient), else it is an empty tensor."""
    from ..kernels import layernorm_linear as K

    carrier = _residual_carrier(x, residual_carrier)
    out, extra_out = K.layernorm_linear(x, ln_weight, ln_bias, eps, weight, bias, extra=extra,
                                        extra_first_col=extra_first_col,
                                        carrier=carrier if residual_carrier else None)
    return out, (x.new_empty((0,)) if extra_out is None else extra_out), carrier


@layernorm_linear_op.register_fake
def _(x, extra, ln_weight, ln_bias, weight, bias, eps, extra_first_col, residual_carrier=False):
    n = weight.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    extra_out = x.new_empty((0,)) if extra is None else extra.new_empty((*extra.shape[:-1], n - extra_first_col))
    return out, extra_out, _residual_carrier(x, residual_carrier)


def _setup_context(ctx, inputs, output):
    *tensors, eps, extra_first_col, residual_carrier = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps, ctx.extra_first_col, ctx.residual_carrier = eps, extra_first_col, residual_carrier
    # no zero-filled gradient for an output without one (the carrier is x-sized)
    ctx.set_materialize_grads(False)


class _RouteResidualGradient(torch.autograd.Function):
    """Identity on y whose backward also hands y's gradient to the carrier."""

    @staticmethod
    def forward(ctx, y, carrier):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def route_residual_gradient(y: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
    """``y`` (= f(...) + x, computed with the residual x detached), whose gradient also goes to
    the carrier of layernorm_linear(x, ..., residual_carrier=True): that op's backward then adds
    it to x's gradient inside the LayerNorm backward kernel, instead of autograd summing x's two
    gradients (the residual's and the LayerNorm's) in a separate pass over the map."""
    return _RouteResidualGradient.apply(y, carrier)


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


@custom_op("layernorm_backward")
def layernorm_backward_op(
    x: torch.Tensor, dxn: torch.Tensor, residual: Optional[torch.Tensor], extra: Optional[torch.Tensor],
    d_extra_n: Optional[torch.Tensor], extra_residual: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor], eps: float, write_xn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LayerNorm backward of one or two row sets, (M, C) contiguous rows each, one launch of
    kernels/layernorm_backward.py per set: (dx, xn, d_extra, extra's xn, sums), xn only with
    ``write_xn`` and the extra ones only with ``extra`` (else empty tensors); sums (2, C) fp32 =
    (dgamma, dbeta) over both sets (one sum over the per-tile partials of one shared buffer)."""
    from ..kernels.layernorm_backward import layernorm_backward, layernorm_backward_tiles

    c = x.shape[1]
    sets = [(x, dxn, residual)] + ([(extra, d_extra_n, extra_residual)] if extra is not None else [])
    tiles = [layernorm_backward_tiles(t.shape[0], c) for t, _, _ in sets]
    partials = torch.empty((sum(tiles), 2, c), dtype=torch.float32, device=x.device)
    results, start = [], 0
    for (t, d, res), count in zip(sets, tiles):
        dx, xn, _ = layernorm_backward(t, d, ln_weight, ln_bias, eps, residual_grad=res, write_xn=write_xn,
                                       out_partials=partials[start:start + count])
        start += count
        results += [dx, xn if write_xn else x.new_empty((0,))]
    if extra is None:
        results += [x.new_empty((0,)), x.new_empty((0,))]
    return (*results, partials.sum(0))


@layernorm_backward_op.register_fake
def _(x, dxn, residual, extra, d_extra_n, extra_residual, ln_weight, ln_bias, eps, write_xn):
    def pair(t):
        if t is None:
            return [x.new_empty((0,)), x.new_empty((0,))]
        return [torch.empty_like(t), torch.empty_like(t) if write_xn else x.new_empty((0,))]
    return (*pair(x), *pair(extra), x.new_empty((2, x.shape[1]), dtype=torch.float32))


def layernorm_backward_rows(row_sets, ln_weight, ln_bias, eps: float, need_xn: bool, need_dg: bool, need_db: bool):
    """The LayerNorm backward of one or two row sets (layernorm_backward_op: the LayerNorm
    recomputed in the kernel). ``row_sets``: [(x (..., C), dxn (rows, C), residual gradient (rows,
    C) or None)]. Returns ([dx in x's shape], [xn (rows, C) or None: the forward's LayerNorm
    output, a weight-gradient operand], dgamma, dbeta (None unless needed))."""
    from ..kernels.layernorm_backward import MAX_CHANNELS

    c = row_sets[0][0].shape[-1]
    if c > MAX_CHANNELS:
        return _aten_layernorm_backward_rows(row_sets, ln_weight, ln_bias, eps, need_xn, need_dg, need_db)
    args = []  # (M, C) rows of each set (no copy for the model's layouts), None for a missing one
    for x, dxn, residual in row_sets + [(None, None, None)] * (2 - len(row_sets)):
        args += [None if t is None else t.reshape(-1, c).contiguous() for t in (x, dxn, residual)]
    dx, xn, d_extra, extra_xn, sums = layernorm_backward_op(*args, ln_weight, ln_bias, float(eps), need_xn)
    if ln_weight is not None and ln_bias is not None and ln_weight.dtype == ln_bias.dtype:
        sums = sums.to(ln_weight.dtype)  # one cast for both (none for fp32 parameters)
    dg = sums[0].to(ln_weight.dtype) if need_dg and ln_weight is not None else None
    db = sums[1].to(ln_bias.dtype) if need_db and ln_bias is not None else None
    dxs = [dx, d_extra][:len(row_sets)]
    xns = [xn, extra_xn][:len(row_sets)] if need_xn else [None] * len(row_sets)
    return [d.view(x.shape) for d, (x, _, _) in zip(dxs, row_sets)], xns, dg, db


def _aten_layernorm_backward_rows(row_sets, ln_weight, ln_bias, eps, need_xn, need_dg, need_db):
    """layernorm_backward_rows with aten's LayerNorm (recomputed) and its backward, for rows
    wider than the kernel takes."""
    c = row_sets[0][0].shape[-1]
    dxs, xns, dg, db = [], [], None, None
    for x, dxn, residual in row_sets:
        xn, mean, rstd = torch.ops.aten.native_layer_norm(x, (c,), ln_weight, ln_bias, eps)
        dx, dg_x, db_x = torch.ops.aten.native_layer_norm_backward(
            dxn.reshape(x.shape), x, (c,), mean, rstd, ln_weight, ln_bias,
            [True, need_dg and ln_weight is not None, need_db and ln_bias is not None])
        dxs.append(dx if residual is None else dx.add_(residual.reshape(x.shape)))
        xns.append(xn.reshape(-1, c) if need_xn else None)
        dg = dg_x if dg is None or dg_x is None else dg + dg_x
        db = db_x if db is None or db_x is None else db + db_x
    return dxs, xns, dg, db


def _kernel_backward(ctx, d_out, d_extra_out, d_residual, x, extra, ln_weight, ln_bias, weight):
    """(dx, d_extra, d ln_weight, d ln_bias, dW): per row set dxn = dout @ W[first:] (cuBLAS), the
    LayerNorm backward (layernorm_backward_rows: dx (+ the residual gradient), and xn for dW),
    dW[first:] += dout^T xn."""
    first, n = ctx.extra_first_col, weight.shape[0]
    nx, ne, ng, nb, nw = ctx.needs_input_grad[:5]
    sets = [(x, d_out.reshape(-1, n), weight, d_residual)]
    if extra is not None:
        sets.append((extra, d_extra_out.reshape(-1, n - first), weight[first:], None))
    d_inputs, xns, dg, db = layernorm_backward_rows([(t, d.mm(w), res) for t, d, w, res in sets], ln_weight,
                                                    ln_bias, ctx.eps, nw, ng, nb)
    dw = None
    if nw:  # the extra rows' weight gradient goes straight into rows first: of dW (one addmm_)
        dw = sets[0][1].t().mm(xns[0])
        if extra is not None:
            dw[first:].addmm_(sets[1][1].t(), xns[1])
    return (d_inputs[0] if nx else None), (d_inputs[1] if extra is not None and ne else None), dg, db, dw


def _backward(ctx, d_out, d_extra_out, d_residual):
    x, extra, ln_weight, ln_bias, weight, bias = ctx.saved_tensors
    first = ctx.extra_first_col
    nx, ne, ng, nb, nw, nbias = ctx.needs_input_grad[:6]
    # (gradients are not materialised: None for an output that got none)
    if d_out is None:
        d_out = x.new_zeros((*x.shape[:-1], weight.shape[0]))
    if extra is not None and d_extra_out is None:
        d_extra_out = extra.new_zeros((*extra.shape[:-1], weight.shape[0] - first))
    if not (nx and ctx.residual_carrier):
        d_residual = None  # (the empty third output's gradient, if any)
    if nx or ne or ng or nb:
        dx, d_extra, dg, db, dw = _kernel_backward(ctx, d_out, d_extra_out, d_residual,
                                                   x, extra, ln_weight, ln_bias, weight)
    else:  # only dW: the LayerNorm output, no LayerNorm backward
        dx, dg, db, dw = _row_set_backward(d_out, x, ln_weight, ln_bias, weight, ctx.eps, (nx, ng, nb, nw))
        d_extra = None
        if extra is not None:
            d_extra, dg_e, db_e, _ = _row_set_backward(d_extra_out, extra, ln_weight, ln_bias, weight[first:],
                                                       ctx.eps, (ne, ng, nb, nw), None if dw is None else dw[first:])
            dg = None if dg is None else dg + dg_e
            db = None if db is None else db + db_e
    d_bias = None
    if bias is not None and nbias:
        d_bias = d_out.reshape(-1, weight.shape[0]).sum(0)
        if extra is not None:
            d_bias[first:] += d_extra_out.reshape(-1, weight.shape[0] - first).sum(0)
    return dx, d_extra, dg, db, dw, d_bias, None, None, None


layernorm_linear_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm_linear(x, extra, ln_weight, ln_bias, weight, bias, eps: float, extra_first_col: int = 0,
                     use_kernel: bool = True, residual_carrier: bool = False):
    """The op (one Triton launch) when ``use_kernel``, else the torch reference (LayerNorm + cuBLAS
    per row set). Returns (out, extra_out or None, carrier or None); kernel outputs are contiguous.
    ``residual_carrier`` (kernel path only): also the carrier of x's residual gradient, see
    route_residual_gradient."""
    if not use_kernel:
        out, extra_out = reference(x, extra, ln_weight, ln_bias, weight, bias, eps, extra_first_col)
        carrier = None
    else:
        out, extra_out, carrier = layernorm_linear_op(x, extra, ln_weight, ln_bias, weight, bias, float(eps),
                                                      int(extra_first_col), bool(residual_carrier))
        carrier = carrier if residual_carrier else None
    return out, (None if extra is None else extra_out), carrier
