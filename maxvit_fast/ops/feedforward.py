"""FeedForward + residual over tokens (any leading shape, channels last).

Fused path: ``maxvit_fast.kernels.feedforward`` (LayerNorm -> Linear -> GELU -> Dropout ->
Linear -> Dropout -> + x in one kernel, or two for wide layers), with dropout drawn inside the
kernels from a philox seed that is itself drawn from torch's generator for the device, so
``torch.manual_seed`` makes a training step reproducible.

Backward (documented split): the forward saves only its inputs and the seed. The backward
regenerates both dropout keep masks with a Triton kernel (the same philox counters as the
forward), recomputes the feed-forward with the reference torch ops under those masks and
differentiates that with ``torch.func.vjp``. The gradients are therefore exactly the reference module's
for the mask the forward used, and the 4C-wide hidden activation is never kept between forward
and backward (it is recomputed, as activation checkpointing would).

torch.compile: the forward kernels and the mask kernel are ``torch.library`` custom ops
(``maxvit_fast::feedforward_residual``, ``maxvit_fast::feedforward_dropout_keep_mask``) with
fake implementations; the backward is plain torch ops (traced into the backward graph). The
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
# 1-element int64 CPU tensor (drawn in the graph by torch.randint), None without dropout.

@custom_op("feedforward_residual")
def feedforward_residual_op(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, eps: float, p_hidden: float, p_out: float, seed: Optional[torch.Tensor],
) -> torch.Tensor:
    from ..kernels import feedforward as kernels

    return kernels.feedforward_residual(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, p_hidden, p_out, seed)


@feedforward_residual_op.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, seed):
    return torch.empty_like(x)  # what the launcher allocates


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
    *tensors, eps, p_hidden, p_out, seed = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps, ctx.p_hidden, ctx.p_out, ctx.seed = eps, p_hidden, p_out, seed


def _ff_backward(ctx, grad_out):
    # Recompute with the reference torch ops under the forward's masks (regenerated from the
    # seed) and differentiate them. torch.func.vjp rather than torch.autograd.grad: under
    # torch.compile AOTAutograd traces this function into the backward graph.
    x, *weights = ctx.saved_tensors
    masks = _keep_masks(x, weights[2].shape[0], ctx.p_hidden, ctx.p_out, ctx.seed)
    _, vjp = torch.func.vjp(
        lambda *t: _reference_under_masks(*t, ctx.eps, ctx.p_hidden, ctx.p_out, *masks), x, *weights
    )
    return (*vjp(grad_out), None, None, None, None)


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
    return feedforward_residual_op(x, norm.weight, norm.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias,
                                   float(norm.eps), p_hidden, p_out, seed_t)
