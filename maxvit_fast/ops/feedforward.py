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
over the row tiles. Other widths (fp16/bf16 C > 256, fp32 C > 64: the two-kernel forward) save
nothing 4C wide either; their backward (``_two_kernel_backward``) is one Triton launch for the
hidden layer of both row sets (``ff_up_backward_kernel``: recomputes the hidden activation,
writes it and dh) after the output-dropout gradient kernel, then cuBLAS matmuls and, per row
set, one launch of kernels/layernorm_backward.py (the LayerNorm recomputed; dx with the
residual's gradient added, xn for dW1, dgamma / dbeta partials summed once for both sets; aten's
LayerNorm backward above 4096 channels). It replaced recomputing the block with the
reference torch ops under regenerated masks and differentiating that with ``torch.func.vjp``.

Two row sets (``feedforward_residual(x, ff, fused, extra=regs)``, the block step's tokens and
register rows): one op call, ``feedforward_residual_op(x, extra, ...)`` -> (out, extra_out,
statistics of both sets by token), one launch of the forward kernels for both (two on the
two-kernel path); the dropout masks are those of one call on x's tokens followed by extra's (one
seed). Backward: the backward kernel once per row set (``token0`` = x's token count for extra),
writing the weight-gradient operands of both sets into one buffer (one matmul per weight
gradient; without output dropout dW2 is one mm + one addmm, dy being the two incoming
gradients); the two-kernel widths' backward runs the dropout gradient and the hidden-layer
kernel once for both sets, the LayerNorm backward per set. An unused output gets a zero incoming gradient. If
extra cannot share x's launch (another dtype or device), the two sets run as two calls.

torch.compile: the forward kernels, the backward kernel and the mask kernel are
``torch.library`` custom ops (``maxvit_fast::feedforward_residual``,
``maxvit_fast::feedforward_residual_backward``, ``maxvit_fast::feedforward_hidden_backward``,
``maxvit_fast::feedforward_dropout_keep_mask``)
with fake implementations; the rest of the backward is plain torch ops (traced into the backward
graph). Double backward is not supported (the backward kernels have no autograd formula). The
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
from .layernorm_linear import layernorm_backward_rows
from .library import custom_op, draw_seed, seed_tensor


def _unsupported_reason(x: torch.Tensor, ff: nn.Sequential, extra_rows: int = 0) -> str | None:
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
    if x.numel() // max(x.shape[-1], 1) + extra_rows >= 2**31:
        return "more than 2**31 - 1 tokens in one call"
    return None


def _dropout_p(module: nn.Dropout) -> float:
    return float(module.p) if module.training else 0.0


# torch.library ops: the Triton-calling core as one opaque op with a shape-only fake
# implementation, so torch.compile traces the fused model without graph breaks. The seed is a
# 1-element int64 tensor on the inputs' device (drawn in the graph by torch.randint), None
# without dropout. ``extra``: an optional second row set through the same launch(es) (its
# tokens numbered after x's); without it the op returns an empty tensor in its place.

@custom_op("feedforward_residual")
def feedforward_residual_op(
    x: torch.Tensor, extra: Optional[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float, p_hidden: float,
    p_out: float, seed: Optional[torch.Tensor], save_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ff(x) + x, ff(extra) + extra or an empty tensor, LayerNorm statistics): with
    ``save_stats`` (only at widths with a backward kernel, :func:`has_backward_kernel`) the
    statistics as fp32 (2, tokens of x and extra): mean, rstd, for the backward kernel; else an
    empty tensor, and the backward recomputes."""
    from ..kernels import feedforward as kernels

    stats = _new_stats(x, extra, save_stats)
    res = kernels.feedforward_residual(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, p_hidden, p_out, seed,
                                       stats=stats if save_stats else None, extra=extra)
    if extra is None:
        return res, x.new_empty((0,)), stats
    return res[0], res[1], stats


@feedforward_residual_op.register_fake
def _(x, extra, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, seed, save_stats=False):
    # what the launcher allocates
    extra_out = x.new_empty((0,)) if extra is None else torch.empty_like(extra)
    return torch.empty_like(x), extra_out, _new_stats(x, extra, save_stats)


def _rows(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() // t.shape[-1]


def _new_stats(x: torch.Tensor, extra: torch.Tensor | None, save_stats: bool) -> torch.Tensor:
    shape = (2, _rows(x) + _rows(extra)) if save_stats else (0,)
    return x.new_empty(shape, dtype=torch.float32)


def has_backward_kernel(x: torch.Tensor, extra: torch.Tensor | None = None) -> bool:
    """Whether the Triton backward kernel covers tokens like ``x`` (the one-pass widths)."""
    from ..kernels import feedforward as kernels

    return x.numel() + (0 if extra is None else extra.numel()) > 0 and \
        kernels.backward_config(int(x.shape[-1]), x.dtype) is not None


@custom_op("feedforward_residual_backward")
def feedforward_residual_backward_op(
    x: torch.Tensor, grad: torch.Tensor, extra: Optional[torch.Tensor], grad_extra: Optional[torch.Tensor],
    stats: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, p_hidden: float, p_out: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel, once per row set (x, then extra with token0 = x's token count), and
    the sum of its per-tile partial sums: (dx, d extra (empty without extra), xn, dy, act, dh,
    sums). xn, dy, act and dh hold both row sets, x's tokens first (one matmul per weight
    gradient), as ``kernels.feedforward.feedforward_residual_backward`` returns them (dy an empty
    tensor without output dropout: dy is then grad); sums = fp32 [db1 | db2 | d ln_weight |
    d ln_bias] over both sets."""
    from ..kernels import feedforward as kernels

    if (extra is None) != (grad_extra is None):
        raise ValueError("extra and grad_extra go together (both or neither)")
    C, hidden = x.shape[-1], w1.shape[0]
    sets = [(x, grad)] + ([] if extra is None else [(extra, grad_extra)])
    M_total = sum(_rows(t) for t, _ in sets)
    block_m = kernels.backward_config(C, x.dtype)["BLOCK_M"]
    tiles = [-(-_rows(t) // block_m) for t, _ in sets]
    xn, act, dh = x.new_empty((M_total, C)), x.new_empty((M_total, hidden)), x.new_empty((M_total, hidden))
    dy = x.new_empty((M_total, C)) if p_out > 0 else None
    partials = x.new_empty((sum(tiles), hidden + 3 * C), dtype=torch.float32)
    d_inputs, row0, tile0 = [], 0, 0
    for (t, g), n_tiles in zip(sets, tiles):
        rows = slice(row0, row0 + _rows(t))
        out = (torch.empty_like(t), xn[rows], None if dy is None else dy[rows], act[rows], dh[rows],
               partials[tile0:tile0 + n_tiles])
        d_inputs.append(kernels.feedforward_residual_backward(
            t, g, stats, ln_weight, ln_bias, w1, b1, w2, p_hidden, p_out, seed, out=out, token0=row0)[0])
        row0, tile0 = rows.stop, tile0 + n_tiles
    d_extra = d_inputs[1] if extra is not None else x.new_empty((0,))
    return d_inputs[0], d_extra, xn, x.new_empty((0,)) if dy is None else dy, act, dh, partials.sum(0)


@feedforward_residual_backward_op.register_fake
def _(x, grad, extra, grad_extra, stats, ln_weight, ln_bias, w1, b1, w2, p_hidden, p_out, seed):
    C, hidden = x.shape[-1], w1.shape[0]
    M = _rows(x) + _rows(extra)
    return (torch.empty_like(x), x.new_empty((0,)) if extra is None else torch.empty_like(extra),
            x.new_empty((M, C)), x.new_empty((M, C) if p_out > 0 else (0,)),
            x.new_empty((M, hidden)), x.new_empty((M, hidden)), x.new_empty((hidden + 3 * C,), dtype=torch.float32))


@custom_op("feedforward_hidden_backward")
def feedforward_hidden_backward_op(
    x: torch.Tensor, dy: torch.Tensor, extra: Optional[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, eps: float, p_hidden: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, act), each (tokens of x and extra, 4C) by token: the gradient at the first Linear's
    output and the recomputed hidden activation (ff_up_backward_kernel, one launch for both row
    sets), from dy, the gradient at the second Linear's output ((tokens, C), contiguous)."""
    from ..kernels import feedforward as kernels

    return kernels.feedforward_hidden_backward(x, dy, ln_weight, ln_bias, eps, w1, b1, w2, p_hidden, seed, extra=extra)


@feedforward_hidden_backward_op.register_fake
def _(x, dy, extra, ln_weight, ln_bias, w1, b1, w2, eps, p_hidden, seed):
    shape = (_rows(x) + _rows(extra), w1.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@custom_op("feedforward_dropout_keep_mask")
def dropout_keep_mask_op(x: torch.Tensor, width: int, p: float, seed: torch.Tensor, stream: int,
                         extra_rows: int = 0) -> torch.Tensor:
    """The (tokens, width) bool keep mask of dropout ``stream`` the forward kernels used for
    tokens x and, after them, ``extra_rows`` tokens of a second row set (tokens counted
    row-major over x's leading dims, then the second set's)."""
    from ..kernels import feedforward as kernels

    return kernels.dropout_keep_mask(_rows(x) + extra_rows, width, p, seed, stream, x.device)


@dropout_keep_mask_op.register_fake
def _(x, width, p, seed, stream, extra_rows=0):
    return x.new_empty((_rows(x) + extra_rows, width), dtype=torch.bool)


def _ff_setup_context(ctx, inputs, output):
    x, extra, *weights, eps, p_hidden, p_out, seed, save_stats = inputs
    extra_out, stats = output[1], output[2]
    ctx.mark_non_differentiable(stats)
    if extra is None:
        ctx.mark_non_differentiable(extra_out)  # the empty placeholder
    ctx.set_materialize_grads(False)  # no zero gradient for the statistics
    ctx.kernel_backward = save_stats
    ctx.has_extra = extra is not None
    ctx.save_for_backward(x, extra, *weights, stats)
    ctx.eps, ctx.p_hidden, ctx.p_out, ctx.seed = eps, p_hidden, p_out, seed


def _ff_backward(ctx, grad_out, grad_extra_out, _grad_stats):
    x, extra, *weights, stats = ctx.saved_tensors
    if not ctx.has_extra:
        extra, grad_extra_out = None, None
    if grad_out is None and grad_extra_out is None:  # no output used: nothing for the 13 inputs
        return (None,) * 13
    # an unused output of a row set contributes nothing: a zero gradient for it
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if extra is not None and grad_extra_out is None:
        grad_extra_out = torch.zeros_like(extra)
    if ctx.kernel_backward:
        grads = _kernel_backward(ctx, grad_out, grad_extra_out, x, extra, weights, stats)
    else:
        grads = _two_kernel_backward(ctx, grad_out, grad_extra_out, x, extra, weights)
    return (*grads, None, None, None, None, None)


def _kernel_backward(ctx, grad_out, grad_extra_out, x, extra, weights, stats):
    """The Triton backward kernel per row set (and the sum of its per-tile partial sums: the
    bias and LayerNorm-parameter gradients), then the weight gradients as two matmuls over
    both row sets' operands."""
    ln_weight, ln_bias, w1, b1, w2, _ = weights
    C, hidden = x.shape[-1], w1.shape[0]
    dx, d_extra, xn, dy, act, dh, sums = feedforward_residual_backward_op(
        x, grad_out, extra, grad_extra_out, stats, ln_weight, ln_bias, w1, b1, w2, ctx.p_hidden, ctx.p_out, ctx.seed)
    db1, db2, d_ln_weight, d_ln_bias = sums.to(x.dtype).split([hidden, C, C, C])
    need = ctx.needs_input_grad
    dw1 = dh.t().mm(xn) if need[4] else None
    dw2 = None
    if need[6]:
        if ctx.p_out > 0:
            dw2 = dy.t().mm(act)
        else:  # dy is grad: one product per row set (no concatenated copy of the gradients)
            M = _rows(x)
            dw2 = grad_out.reshape(-1, C).t().mm(act[:M])
            if extra is not None:
                dw2 = dw2.addmm(grad_extra_out.reshape(-1, C).t(), act[M:])
    return dx, (d_extra if extra is not None else None), d_ln_weight, d_ln_bias, dw1, db1, dw2, db2


def _two_kernel_backward(ctx, grad_out, grad_extra_out, x, extra, weights):
    """The backward of the two-kernel widths: one Triton launch for the hidden layer of both row
    sets (ff_up_backward_kernel: the hidden activation recomputed, dh from dy), cuBLAS for the
    matmuls, the LayerNorm backward kernel per row set (ops/layernorm_linear.py
    layernorm_backward_rows: the LayerNorm recomputed in it):

        dy  = grad * keep_out * scale_out            (dropout_grad, both sets in one launch)
        dh, act = ff_up_backward(x, extra, dy)       (both sets, by token)
        dW2 = dy^T act    db2 = sum dy    db1 = sum dh    dxn = dh W1
        dW1 = dh^T xn     dx = LayerNorm_backward(dxn) + grad     (per set)

    Gradients of the masks the forward used (regenerated from the seed); the LayerNorm, GELU
    and matmul inputs rounded where the forward rounds them."""
    from .output_projection import dropout_grad_op
    from ..kernels.feedforward import STREAM_OUT

    ln_weight, ln_bias, w1, b1, w2, _ = weights
    C, eps = x.shape[-1], ctx.eps
    sets = [(x, grad_out)] + ([] if extra is None else [(extra, grad_extra_out)])
    need = ctx.needs_input_grad
    if ctx.p_out > 0:
        dy = dropout_grad_op(grad_out, ctx.p_out, ctx.seed, STREAM_OUT, grad_extra_out)
    elif extra is None:
        dy = grad_out.reshape(-1, C).contiguous()
    else:
        dy = torch.cat([grad_out.reshape(-1, C), grad_extra_out.reshape(-1, C)])
    dh, act = feedforward_hidden_backward_op(x, dy, extra, ln_weight, ln_bias, w1, b1, w2, eps, ctx.p_hidden,
                                             ctx.seed)
    dw2 = dy.t().mm(act) if need[6] else None
    db2 = dy.sum(0) if need[7] else None
    db1 = dh.sum(0) if need[5] else None
    dxn = dh.mm(w1)  # (tokens, C), both sets
    # per set the LayerNorm backward (recomputed in the kernel) + the residual's gradient
    bounds = [0, _rows(x)] + ([_rows(x) + _rows(extra)] if extra is not None else [])
    d_inputs, xns, d_ln_weight, d_ln_bias = layernorm_backward_rows(
        [(t, dxn[a:b], g.reshape(-1, C)) for (t, g), a, b in zip(sets, bounds, bounds[1:])], ln_weight, ln_bias, eps,
        need[4], need[2], need[3])
    dw1 = None
    if need[4]:
        dw1 = dh[:bounds[1]].t().mm(xns[0])
        if extra is not None:
            dw1.addmm_(dh[bounds[1]:].t(), xns[1])
    d_extra = d_inputs[1] if extra is not None and need[1] else None
    return (d_inputs[0] if need[0] else None), d_extra, d_ln_weight, d_ln_bias, dw1, db1, dw2, db2


feedforward_residual_op.register_autograd(_ff_backward, setup_context=_ff_setup_context)


def keep_masks(x: torch.Tensor, hidden: int, p_hidden: float, p_out: float, seed: int, extra: torch.Tensor | None = None):
    """The fused forward's dropout keep masks for tokens ``x`` (..., C): (hidden mask
    (..., hidden) or None, output mask (..., C) or None). With ``extra`` (the second row set of
    the same call): ((x's two masks), (extra's two masks))."""
    masks = _keep_masks(x, hidden, p_hidden, p_out, seed_tensor(seed, x.device), extra)
    return masks[0] if extra is None else masks


def _keep_masks(x: torch.Tensor, hidden: int, p_hidden: float, p_out: float, seed: torch.Tensor | None,
                extra: torch.Tensor | None = None):
    """((x's hidden mask, x's output mask), (extra's, or (None, None))), each None without that
    dropout: one mask launch per dropout for both row sets, split by token."""
    from ..kernels import feedforward as kernels

    sets = [x] + ([] if extra is None else [extra])
    masks = [[None, None] for _ in range(2)]
    for i, (p, width, stream) in enumerate(((p_hidden, hidden, kernels.STREAM_HIDDEN),
                                            (p_out, x.shape[-1], kernels.STREAM_OUT))):
        if p > 0:
            flat = dropout_keep_mask_op(x, width, p, seed, stream, _rows(extra))
            for j, (t, part) in enumerate(zip(sets, flat.split([_rows(t) for t in sets]))):
                masks[j][i] = part.view(*t.shape[:-1], width)
    return tuple(masks[0]), tuple(masks[1])


def _apply_dropout(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    if keep is None:
        return t
    if p >= 1.0:
        return t * 0
    return t * keep * (1.0 / (1.0 - p))


def reference_with_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, seed, extra=None):
    """The feed-forward + residual in reference torch ops, with the fused kernels' dropout
    masks for ``seed`` (what the backward differentiates, and what tests compare to). With
    ``extra``: (x's result, extra's result) of the two-set call."""
    masks = _keep_masks(x, w1.shape[0], p_hidden, p_out, seed_tensor(seed, x.device), extra)
    ref = _reference_under_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, *masks[0])
    if extra is None:
        return ref
    return ref, _reference_under_masks(extra, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, *masks[1])


def _reference_under_masks(x, ln_weight, ln_bias, w1, b1, w2, b2, eps, p_hidden, p_out, m_hidden, m_out):
    h = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), w1, b1))
    y = F.linear(_apply_dropout(h, m_hidden, p_hidden), w2, b2)
    return _apply_dropout(y, m_out, p_out) + x


def feedforward_residual(
    x: torch.Tensor, ff: nn.Sequential, fused: bool = False, seed: int | None = None,
    extra: torch.Tensor | None = None,
):
    """``ff(x) + x`` for tokens ``x`` of shape (..., C), a new tensor of x's shape.

    The feed-forward is per token, so it runs on the whole feature map at once: the window
    partition of the reference does not change its result. ``seed`` (fused path, training
    only) fixes the dropout masks; by default it is drawn from torch's default generator.

    ``extra`` (..., C): a second row set through the same feed-forward (the block step's
    register rows next to its tokens); returns ``(ff(x) + x, ff(extra) + extra)``. Fused, both
    sets go through one launch of the kernels (two on the two-kernel path), with one seed; the
    dropout masks are those of one call on the tokens of x followed by those of extra.
    """
    if extra is not None:
        if extra.dtype != x.dtype or extra.device != x.device or extra.shape[-1:] != x.shape[-1:]:
            # the two sets cannot share a launch: each on its own (each dispatched, each checked)
            return (feedforward_residual(x, ff, fused, seed),
                    feedforward_residual(extra, ff, fused, None if seed is None else seed + 1))
    if not use_kernels(x, fused, unsupported=_unsupported_reason(x, ff, 0 if extra is None else _rows(extra))):
        return ff(x) + x if extra is None else (ff(x) + x, ff(extra) + extra)
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
    inputs = (x,) if extra is None else (x, extra)
    save_stats = torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params)) and \
        has_backward_kernel(x, extra)
    out, extra_out, _ = feedforward_residual_op(x, extra, *params, float(norm.eps), p_hidden, p_out, seed_t, save_stats)
    return out if extra is None else (out, extra_out)
