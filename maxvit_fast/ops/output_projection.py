"""``residual + Dropout(a @ W^T)`` in one launch: the window attention's output projection in
training with output dropout, as the ``maxvit_fast::linear_dropout_residual`` torch.library op
(fake implementation, autograd).

Forward: ``kernels/feedforward.py``'s ``ff_down_kernel`` through its shared launcher
``linear_dropout_residual`` (matmul, philox dropout and the residual add in the epilogue;
HAS_BIAS off: to_out has no bias), for the tokens and, in the same launch, an optional second
row set (``a_extra`` with ``residual_extra``: the block step's register rows of every window,
their residual the shared (1, r, C) rows expanded over the windows with stride 0, never copied).
The dropout mask is a function of (seed, row, column, stream) and never stored: one stream
(STREAM_OUT) for both sets, the second set's rows numbered after the first's (row M + i, M the
first set's rows), so the register rows' masks are those of one call on the concatenation and
never repeat the tokens'. The attention core shares the seed; its philox counters never take
stream 1 (see the feedforward kernel's header for the counter formula).

Backward (``maxvit_fast::dropout_grad`` + three matmuls, for both row sets together):

    g = grad * keep * 1/(1-p)   (ff_dropout_grad_kernel: both sets' masks regenerated, one
                                 launch, into one (M + M_extra, N) buffer)
    [d a; d a_extra] = g @ W    (one mm; the two gradients are row slices of its result)
    dW = g[:M]^T a  (mm), dW += g[M:]^T a_extra  (addmm_, in place: one GEMM with beta = 1)
    d residual = grad, d residual_extra = grad_extra

the ops autograd runs for ``F.dropout(F.linear(a, W)) + residual`` per set with the same masks
(torch's dropout backward is the same elementwise product), so the gradients are those of the
reference with those masks. (The shared rows' gradient is autograd's sum over the expanded
windows, as in the reference.)

Launches for the block step's two row sets: before (torch ops) mm, bernoulli_, div_, mul, add =
5 per set and a (rows, C) mask tensor per set in the forward, mul + 2 mm per set and the add of
the two weight gradients in the backward; one op per set: 2 forward, 2 x 3 + 1 = 7 backward; now
1 forward, 4 backward (dropout_grad, mm, mm, addmm_). Eval (and training without output
dropout) keeps cuBLAS: one ``addmm`` with the residual as its input (``baddbmm`` for shared
register rows, no autograd), also one launch, and a tuned GEMM; the Triton kernel would only
match it. Counted traffic: the window-attention header.

Tiles (ff_down_kernel with C = N = K; resource report, no GPU): see
``tests/test_output_projection.py::test_maxvit_t_configurations_compile_without_spills`` and the
numbers in ``kernels/feedforward.py`` (PROJECTION_TILES_N64). GPU speed: not measured.
"""

from __future__ import annotations

from typing import Optional

import torch

from .library import custom_op


@custom_op("linear_dropout_residual")
def linear_dropout_residual_op(a: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, p: float,
                               seed: torch.Tensor, stream: int, a_extra: Optional[torch.Tensor] = None,
                               residual_extra: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + Dropout_p(a @ weight^T), residual_extra + Dropout_p(a_extra @ weight^T))``
    (dropout stream ``stream`` of ``seed``, a_extra's rows numbered after a's), new contiguous
    tensors of the residuals' shapes; without a second row set an empty tensor in its place."""
    from ..kernels import feedforward as K

    if a_extra is None or residual_extra is None:
        if (a_extra is None) != (residual_extra is None):
            raise ValueError("a_extra and residual_extra come together")
        return K.linear_dropout_residual(a, weight, residual, p, seed, stream), a.new_empty((0,))
    return K.linear_dropout_residual(a, weight, residual, p, seed, stream, a_extra=a_extra,
                                     residual_extra=residual_extra)


@linear_dropout_residual_op.register_fake
def _(a, weight, residual, p, seed, stream, a_extra=None, residual_extra=None):
    extra_out = a.new_empty((0,)) if residual_extra is None else residual_extra.new_empty(residual_extra.shape)
    return residual.new_empty(residual.shape), extra_out


@custom_op("dropout_grad")
def dropout_grad_op(grad: torch.Tensor, p: float, seed: torch.Tensor, stream: int,
                    grad_extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad * keep * 1/(1-p)`` as a contiguous (rows, N) tensor, keep the mask
    ``linear_dropout_residual`` drew with this seed and stream; with ``grad_extra`` (the second
    row set's gradient) its rows follow grad's in the result."""
    from ..kernels import feedforward as K

    return K.dropout_grad(grad, p, seed, stream, grad_extra=grad_extra)


@dropout_grad_op.register_fake
def _(grad, p, seed, stream, grad_extra=None):
    n = grad.shape[-1]
    rows = grad.numel() // n if n else 0
    if grad_extra is not None:
        rows = rows + (grad_extra.numel() // n if n else 0)
    return grad.new_empty((rows, n))


def _setup_context(ctx, inputs, output):
    a, weight, _residual, p, seed, stream, a_extra, _residual_extra = (list(inputs) + [None, None])[:8]
    ctx.save_for_backward(a, weight, seed, a_extra)
    ctx.p, ctx.stream = p, stream
    # no zero-filled gradient for the empty placeholder output (tokens only: the grid step) or
    # an unused output: None reaches the backward, which fills only what its kernel reads
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, grad_extra):
    a, weight, seed, a_extra = ctx.saved_tensors
    if grad is None:
        grad = a.new_zeros((*a.shape[:-1], weight.shape[0]))
    if a_extra is not None and grad_extra is None:
        grad_extra = a_extra.new_zeros((*a_extra.shape[:-1], weight.shape[0]))
    need_a, need_w, need_res = ctx.needs_input_grad[:3]
    need_a_extra, need_res_extra = (ctx.needs_input_grad[6:8] if a_extra is not None else (False, False))
    d_a = d_w = d_a_extra = None
    if need_a or need_w or need_a_extra:
        k = a.shape[-1]
        # both sets' dropout gradients in one launch: rows [0, M) a's, [M, M + M_extra) a_extra's
        g = dropout_grad_op(grad, ctx.p, seed, ctx.stream, grad_extra if a_extra is not None else None)
        m = a.numel() // k if k else 0
        if need_a or need_a_extra:
            d_rows = g.mm(weight)  # (M + M_extra, K): one GEMM for both sets
            d_a = d_rows[:m].view(a.shape) if need_a else None
            d_a_extra = d_rows[m:].view(a_extra.shape) if need_a_extra else None
        if need_w:
            d_w = g[:m].t().mm(a.reshape(-1, k))
            if a_extra is not None:
                d_w.addmm_(g[m:].t(), a_extra.reshape(-1, k))  # accumulated in place: no third launch
    return (d_a, d_w, (grad if need_res else None), None, None, None, d_a_extra,
            (grad_extra if need_res_extra else None))


linear_dropout_residual_op.register_autograd(_backward, setup_context=_setup_context)


def linear_dropout_residual(a, weight, residual, p: float, seed: torch.Tensor, stream: int,
                            a_extra: torch.Tensor | None = None, residual_extra: torch.Tensor | None = None):
    """The op: ``residual + Dropout_p(a @ weight^T)`` in one Triton launch (p > 0). With a second
    row set (``a_extra``, ``residual_extra``) both in the same launch, returns ``(out,
    extra_out)``; else ``out``."""
    out, extra_out = linear_dropout_residual_op(a, weight, residual, float(p), seed, int(stream), a_extra,
                                                residual_extra)
    return out if a_extra is None else (out, extra_out)
