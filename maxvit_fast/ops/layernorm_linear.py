"""LayerNorm + Linear over two sets of rows in one kernel launch (``kernels/layernorm_linear.py``),
as the ``maxvit_fast::layernorm_linear`` torch.library op (fake implementation, autograd).

Used by the window attention for the q/k/v projection of a step's tokens and register rows.

Backward (documented split): the forward saves its inputs only; the backward recomputes
``F.linear(F.layer_norm(...))`` for both row sets with torch ops and differentiates that with
``torch.func.vjp`` (traced into the backward graph under torch.compile), so the gradients are
exactly those of the reference ops and the normalised rows are never kept between forward and
backward.
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


def _backward(ctx, d_out, d_extra_out):
    tensors = list(ctx.saved_tensors)  # x, extra, ln_weight, ln_bias, weight, bias (None kept)
    present = [i for i, t in enumerate(tensors) if t is not None]

    def recompute(*values):
        args = list(tensors)
        for i, v in zip(present, values):
            args[i] = v
        out, extra_out = reference(*args, ctx.eps, ctx.extra_first_col)
        return (out, extra_out) if tensors[1] is not None else out

    _, vjp = torch.func.vjp(recompute, *(tensors[i] for i in present))
    grads = vjp((d_out, d_extra_out) if tensors[1] is not None else d_out)
    result = [None] * len(tensors)
    for i, g in zip(present, grads):
        result[i] = g
    return (*result, None, None)


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
