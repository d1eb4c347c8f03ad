"""``residual + Dropout(a @ W^T)`` in one launch: the window attention's output projection in
training with output dropout, as the ``maxvit_fast::linear_dropout_residual`` torch.library op
(fake implementation, autograd).

Forward: ``kernels/feedforward.py``'s ``ff_down_kernel`` through its shared launcher
``linear_dropout_residual`` (matmul, philox dropout and the residual add in the epilogue;
HAS_BIAS off: to_out has no bias). The dropout mask is a function of (seed, row, column, stream)
and never stored: the tokens use stream STREAM_OUT, the register rows STREAM_REGISTERS, and both
share the attention core's seed (its philox counters never take those streams; see the
feedforward kernel's header for the counter formula).

Backward (``maxvit_fast::dropout_grad`` + two matmuls):

    g = grad * keep * 1/(1-p)     (ff_dropout_grad_kernel: the mask regenerated, one launch)
    d a = g @ W,  dW = g^T a,  d residual = grad

the ops autograd runs for ``F.dropout(F.linear(a, W)) + residual`` with the same mask (torch's
dropout backward is the same elementwise product), so the gradients are those of the reference
with that mask.

Before (torch ops): mm, bernoulli_, div_, mul, add = 5 launches and a (rows, C) mask tensor per
row set in the forward, mul + 2 mm in the backward. Now 1 launch in the forward, 3 in the
backward. Eval (and training without output dropout) keeps cuBLAS: one ``addmm`` with the
residual as its input (``baddbmm`` for shared register rows, no autograd), also one launch, and a
tuned GEMM; the Triton kernel would only match it. Counted traffic: the window-attention header.

Tiles (ff_down_kernel with C = N = K; resource report, no GPU): see
``tests/test_output_projection.py::test_maxvit_t_configurations_compile_without_spills`` and the
numbers in ``kernels/feedforward.py`` (PROJECTION_TILES_N64). GPU speed: not measured.
"""

from __future__ import annotations

import torch

from .library import custom_op


@custom_op("linear_dropout_residual")
def linear_dropout_residual_op(a: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, p: float,
                               seed: torch.Tensor, stream: int) -> torch.Tensor:
    """``residual + Dropout_p(a @ weight^T)`` (dropout stream ``stream`` of ``seed``), a new
    contiguous tensor of residual's shape."""
    from ..kernels import feedforward as K

    return K.linear_dropout_residual(a, weight, residual, p, seed, stream)


@linear_dropout_residual_op.register_fake
def _(a, weight, residual, p, seed, stream):
    return residual.new_empty(residual.shape)


@custom_op("dropout_grad")
def dropout_grad_op(grad: torch.Tensor, p: float, seed: torch.Tensor, stream: int) -> torch.Tensor:
    """``grad * keep * 1/(1-p)`` as a contiguous (rows, N) tensor, keep the mask
    ``linear_dropout_residual`` drew with this seed and stream."""
    from ..kernels import feedforward as K

    return K.dropout_grad(grad, p, seed, stream)


@dropout_grad_op.register_fake
def _(grad, p, seed, stream):
    n = grad.shape[-1]
    return grad.new_empty((grad.numel() // n if n else 0, n))


def _setup_context(ctx, inputs, output):
    a, weight, _residual, p, seed, stream = inputs
    ctx.save_for_backward(a, weight, seed)
    ctx.p, ctx.stream = p, stream


def _backward(ctx, grad):
    a, weight, seed = ctx.saved_tensors
    need_a, need_w, need_res = ctx.needs_input_grad[:3]
    d_a = d_w = None
    if need_a or need_w:
        g = dropout_grad_op(grad, ctx.p, seed, ctx.stream)  # (rows, N)
        if need_a:
            d_a = g.mm(weight).view(a.shape)
        if need_w:
            d_w = g.t().mm(a.reshape(-1, a.shape[-1]))
    return d_a, d_w, (grad if need_res else None), None, None, None


linear_dropout_residual_op.register_autograd(_backward, setup_context=_setup_context)


def linear_dropout_residual(a, weight, residual, p: float, seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The op: ``residual + Dropout_p(a @ weight^T)`` in one Triton launch (p > 0)."""
    return linear_dropout_residual_op(a, weight, residual, float(p), seed, int(stream))
