"""FeedForward + residual over tokens (any leading shape, channels last).

Fused path: ``maxvit_fast.kernels.feedforward`` (LayerNorm -> Linear -> GELU -> Dropout ->
Linear -> Dropout -> + x in one kernel, or two for wide layers), with dropout drawn inside the
kernels from a philox seed that is itself drawn from torch's generator for the device, so
``torch.manual_seed`` makes a training step reproducible.

Backward. Widths with a one-pass forward kernel (``kernels.feedforward.backward_config``:
fp16/bf16 C <= 256, fp32 C <= 64; every MaxViT-T feed-forward but stage 4's in fp16/bf16): the
training forward also writes the per-token LayerNorm statistics (mean, rstd: fp32, 8 bytes per
token) and saves only x, the parameters, those statistics and the dropout seed, no 4C-wide
activation. The backward is one Triton kernel (``ff_fused_mlp_backward_kernel``: recomputes the
hidden activation chunk by chunk, regenerates both dropout masks in registers, writes dx with the
LayerNorm backward and the residual, the dot operands of the weight gradients and per-tile bias /
LayerNorm-parameter sums) followed by two matmuls (dW1 = dh^T xn, dW2 = dy^T act) and one sum
over the row tiles. Other widths (fp16/bf16 C > 256, fp32 C > 64: the two-kernel forward) keep
the recompute backward: regenerate both dropout keep masks with a Triton kernel (the same philox
counters as the forward), recompute the feed-forward with the reference torch ops under those
masks and differentiate that with ``torch.func.vjp``; the gradients are then exactly the
reference module's for the masks the forward used.

torch.compile: the forward kernels, the backward kernel and the mask kernel are
``torch.library`` custom ops (``maxvit_fast::feedforward_residual``,
``maxvit_fast::feedforward_residual_backward``, ``maxvit_fast::feedforward_dropout_keep_mask``)
with fake implementations; the rest of the backward is plain torch ops (traced into the backward
graph). Double backward is not supported on the backward-kernel path. The
dropout seed is a 1-element int64 tensor drawn with ``torch.randint`` on the inputs' device and
read by the kernels there (never on the host: no ``.item()``, no synchronisation, and a captured
CUDA graph draws a fresh seed on every replay).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import use_kernels
from .library import custom_op, draw_seed, seed_tensor


def _unsupported_reason(x: torch.Tensor, ff: nn.Sequential) -> str | None:
    """Why the fused kernels cannot compute ``ff`` on ``x`` (None when they can)."""
    kinds = (nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    if len(ff) != len(kinds) or not all(type(m) is k for m, k in zip(ff, kinds)):
        return "feed-forward is not LayerNorm, Linear, GELU, Dropout, Linear, Dropout"
    norm, lin1, gelu, _, lin2, _ = ff
    if gelu.approximate != "none":
        return f"GELU(approximate={gelu.approximate!r}) is not fused (only the exact erf form)"
    if norm.weight is None or norm.bias is None:
        return "LayerNorm without elementwise affine parameters"
    if lin1.bias is None or lin2.bias is None:
        return "Linear without bias"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (fused feed-forward supports float16, bfloat16, float32)"
    params = (norm.weight, norm.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    if any(p.dtype != x.dtype for p in params):
        return "parameters and input have different dtypes"
    if any(p.device != x.device for p in params):
        return "parameters and input are on different devices"
    if x.numel() // max(x.shape[-1], 1) >= 2**31:
        return "more than 2**31 - 1 tokens in one call"
    return None


def _dropout_p(module: nn.Dropout) -> float:
    return float(module.p) if module.training else 0.0


# torch.library ops: the Triton-calling core as one opaque op with a shape-only fake
# implementation, so torch.compile traces the fused model without graph breaks. The seed is a
# 1-element int64 tensor on the inputs' device (drawn in the graph by torch.randint), None
# without dropout.

@custom_op("feedforward_residual")
def feedforward_residual_op(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, eps: float, p_hidden: float, p_out: float, seed: Optional[torch.Tensor],
    save_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ff(x) + x, LayerNorm statistics): with ``save_stats`` (only at widths with a backward
    kernel, :func:`has_backward_kernel`) the statistics as fp32 (2, tokens): mean, rstd, for
    the backward kernel; else an empty tensor, and the backward recomputes."""
    from ..kernels import feedforward as kernels

    stats = _new_stats(x, save_stats)
    out = kernels.feedforward_residual(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, p_hidden, p_out, seed,
                                       stats=stats if save_stats else None)
    return out, stats


@feedforward_residual_op.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, seed, save_stats=False):
    return torch.empty_like(x), _new_stats(x, save_stats)  # what the launcher allocates


def _new_stats(x: torch.Tensor, save_stats: bool) -> torch.Tensor:
    shape = (2, x.numel() // x.shape[-1]) if save_stats else (0,)
    return x.new_empty(shape, dtype=torch.float32)


def has_backward_kernel(x: torch.Tensor) -> bool:
    """Whether the Triton backward kernel covers tokens like ``x`` (the one-pass widths)."""
    from ..kernels import feedforward as kernels

    return x.numel() > 0 and kernels.backward_config(int(x.shape[-1]), x.dtype) is not None


@custom_op("feedforward_residual_backward")
def feedforward_residual_backward_op(
    x: torch.Tensor, grad: torch.Tensor, stats: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, p_hidden: float, p_out: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel and the sum of its per-tile partial sums: (dx, xn, dy, act, dh,
    sums), the first five as ``kernels.feedforward.feedforward_residual_backward`` returns them
    (dy an empty tensor without output dropout: dy is then grad), sums = fp32 [db1 | db2 |
    d ln_weight | d ln_bias]."""
    from ..kernels import feedforward as kernels

    dx, xn, dy, act, dh, partials = kernels.feedforward_residual_backward(
        x, grad, stats, ln_weight, ln_bias, w1, b1, w2, p_hidden, p_out, seed)
    return dx, xn, x.new_empty((0,)) if dy is None else dy, act, dh, partials.sum(0)


@feedforward_residual_backward_op.register_fake
def _(x, grad, stats, ln_weight, ln_bias, w1, b1, w2, p_hidden, p_out, seed):
    C, hidden = x.shape[-1], w1.shape[0]
    M = x.numel() // C
    return (torch.empty_like(x), x.new_empty((M, C)), x.new_empty((M, C) if p_out > 0 else (0,)),
            x.new_empty((M, hidden)), x.new_empty((M, hidden)), x.new_empty((hidden + 3 * C,), dtype=torch.float32))


@custom_op("feedforward_dropout_keep_mask")
def dropout_keep_mask_op(x: torch.Tensor, width: int, p: float, seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The (..., width) bool keep mask of dropout ``stream`` the forward kernels used for tokens x."""
    from ..kernels import feedforward as kernels

    C = x.shape[-1]
    mask = kernels.dropout_keep_mask(x.numel() // C, width, p, seed, stream, x.device)
    return mask.view(*x.shape[:-1], width)


@dropout_keep_mask_op.register_fake
def _(x, width, p, seed, stream):
    return x.new_empty((*x.shape[:-1], width), dtype=torch.bool)


def _ff_setup_context(ctx, inputs, output):
    *tensors, eps, p_hidden, p_out, seed, save_stats = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero gradient for the statistics
    ctx.kernel_backward = save_stats
    ctx.save_for_backward(*tensors, stats)
    ctx.eps, ctx.p_hidden, ctx.p_out, ctx.seed = eps, p_hidden, p_out, seed


def _ff_backward(ctx, grad_out, _grad_stats):
    if grad_out is None:  # out unused: nothing for x, the 6 parameters and the 5 other inputs
        return (None,) * 12
    x, *weights, stats = ctx.saved_tensors
    if ctx.kernel_backward:
        grads = _kernel_backward(ctx, grad_out, x, weights, stats)
    else:
        grads = _recompute_backward(ctx, grad_out, x, weights)
    return (*grads, None, None, None, None, None)


def _kernel_backward(ctx, grad_out, x, weights, stats):
    """The Triton backward kernel (and the sum of its per-tile partial sums: the bias and
    LayerNorm-parameter gradients), then the weight gradients as two matmuls."""
    ln_weight, ln_bias, w1, b1, w2, _ = weights
    C, hidden = x.shape[-1], w1.shape[0]
    dx, xn, dy, act, dh, sums = feedforward_residual_backward_op(
        x, grad_out, stats, ln_weight, ln_bias, w1, b1, w2, ctx.p_hidden, ctx.p_out, ctx.seed)
    if ctx.p_out == 0:
        dy = grad_out.reshape(-1, C)
    db1, db2, d_ln_weight, d_ln_bias = sums.to(x.dtype).split([hidden, C, C, C])
    need = ctx.needs_input_grad
    dw1 = dh.t().mm(xn) if need[3] else None
    dw2 = dy.t().mm(act) if need[5] else None
    return dx, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2


def _recompute_backward(ctx, grad_out, x, weights):
    # Recompute with the reference torch ops under the forward's masks (regenerated from the
    # seed) and differentiate them. torch.func.vjp rather than torch.autograd.grad: under
    # torch.compile AOTAutograd traces this function into the backward graph.
    masks = _keep_masks(x, weights[2].shape[0], ctx.p_hidden, ctx.p_out, ctx.seed)
    _, vjp = torch.func.vjp(
        lambda *t: _reference_under_masks(*t, ctx.eps, ctx.p_hidden, ctx.p_out, *masks), x, *weights
    )
    return vjp(grad_out)


feedforward_residual_op.register_autograd(_ff_backward, setup_context=_ff_setup_context)


def keep_masks(x: torch.Tensor, hidden: int, p_hidden: float, p_out: float, seed: int):
    """The fused forward's dropout keep masks for tokens ``x`` (..., C): (hidden mask
    (..., hidden) or None, output mask (..., C) or None)."""
    return _keep_masks(x, hidden, p_hidden, p_out, seed_tensor(seed, x.device))


def _keep_masks(x: torch.Tensor, hidden: int, p_hidden: float, p_out: float, seed: torch.Tensor | None):
    from ..kernels import feedforward as kernels

    m_hidden = m_out = None
    if p_hidden > 0:
        m_hidden = dropout_keep_mask_op(x, hidden, p_hidden, seed, kernels.STREAM_HIDDEN)
    if p_out > 0:
        m_out = dropout_keep_mask_op(x, x.shape[-1], p_out, seed, kernels.STREAM_OUT)
    return m_hidden, m_out


def _apply_dropout(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    if keep is None:
        return t
    if p >= 1.0:
        return t * 0
    return t * keep * (1.0 / (1.0 - p))


def reference_with_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, seed):
    """The feed-forward + residual in reference torch ops, with the fused kernels' dropout
    masks for ``seed`` (what the backward differentiates, and what tests compare to)."""
    return _reference_under_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out,
                                  *keep_masks(x, w1.shape[0], p_hidden, p_out, seed))


def _reference_under_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, m_hidden, m_out):
    h = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), w1, b1))
    y = F.linear(_apply_dropout(h, m_hidden, p_hidden), w2, b2)
    return _apply_dropout(y, m_out, p_out) + x


def feedforward_residual(
    x: torch.Tensor, ff: nn.Sequential, fused: bool = False, seed: int | None = None
) -> torch.Tensor:
    """``ff(x) + x`` for tokens ``x`` of shape (..., C), a new tensor of x's shape.

    The feed-forward is per token, so it runs on the whole feature map at once: the window
    partition of the reference does not change its result. ``seed`` (fused path, training
    only) fixes the dropout masks; by default it is drawn from torch's default generator.
    """
    if not use_kernels(x, fused, unsupported=_unsupported_reason(x, ff)):
        return ff(x) + x
    norm, lin1, _, drop_hidden, lin2, drop_out = ff
    if x.shape[-1] != norm.weight.shape[0]:
        raise ValueError(f"tokens have {x.shape[-1]} channels, the feed-forward expects {norm.weight.shape[0]}")
    p_hidden, p_out = _dropout_p(drop_hidden), _dropout_p(drop_out)
    seed_t = None
    if p_hidden > 0 or p_out > 0:
        # drawn from torch's default generator as a tensor (no .item(): no graph break under compile)
        seed_t = draw_seed(x.device) if seed is None else seed_tensor(seed, x.device)
    params = (norm.weight, norm.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    # the LayerNorm statistics for the backward kernel, only when a backward will run
    save_stats = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)) and has_backward_kernel(x)
    out, _ = feedforward_residual_op(x, *params, float(norm.eps), p_hidden, p_out, seed_t, save_stats)
    return out
