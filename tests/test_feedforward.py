"""Fused feed-forward + LayerNorm + residual against the reference FeedForward.

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), so the shapes
are small but real: batch 1 and odd token counts, widths that are not powers of two, and both
kernel paths (one-pass with the hidden on chip, and the two-kernel path) at every width.

Tolerances: fp32 1e-5 normwise against the fp32 reference module (exact fp32 dots on both
sides, only summation order differs); fp16/bf16 at most 2x the reference module's own error in
that dtype against an fp64 reference, plus half an ulp of the largest output (outputs the
reference happens to round almost exactly).
"""

import inspect
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from maxvit_fast import ops
from maxvit_fast.aot import compile_kernels
from maxvit_fast.dispatch import FusedFallbackWarning, reset_fallback_warnings
from maxvit_fast.kernels import feedforward as K
from maxvit_fast.ops.feedforward import keep_masks, reference_with_masks
from maxvit_fast.traffic import triton_launches
from maxvit_fast.reference import FeedForward

from .helpers import assert_close_l2, assert_close_normwise, assert_within_reference_error, poison_

triton = pytest.importorskip("triton")

PATHS = ("fused", "two_pass")


def make_ff(C, dtype=torch.float32, device="cpu", dropout=0.0):
    """A FeedForward with non-trivial LayerNorm affine parameters and biases."""
    ff = FeedForward(C, dropout=dropout)
    with torch.no_grad():
        ff[0].weight.normal_(1.0, 0.3)
        ff[0].bias.normal_(0.0, 0.3)
        ff[1].bias.normal_(0.0, 0.3)
        ff[4].bias.normal_(0.0, 0.3)
    return ff.to(device=device, dtype=dtype)


def make_tokens(shape, C, dtype=torch.float32, device="cpu"):
    """Tokens with a per-token offset, so LayerNorm's mean subtraction matters."""
    x = torch.randn(*shape, C) + 2.0 * torch.randn(*shape, 1)
    return x.to(device=device, dtype=dtype)


def launch(x, ff, path=None, p_hidden=0.0, p_out=0.0, seed=0):
    """The launcher into a NaN-poisoned output."""
    out = poison_(torch.empty_like(x))
    res = K.feedforward_residual(x, ff[0].weight, ff[0].bias, ff[0].eps, ff[1].weight, ff[1].bias,
                                 ff[4].weight, ff[4].bias, p_hidden, p_out, seed, out=out, path=path)
    assert res is out
    return out


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("C,shape", [(16, (1, 7, 7)), (24, (3, 5, 9)), (48, (2, 3, 7))])
def test_fp32_matches_reference(device, C, shape, path):
    ff = make_ff(C, device=device).eval()
    x = make_tokens(shape, C, device=device)
    out = launch(x, ff, path)
    with torch.no_grad():
        ref = ff(x) + x
    assert_close_normwise(out, ref, 1e-5, name=f"C={C} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,shape", [(24, (3, 5, 9)), (64, (1, 7, 7))])
def test_low_precision_within_reference_error(device, dtype, C, shape, path):
    ff32 = make_ff(C, device=device).eval()
    ff = make_ff(C, dtype, device).eval()
    ff.load_state_dict({k: v.to(dtype) for k, v in ff32.state_dict().items()})
    x = make_tokens(shape, C, dtype, device)
    out = launch(x, ff, path)
    ff64 = make_ff(C, torch.float64, device).eval()
    ff64.load_state_dict({k: v.double() for k, v in ff.state_dict().items()})
    with torch.no_grad():
        truth = ff64(x.double()) + x.double()
        ref_lowp = ff(x) + x
    half_ulp = 0.5 * torch.finfo(dtype).eps * truth.abs().max().item()
    assert_within_reference_error(out, ref_lowp, truth, factor=2.0, atol=half_ulp, name=f"{dtype} C={C} {path}")


def test_default_path_choice():
    # decided from the resource report in kernels/feedforward.py's header
    for C in (16, 24, 48, 64, 96, 128, 256):
        assert K.fused_mlp_config(C, torch.float16) is not None
    assert K.fused_mlp_config(512, torch.bfloat16) is None
    for C in (16, 48, 64):
        assert K.fused_mlp_config(C, torch.float32) is not None
    for C in (96, 128, 256, 512):
        assert K.fused_mlp_config(C, torch.float32) is None
    # the backward kernel exists exactly where the forward is one pass
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for C in (16, 24, 48, 64, 96, 128, 256, 512):
            assert (K.backward_config(C, dtype) is None) == (K.fused_mlp_config(C, dtype) is None), (dtype, C)


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_view_of_nchw_map(device, path):
    """The model's call: the (B, H, W, C) permuted view of an NCHW feature map (channel stride
    H*W); the result keeps that layout."""
    C = 24
    ff = make_ff(C, device=device).eval()
    fmap = make_tokens((2, 5, 7), C, device=device).permute(0, 3, 1, 2).contiguous()  # NCHW
    x = fmap.permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    out = launch(x, ff, path)
    assert out.stride() == x.stride()
    with torch.no_grad():
        assert_close_normwise(out, ff(x) + x, 1e-5)


def test_register_rows_slice_and_uncoalescable_strides(device):
    """Register rows as the attention op leaves them, (B, nX, nY, r, C) sliced out of the
    window sequences, and a layout whose leading dims do not merge to two (copied)."""
    C, r = 16, 4
    ff = make_ff(C, device=device).eval()
    seq = make_tokens((2, 2, 3, r + 9), C, device=device)
    regs = seq[:, :, :, :r]
    out = launch(regs, ff)
    with torch.no_grad():
        assert_close_normwise(out, ff(regs) + regs, 1e-5)
    odd = make_tokens((3, 4, 5), 2 * C, device=device)[:, ::2, 1:, ::2]  # three leading dims that do not merge
    out = launch(odd, ff)
    with torch.no_grad():
        assert_close_normwise(out, ff(odd) + odd, 1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_output_layout_differs_from_input(device, path):
    """x channels-last view of an NCHW map, out a contiguous tensor (and the reverse)."""
    C = 16
    ff = make_ff(C, device=device).eval()
    x = make_tokens((2, C, 3, 5), 1, device=device)[..., 0].permute(0, 2, 3, 1)
    for src, dst in ((x, torch.empty(x.shape, device=device)), (x.contiguous(), torch.empty_like(x))):
        poison_(dst)
        K.feedforward_residual(src, ff[0].weight, ff[0].bias, ff[0].eps, ff[1].weight, ff[1].bias,
                               ff[4].weight, ff[4].bias, out=dst, path=path)
        with torch.no_grad():
            assert_close_normwise(dst, ff(src) + src, 1e-5)


def test_op_dispatch_and_layout(device):
    C = 16
    ff = make_ff(C, device=device).eval()
    x = make_tokens((1, 7, 7), C, device=device).permute(0, 2, 1, 3)
    with torch.no_grad():
        out = ops.feedforward_residual(x, ff, fused=True)
        assert_close_normwise(out, ff(x) + x, 1e-5)
        assert torch.equal(ops.feedforward_residual(x, ff, fused=False), ff(x) + x)
        empty = x[:0]
        assert ops.feedforward_residual(empty, ff, fused=True).shape == empty.shape


def test_unsupported_falls_back_with_warning(device):
    C = 16
    ff = make_ff(C, device=device).eval()
    ff[2].approximate = "tanh"
    x = make_tokens((1, 3, 3), C, device=device)
    reset_fallback_warnings()
    with pytest.warns(FusedFallbackWarning, match="GELU"), torch.no_grad():
        out = ops.feedforward_residual(x, ff, fused=True)
    with torch.no_grad():
        assert torch.equal(out, ff(x) + x)
    ff64 = make_ff(C, torch.float64, device).eval()
    with pytest.warns(FusedFallbackWarning, match="float64"), torch.no_grad():
        ops.feedforward_residual(x.double(), ff64, fused=True)


def test_bad_input_errors(device):
    ff = make_ff(16, device=device).eval()
    x = make_tokens((1, 3, 3), 24, device=device)
    with pytest.raises(ValueError, match="24 channels"), torch.no_grad():
        ops.feedforward_residual(x, ff, fused=True)
    x = make_tokens((1, 3, 3), 16, device=device)
    with pytest.raises(ValueError, match="out is"):
        K.feedforward_residual(x, ff[0].weight, ff[0].bias, 1e-5, ff[1].weight, ff[1].bias, ff[4].weight,
                               ff[4].bias, out=torch.empty(1, 3, 16))
    with pytest.raises(ValueError, match="w2 has shape"):
        K.feedforward_residual(x, ff[0].weight, ff[0].bias, 1e-5, ff[1].weight, ff[1].bias, ff[1].weight, ff[4].bias)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def _grads(out, x, ff, grad_out):
    params = [x] + list(ff.parameters())
    return torch.autograd.grad(out, params, grad_out)


@pytest.mark.parametrize("C,shape", [(24, (2, 3, 5)), (16, (1, 7, 7))])
def test_gradients_match_autograd(device, C, shape):
    ff = make_ff(C, device=device).train()  # dropout p = 0
    x = make_tokens(shape, C, device=device).requires_grad_()
    grad_out = torch.randn(*shape, C, device=device)
    fused = _grads(ops.feedforward_residual(x, ff, fused=True), x, ff, grad_out)
    ref = _grads(ff(x) + x, x, ff, grad_out)
    names = ["x"] + [n for n, _ in ff.named_parameters()]
    for name, g, r in zip(names, fused, ref):
        assert_close_l2(g, r, 1e-5, name=name)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_forward_and_gradients_use_one_mask(device, path):
    """With dropout on, the forward (either kernel path) equals the reference built from the
    regenerated masks, so the kernels used exactly those masks, and the op's gradients are that
    reference's."""
    C, shape, seed = 24, (3, 5, 9), int(torch.randint(0, 2**31 - 1, (1,)))
    ff = make_ff(C, device=device, dropout=0.3).train()
    ff[5].p = 0.2
    x = make_tokens(shape, C, device=device).requires_grad_()
    m_hidden, m_out = keep_masks(x, 4 * C, 0.3, 0.2, seed)
    h = ff[2](ff[1](ff[0](x))) * m_hidden / 0.7
    ref = ff[4](h) * m_out / 0.8 + x

    with torch.no_grad():
        out = launch(x.detach(), ff, path, p_hidden=0.3, p_out=0.2, seed=seed)
    assert_close_normwise(out, ref, 1e-5, name="forward")
    dropped = ~m_out
    assert dropped.any() and torch.equal(out[dropped], x.detach()[dropped])

    out = ops.feedforward_residual(x, ff, fused=True, seed=seed)
    assert_close_normwise(out, ref, 1e-5, name="op forward")
    grad_out = torch.randn_like(out)
    names = ["x"] + [n for n, _ in ff.named_parameters()]
    for name, g, r in zip(names, _grads(out, x, ff, grad_out), _grads(ref, x, ff, grad_out)):
        assert_close_l2(g, r, 1e-5, name=name)


# ----------------------------------------------------------------------------------------------
# backward kernel (one-pass widths) and the recompute backward (two-kernel widths)
# ----------------------------------------------------------------------------------------------

GRAD_NAMES = ("x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2")


def make_input(shape, C, layout, dtype=torch.float32, device="cpu"):
    """Tokens (*shape, C): contiguous, or the channels-last view of an NCHW map (the model's
    layout when the feature map is NCHW-contiguous)."""
    if layout == "nchw_view":
        B, H, W = shape
        return make_tokens((B, H, W), C, dtype, device).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    return make_tokens(shape, C, dtype, device)


def set_dropout(ff, p_hidden, p_out):
    ff[3].p, ff[5].p = p_hidden, p_out
    return ff.train()


def op_gradients(x, ff, grad_out, seed):
    """(x, ln_weight, ln_bias, w1, b1, w2, b2) gradients through the fused op, and the Triton
    launches of its backward."""
    x = x.detach().requires_grad_()
    out = ops.feedforward_residual(x, ff, fused=True, seed=seed)
    with triton_launches() as launched:
        grads = torch.autograd.grad(out, [x, *ff.parameters()], grad_out)
    return grads, dict(launched.counts)


def masked_reference_gradients(x, ff, grad_out, seed, dtype=None):
    """Autograd through the reference torch ops under the fused forward's dropout masks, with
    x, the parameters and grad_out in ``dtype`` (default: theirs)."""
    dtype = dtype or x.dtype
    x = x.detach().to(dtype).requires_grad_()
    params = [p.detach().to(dtype).requires_grad_() for p in ff.parameters()]
    out = reference_with_masks(x, *params, ff[0].eps, ff[3].p, ff[5].p, seed)
    return torch.autograd.grad(out, [x, *params], grad_out.to(dtype))


@pytest.mark.parametrize("C,shape,layout,p_hidden,p_out", [
    (16, (1, 7, 7), "nchw_view", 0.0, 0.0),
    (24, (3, 5, 9), "contiguous", 0.3, 0.2),
    (48, (2, 3, 7), "nchw_view", 0.1, 0.25),
    (64, (1, 5, 7), "contiguous", 0.0, 0.0),
    (64, (2, 3, 11), "nchw_view", 0.2, 0.1),
])
def test_backward_kernel_fp32(device, C, shape, layout, p_hidden, p_out):
    """Every gradient against autograd through the reference under the forward's masks: fp32
    1e-5 relative L2 (exact fp32 products on both sides; only summation order differs). One
    Triton launch (the backward kernel), no mask materialised."""
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input(shape, C, layout, device=device)
    grad_out = torch.randn_like(x)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    grads, launched = op_gradients(x, ff, grad_out, seed)
    assert launched == {"ff_fused_mlp_backward_kernel": 1}
    for name, g, r in zip(GRAD_NAMES, grads, masked_reference_gradients(x, ff, grad_out, seed)):
        assert_close_l2(g, r, 1e-5, name=name)


@pytest.mark.parametrize("dtype,C,shape,p_hidden,p_out", [
    (torch.float16, 24, (3, 5, 9), 0.3, 0.2),
    (torch.bfloat16, 64, (2, 5, 7), 0.1, 0.1),
    (torch.float16, 128, (1, 7, 7), 0.0, 0.0),
    (torch.bfloat16, 128, (2, 3, 5), 0.2, 0.0),
    (torch.float16, 256, (1, 5, 7), 0.1, 0.3),
    (torch.bfloat16, 256, (2, 3, 5), 0.0, 0.1),
    # two-kernel widths (ff_up_backward_kernel): MaxViT-T stage 4, and a partial column tile
    (torch.bfloat16, 512, (1, 3, 5), 0.1, 0.1),
    (torch.float16, 320, (2, 3, 3), 0.0, 0.2),
])
def test_backward_kernel_low_precision(device, dtype, C, shape, p_hidden, p_out):
    """fp16/bf16: each gradient's error against the fp64 reference (same masks) is at most 2x
    the reference module's own error in that dtype, plus half an ulp of the gradient's largest
    entry (for gradients the reference happens to round almost exactly). One-pass widths: the
    backward kernel alone; two-kernel widths: ff_up_backward_kernel, the LayerNorm backward
    kernel (+ the dropout gradient)."""
    ff = set_dropout(make_ff(C, dtype, device), p_hidden, p_out)
    x = make_input(shape, C, "nchw_view", dtype, device)
    grad_out = torch.randn_like(x)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    grads, launched = op_gradients(x, ff, grad_out, seed)
    if K.backward_config(C, dtype) is not None:
        assert launched == {"ff_fused_mlp_backward_kernel": 1}
    else:
        assert launched == {"ff_up_backward_kernel": 1, "layernorm_backward_kernel": 1,
                            **({"ff_dropout_grad_kernel": 1} if p_out > 0 else {})}
    truth = masked_reference_gradients(x, ff, grad_out, seed, torch.float64)
    ref_lowp = masked_reference_gradients(x, ff, grad_out, seed)
    for name, g, r, t in zip(GRAD_NAMES, grads, ref_lowp, truth):
        assert g.dtype == dtype, name
        half_ulp = 0.5 * torch.finfo(dtype).eps * t.abs().max().item()
        assert_within_reference_error(g, r, t, factor=2.0, atol=half_ulp, name=f"{dtype} C={C} d{name}")


def test_backward_of_a_sum(device):
    """out.sum().backward(): the incoming gradient is an expanded tensor (every stride 0)."""
    C, p_hidden, p_out = 24, 0.1, 0.2
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input((2, 3, 5), C, "nchw_view", device=device).requires_grad_()
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    ops.feedforward_residual(x, ff, fused=True, seed=seed).sum().backward()
    grads = [x.grad] + [p.grad for p in ff.parameters()]
    for name, g, r in zip(GRAD_NAMES, grads, masked_reference_gradients(x, ff, torch.ones_like(x), seed)):
        assert_close_l2(g, r, 1e-5, name=name)


def test_backward_launcher_writes_every_output(device):
    """The backward launcher into NaN-poisoned outputs (dx strided like x, padded channels and a
    ragged last row tile): every output is written, the dot operands it hands to the weight
    gradients are the forward's (xn = LayerNorm(x) and act = the dropped GELU output, exactly as
    the reference forms them), and the partial sums add up to the bias / LayerNorm gradients."""
    C, shape, p_hidden, p_out = 48, (2, 3, 7), 0.2, 0.3
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input(shape, C, "nchw_view", device=device)
    grad = torch.randn_like(x)
    M, hidden = x.numel() // C, 4 * C
    params = [ff[0].weight, ff[0].bias, ff[1].weight, ff[1].bias, ff[4].weight, ff[4].bias]
    stats = poison_(torch.empty(2, M, device=device))
    with torch.no_grad():
        fwd = K.feedforward_residual(x, *params[:2], ff[0].eps, *params[2:], p_hidden, p_out, seed, stats=stats)
    tiles = triton.cdiv(M, K.backward_config(C, x.dtype)["BLOCK_M"])
    out = [poison_(torch.empty_like(x)), poison_(torch.empty(M, C, device=device)), poison_(torch.empty(M, C, device=device)),
           poison_(torch.empty(M, hidden, device=device)), poison_(torch.empty(M, hidden, device=device)),
           poison_(torch.empty(tiles, hidden + 3 * C, device=device))]
    res = K.feedforward_residual_backward(x, grad, stats, *params[:5], p_hidden, p_out, seed, out=out)
    assert all(r is o for r, o in zip(res, out))
    dx, xn, dy, act, dh, partials = res

    m_hidden, m_out = keep_masks(x, hidden, p_hidden, p_out, seed)
    xr = x.detach().clone().requires_grad_()
    xn_ref = torch.nn.functional.layer_norm(xr, (C,), params[0], params[1], ff[0].eps)
    xn_ref.retain_grad()
    pre = torch.nn.functional.linear(xn_ref, params[2], params[3])
    pre.retain_grad()
    act_ref = torch.nn.functional.gelu(pre) * m_hidden / (1 - p_hidden)
    y = torch.nn.functional.linear(act_ref, params[4], params[5])
    y.retain_grad()
    ref = y * m_out / (1 - p_out) + xr
    assert_close_normwise(fwd, ref, 1e-5, name="forward")
    ref.backward(grad)
    assert_close_normwise(stats[0], x.mean(-1).reshape(-1), 1e-5, name="mean")
    assert_close_normwise(stats[1], torch.rsqrt(x.var(-1, unbiased=False) + ff[0].eps).reshape(-1), 1e-5, name="rstd")
    for name, got, want in (("dx", dx, xr.grad), ("xn", xn, xn_ref), ("dy", dy, y.grad), ("act", act, act_ref),
                            ("dh", dh, pre.grad)):
        assert_close_normwise(got, want.reshape(got.shape), 1e-5, name=name)
    assert dx.stride() == x.stride()
    sums = partials.sum(0)
    for name, got, want in zip(("b1", "b2", "ln_weight", "ln_bias"), sums.split([hidden, C, C, C]),
                               (params[3].grad, params[5].grad, params[0].grad, params[1].grad)):
        assert_close_normwise(got, want, 1e-5, name=name)


def test_backward_launcher_rejects_bad_arguments(device):
    C = 16
    ff = make_ff(C, device=device)
    x = make_tokens((1, 3, 5), C, device=device)
    params = [ff[0].weight, ff[0].bias, ff[1].weight, ff[1].bias, ff[4].weight]
    with pytest.raises(ValueError, match="stats must be"):
        K.feedforward_residual_backward(x, torch.randn_like(x), torch.empty(2, 14), *params)
    with pytest.raises(ValueError, match="grad is"):
        K.feedforward_residual_backward(x, torch.randn(1, 3, 4, C), torch.empty(2, 15), *params)
    wide = make_ff(96, device=device)
    xw = make_tokens((1, 3, 5), 96, device=device)
    with pytest.raises(ValueError, match="no backward kernel"):
        K.feedforward_residual_backward(xw, xw, torch.empty(2, 15), wide[0].weight, wide[0].bias, wide[1].weight,
                                        wide[1].bias, wide[4].weight)
    with pytest.raises(ValueError, match="only the one-pass kernel"):
        K.feedforward_residual(x, *params[:2], 1e-5, *params[2:], ff[4].bias, stats=torch.empty(2, 15), path="two_pass")


@pytest.mark.parametrize("C,shape,layout,p_hidden,p_out", [
    (80, (1, 3, 5), "nchw_view", 0.2, 0.1),
    (72, (2, 3, 7), "contiguous", 0.0, 0.0),
    (80, (3, 1, 5), "nchw_view", 0.3, 0.0),
])
def test_two_kernel_backward_fp32(device, C, shape, layout, p_hidden, p_out):
    """fp32 C = 72, 80 have a two-kernel forward and no one-pass backward kernel: the forward
    saves no statistics and the backward is ff_up_backward_kernel (the hidden layer recomputed,
    dh) plus the output-dropout gradient kernel (with output dropout) and torch ops; every
    gradient against autograd through the reference under the forward's masks, 1e-5 relative
    L2 (exact fp32 products on both sides)."""
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input(shape, C, layout, device=device)
    grad_out = torch.randn_like(x)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    assert K.backward_config(C, torch.float32) is None
    grads, launched = op_gradients(x, ff, grad_out, seed)
    expected = {"ff_up_backward_kernel": 1, "layernorm_backward_kernel": 1}
    if p_out > 0:
        expected["ff_dropout_grad_kernel"] = 1
    assert launched == expected
    for name, g, r in zip(GRAD_NAMES, grads, masked_reference_gradients(x, ff, grad_out, seed)):
        assert_close_l2(g, r, 1e-5, name=name)


def test_hidden_backward_launcher_writes_every_output(device):
    """ff_up_backward_kernel through its launcher, both row sets, NaN-poisoned outputs: act equals
    the forward's hidden activation (ff_up_kernel's, the same mask) and dh the reference's
    gradient at the first Linear's output, fp32 (1e-5 relative L2)."""
    C, p_hidden = 40, 0.25
    ff = set_dropout(make_ff(C, device=device), p_hidden, 0.0)
    x = make_input((2, 3, 5), C, "nchw_view", device=device)
    regs = register_rows((2, 1, 3, 2), C, device=device)
    M = x.numel() // C + regs.numel() // C
    dy = torch.randn(M, C, device=device)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    params = [p.detach() for p in ff.parameters()]
    out = tuple(poison_(torch.empty(M, 4 * C, device=device)) for _ in range(2))
    dh, act = K.feedforward_hidden_backward(x, dy, params[0], params[1], ff[0].eps, params[2], params[3], params[4],
                                            p_hidden, seed, extra=regs, out=out)
    assert dh is out[0] and act is out[1]
    tokens = torch.cat([x.reshape(-1, C), regs.reshape(-1, C)])
    pre = F.linear(F.layer_norm(tokens, (C,), params[0], params[1], ff[0].eps), params[2], params[3]).requires_grad_()
    keep = K.dropout_keep_mask(M, 4 * C, p_hidden, seed, K.STREAM_HIDDEN, device)
    ref_act = F.gelu(pre) * keep / (1 - p_hidden)
    ref_dh, = torch.autograd.grad(ref_act, pre, dy.mm(params[4]))
    assert_close_l2(act, ref_act.detach(), 1e-5, name="act")
    assert_close_l2(dh, ref_dh, 1e-5, name="dh")
    with pytest.raises(ValueError, match="dy must be"):
        K.feedforward_hidden_backward(x, dy[1:], params[0], params[1], ff[0].eps, params[2], params[3], params[4],
                                      p_hidden, seed, extra=regs)
    with pytest.raises(ValueError, match="out must be"):
        K.feedforward_hidden_backward(x, dy, params[0], params[1], ff[0].eps, params[2], params[3], params[4],
                                      p_hidden, seed, extra=regs, out=(out[0], out[1][1:]))


def test_statistics_saved_only_for_a_backward(device, monkeypatch):
    """The forward writes the LayerNorm statistics only when a backward will run."""
    seen = []
    launcher = K.feedforward_residual

    def recording(*args, stats=None, **kwargs):
        seen.append(stats is not None)
        return launcher(*args, stats=stats, **kwargs)

    monkeypatch.setattr(K, "feedforward_residual", recording)
    ff = make_ff(16, device=device).train()
    x = make_tokens((1, 3, 5), 16, device=device)
    with torch.no_grad():
        ops.feedforward_residual(x, ff, fused=True)
    ops.feedforward_residual(x, ff.requires_grad_(False), fused=True)
    ops.feedforward_residual(x.requires_grad_(), ff, fused=True)
    assert seen == [False, False, True]


# ----------------------------------------------------------------------------------------------
# dropout statistics and reproducibility
# ----------------------------------------------------------------------------------------------


def _assert_binomial(kept, n, p, name):
    expected, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - expected) <= 5 * sd, f"{name}: kept {kept} of {n}, expected {expected:.0f} +- {5 * sd:.0f}"


@pytest.mark.parametrize("path", PATHS)
def test_output_dropout_keep_rate(device, path):
    C, shape, p = 48, (3, 5, 9), 0.25
    ff = make_ff(C, device=device)
    x = make_tokens(shape, C, device=device)
    out = launch(x, ff, path, p_hidden=0.0, p_out=p, seed=int(torch.randint(0, 2**31 - 1, (1,))))
    kept = (out != x).sum().item()  # a kept output differs from x unless it is exactly 0
    _assert_binomial(kept, x.numel(), p, "output dropout")


def test_hidden_mask_rate_and_streams_independent(device):
    M, hidden, p = 1500, 96, 0.1
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    m_hidden = K.dropout_keep_mask(M, hidden, p, seed, K.STREAM_HIDDEN, device)
    _assert_binomial(m_hidden.sum().item(), M * hidden, p, "hidden dropout")
    m_out = K.dropout_keep_mask(M, hidden, p, seed, K.STREAM_OUT, device)
    agree = (m_hidden == m_out).sum().item()
    q = p * p + (1 - p) * (1 - p)  # agreement rate of two independent masks
    _assert_binomial(M * hidden - agree, M * hidden, q, "stream agreement")
    other = K.dropout_keep_mask(M, hidden, p, seed + 1, K.STREAM_HIDDEN, device)
    _assert_binomial(M * hidden - (m_hidden == other).sum().item(), M * hidden, q, "seed agreement")


def test_same_seed_same_output(device):
    C = 16
    ff = make_ff(C, device=device, dropout=0.1).train()
    x = make_tokens((2, 3, 5), C, device=device)
    s = torch.seed() % 2**31
    with torch.no_grad():
        torch.manual_seed(s)
        a = ops.feedforward_residual(x, ff, fused=True)
        torch.manual_seed(s)
        b = ops.feedforward_residual(x, ff, fused=True)
        c = ops.feedforward_residual(x, ff, fused=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # eval: no dropout, and torch's generator is left alone
    ff.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        out = ops.feedforward_residual(x, ff, fused=True)
        assert_close_normwise(out, ff(x) + x, 1e-5)
    assert torch.equal(state, torch.get_rng_state())


def test_full_dropout_gives_residual(device):
    ff = make_ff(16, device=device)
    x = make_tokens((1, 3, 5), 16, device=device)
    assert torch.equal(launch(x, ff, "fused", p_hidden=0.5, p_out=1.0, seed=7), x)


@pytest.mark.parametrize("path", PATHS)
def test_in_place(device, path):
    C = 48
    ff = make_ff(C, device=device).eval()
    x = make_tokens((2, 3, 7), C, device=device).permute(0, 2, 1, 3)
    with torch.no_grad():
        ref = ff(x) + x
    res = K.feedforward_residual(x, ff[0].weight, ff[0].bias, ff[0].eps, ff[1].weight, ff[1].bias,
                                 ff[4].weight, ff[4].bias, out=x, path=path)
    assert res is x
    assert_close_normwise(x, ref, 1e-5)


# ----------------------------------------------------------------------------------------------
# two row sets in one launch: tokens and the block step's register rows
# ----------------------------------------------------------------------------------------------

# (x leading shape, register rows (B, nX, nY, r)): odd sizes, r = 3 in 2 x 3 windows, batch 1
PAIR_SHAPES = [((2, 3, 5), (2, 2, 3, 3)), ((1, 4, 6), (1, 2, 3, 3))]


def register_rows(lead, C, dtype=torch.float32, device="cpu"):
    """(B, nX, nY, r, C) register rows as the attention op leaves them: sliced out of the window
    sequences (not contiguous; their leading dims coalesce to two)."""
    B, nx, ny, r = lead
    return make_tokens((B, nx, ny, r + 5), C, dtype, device)[:, :, :, 5:]


def launch_pair(x, extra, ff, path=None, p_hidden=0.0, p_out=0.0, seed=0, stats=None):
    """The launcher with both row sets, into NaN-poisoned outputs; its Triton launches."""
    out, extra_out = poison_(torch.empty_like(x)), poison_(torch.empty_like(extra))
    with triton_launches() as launched:
        res = K.feedforward_residual(x, ff[0].weight, ff[0].bias, ff[0].eps, ff[1].weight, ff[1].bias,
                                     ff[4].weight, ff[4].bias, p_hidden, p_out, seed, out=out, path=path,
                                     stats=stats, extra=extra, extra_out=extra_out)
    assert res[0] is out and res[1] is extra_out
    return out, extra_out, dict(launched.counts)


PAIR_LAUNCHES = {"fused": {"ff_fused_mlp_kernel": 1}, "two_pass": {"ff_up_kernel": 1, "ff_down_kernel": 1}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("C,shapes", [(16, PAIR_SHAPES[0]), (48, PAIR_SHAPES[1])])
def test_pair_fp32_matches_reference(device, C, shapes, path):
    """Tokens and register rows in one launch (two on the two-kernel path): each set against
    the reference FeedForward + residual, fp32 1e-5."""
    ff = make_ff(C, device=device).eval()
    x = make_input(shapes[0], C, "nchw_view", device=device)
    regs = register_rows(shapes[1], C, device=device)
    out, regs_out, launched = launch_pair(x, regs, ff, path)
    assert launched == PAIR_LAUNCHES[path]
    with torch.no_grad():
        assert_close_normwise(out, ff(x) + x, 1e-5, name=f"tokens C={C} {path}")
        assert_close_normwise(regs_out, ff(regs) + regs, 1e-5, name=f"registers C={C} {path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_low_precision_within_reference_error(device, dtype, path):
    """Both sets, fp16/bf16: at most 2x the reference module's own error against fp64 (+ half
    an ulp of the largest output)."""
    C, shapes = 24, PAIR_SHAPES[0]
    ff = make_ff(C, dtype, device).eval()
    ff64 = make_ff(C, torch.float64, device).eval()
    ff64.load_state_dict({k: v.double() for k, v in ff.state_dict().items()})
    x = make_input(shapes[0], C, "nchw_view", dtype, device)
    regs = register_rows(shapes[1], C, dtype, device)
    outs = launch_pair(x, regs, ff, path)[:2]
    for name, t, got in (("tokens", x, outs[0]), ("registers", regs, outs[1])):
        with torch.no_grad():
            truth = ff64(t.double()) + t.double()
            ref_lowp = ff(t) + t
        half_ulp = 0.5 * torch.finfo(dtype).eps * truth.abs().max().item()
        assert_within_reference_error(got, ref_lowp, truth, factor=2.0, atol=half_ulp, name=f"{name} {dtype} {path}")


@pytest.mark.parametrize("path", PATHS)
def test_pair_dropout_masks_continue_after_the_tokens(device, path):
    """With dropout, the pair call equals the reference under the masks of one call on the
    tokens followed by the register rows (token index M + row for the second set), and the
    register rows' masks are not the tokens' first rows' masks (no counter collision)."""
    C, shapes, p_hidden, p_out = 24, PAIR_SHAPES[1], 0.3, 0.25
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input(shapes[0], C, "nchw_view", device=device)
    regs = register_rows(shapes[1], C, device=device)
    out, regs_out, _ = launch_pair(x, regs, ff, path, p_hidden, p_out, seed)
    params = [p.detach() for p in ff.parameters()]
    ref, regs_ref = reference_with_masks(x, *params, ff[0].eps, p_hidden, p_out, seed, extra=regs)
    assert_close_normwise(out, ref, 1e-5, name="tokens")
    assert_close_normwise(regs_out, regs_ref, 1e-5, name="registers")
    (_, m_out), (_, m_out_regs) = keep_masks(x, 4 * C, p_hidden, p_out, seed, extra=regs)
    flat = K.dropout_keep_mask(x.numel() // C + regs.numel() // C, C, p_out, seed, K.STREAM_OUT, device)
    assert torch.equal(m_out_regs.reshape(-1, C), flat[x.numel() // C:])
    assert torch.equal(regs_out[~m_out_regs], regs[~m_out_regs])  # dropped: the residual exactly
    assert not torch.equal(m_out_regs.reshape(-1, C), m_out.reshape(-1, C)[:regs.numel() // C])


def pair_gradients(x, regs, ff, grads_out, seed):
    """Gradients of (x, register rows, every parameter) through the fused op with both row sets,
    and the Triton launches of its forward and of its backward."""
    x, regs = x.detach().requires_grad_(), regs.detach().requires_grad_()
    with triton_launches() as forward:
        outs = ops.feedforward_residual(x, ff, fused=True, seed=seed, extra=regs)
    with triton_launches() as backward:
        grads = torch.autograd.grad(outs, [x, regs, *ff.parameters()], grads_out)
    return grads, dict(forward.counts), dict(backward.counts)


def masked_reference_pair_gradients(x, regs, ff, grads_out, seed, dtype=None):
    dtype = dtype or x.dtype
    x, regs = x.detach().to(dtype).requires_grad_(), regs.detach().to(dtype).requires_grad_()
    params = [p.detach().to(dtype).requires_grad_() for p in ff.parameters()]
    outs = reference_with_masks(x, *params, ff[0].eps, ff[3].p, ff[5].p, seed, extra=regs)
    return torch.autograd.grad(outs, [x, regs, *params], [g.to(dtype) for g in grads_out])


PAIR_GRAD_NAMES = ("x", "registers", *GRAD_NAMES[1:])


@pytest.mark.parametrize("C,p_hidden,p_out,launches", [
    (24, 0.3, 0.2, ({"ff_fused_mlp_kernel": 1}, {"ff_fused_mlp_backward_kernel": 2})),  # backward kernel per set
    (48, 0.0, 0.0, ({"ff_fused_mlp_kernel": 1}, {"ff_fused_mlp_backward_kernel": 2})),  # dW2 without output dropout
    (80, 0.2, 0.1, ({"ff_up_kernel": 1, "ff_down_kernel": 1},
                    {"ff_dropout_grad_kernel": 1, "ff_up_backward_kernel": 1,
                     "layernorm_backward_kernel": 2})),  # two-kernel widths: LayerNorm backward per set
])
def test_pair_gradients_fp32(device, C, p_hidden, p_out, launches):
    """Every gradient of both row sets against autograd through the reference under the
    forward's masks, fp32 1e-5 relative L2; one forward launch for both sets (two on the
    two-kernel path)."""
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input(PAIR_SHAPES[0][0], C, "nchw_view", device=device)
    regs = register_rows(PAIR_SHAPES[0][1], C, device=device)
    grads_out = (torch.randn_like(x), torch.randn_like(regs))
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    grads, fwd, bwd = pair_gradients(x, regs, ff, grads_out, seed)
    assert (fwd, bwd) == launches
    for name, g, r in zip(PAIR_GRAD_NAMES, grads, masked_reference_pair_gradients(x, regs, ff, grads_out, seed)):
        assert_close_l2(g, r, 1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_gradients_low_precision(device, dtype):
    """fp16/bf16 (backward kernel, dropout on): each gradient within 2x the reference module's
    own error against fp64 under the same masks (+ half an ulp of its largest entry)."""
    C, p_hidden, p_out = 64, 0.1, 0.2
    ff = set_dropout(make_ff(C, dtype, device), p_hidden, p_out)
    x = make_input(PAIR_SHAPES[1][0], C, "nchw_view", dtype, device)
    regs = register_rows(PAIR_SHAPES[1][1], C, dtype, device)
    grads_out = (torch.randn_like(x), torch.randn_like(regs))
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    grads, _, bwd = pair_gradients(x, regs, ff, grads_out, seed)
    assert bwd == {"ff_fused_mlp_backward_kernel": 2}
    truth = masked_reference_pair_gradients(x, regs, ff, grads_out, seed, torch.float64)
    ref_lowp = masked_reference_pair_gradients(x, regs, ff, grads_out, seed)
    for name, g, r, t in zip(PAIR_GRAD_NAMES, grads, ref_lowp, truth):
        assert g.dtype == dtype, name
        half_ulp = 0.5 * torch.finfo(dtype).eps * t.abs().max().item()
        assert_within_reference_error(g, r, t, factor=2.0, atol=half_ulp, name=f"{dtype} d{name}")


def test_pair_one_output_unused_and_reference_path(device):
    """Only the register rows' output feeds the loss: the tokens get only the residual-free
    zero contribution (a zero gradient), the rest is exact. The reference path (fused=False)
    is the reference module on each set."""
    C = 16
    ff = make_ff(C, device=device).train()
    x = make_input((1, 3, 5), C, "contiguous", device=device).requires_grad_()
    regs = register_rows((1, 1, 3, 3), C, device=device).detach().requires_grad_()
    out, regs_out = ops.feedforward_residual(x, ff, fused=True, extra=regs)
    g = torch.randn_like(regs_out)
    grads = torch.autograd.grad(regs_out, [x, regs, *ff.parameters()], g, allow_unused=True)
    ref = torch.autograd.grad(ff(regs) + regs, [regs, *ff.parameters()], g)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    for name, a, b in zip(PAIR_GRAD_NAMES[1:], grads[1:], ref):
        assert_close_l2(a, b, 1e-5, name=name)
    with torch.no_grad():
        ref_pair = ops.feedforward_residual(x, ff.eval(), fused=False, extra=regs)
        assert torch.equal(ref_pair[0], ff(x) + x) and torch.equal(ref_pair[1], ff(regs) + regs)


def test_pair_statistics_by_token(device):
    """The training forward of both sets writes the LayerNorm statistics of every token by token
    index (x's, then the register rows'); the backward launcher reads the second set's at
    token0 = M."""
    C, p_hidden, p_out = 24, 0.2, 0.1
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    ff = set_dropout(make_ff(C, device=device), p_hidden, p_out)
    x = make_input((1, 3, 5), C, "nchw_view", device=device)
    regs = register_rows((1, 1, 3, 3), C, device=device)
    M, M_regs = x.numel() // C, regs.numel() // C
    stats = poison_(torch.empty(2, M + M_regs, device=device))
    with torch.no_grad():
        launch_pair(x, regs, ff, "fused", p_hidden, p_out, seed, stats=stats)
    rows = torch.cat([x.reshape(-1, C), regs.reshape(-1, C)])
    assert_close_normwise(stats[0], rows.mean(-1), 1e-5, name="mean")
    assert_close_normwise(stats[1], torch.rsqrt(rows.var(-1, unbiased=False) + ff[0].eps), 1e-5, name="rstd")
    params = [p.detach() for p in ff.parameters()]
    grad = torch.randn_like(regs)
    with torch.no_grad():
        dregs = K.feedforward_residual_backward(regs, grad, stats, *params[:5], p_hidden, p_out, seed, token0=M)[0]
    regs_ref = regs.clone().requires_grad_()
    _, out_ref = reference_with_masks(x, *params, ff[0].eps, p_hidden, p_out, seed, extra=regs_ref)
    assert_close_normwise(dregs, torch.autograd.grad(out_ref, regs_ref, grad)[0], 1e-5, name="d registers")
    with pytest.raises(ValueError, match="stats must be"):
        K.feedforward_residual_backward(regs, grad, stats, *params[:5], p_hidden, p_out, seed, token0=M + 1)
    with pytest.raises(ValueError, match="stats must be"):  # the forward takes exactly (2, tokens of both sets)
        launch_pair(x, regs, ff, "fused", stats=torch.empty(2, M, device=device))


# ----------------------------------------------------------------------------------------------
# in the model: block step (tokens and register rows) and grid step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train,dim", [(False, 16), (True, 16), (True, 64)])
def test_model_with_fused_feedforward(device, monkeypatch, train, dim):
    """A small MaxViT with only the feed-forward fused (the other ops forced to the reference)
    against the reference model: eval outputs, and in train mode (dropout 0) the gradients.
    dim 64: stage 2 is 128 wide, a two-kernel width in fp32 (its own backward)."""
    from maxvit_fast import MaxViT

    model_ops = sys.modules["maxvit_fast.model"].ops
    real_attn, real_mbconv = model_ops.window_attention_residual, model_ops.mbconv
    monkeypatch.setattr(model_ops, "window_attention_residual", lambda *a, **k: real_attn(*a[:4], False, **k))
    monkeypatch.setattr(model_ops, "mbconv", lambda x, m, fused: real_mbconv(x, m, False))
    kwargs = dict(num_classes=5, dim=dim, depth=(1, 1), dim_head=8, window_size=2, dropout=0.0)
    ref = MaxViT(**kwargs).to(device)
    fused = MaxViT(**kwargs, fused=True).to(device)
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    x = torch.randn(2, 3, 16, 16, device=device)
    if not train:
        with torch.no_grad():
            assert_close_normwise(fused(x), ref(x), 1e-5, name="logits")
        return
    grad = torch.randn(2, 5, device=device)
    out_ref, out_fused = ref(x), fused(x)
    assert_close_normwise(out_fused, out_ref, 1e-5, name="logits")
    g_ref = torch.autograd.grad(out_ref, list(ref.parameters()), grad)
    g_fused = torch.autograd.grad(out_fused, list(fused.parameters()), grad)
    largest = max(g.norm().item() for g in g_ref)
    # the conv biases in front of train-mode BatchNorms (MBConv runs the reference here): their
    # exact gradient is zero, autograd returns the noise of a cancelling sum, which differs
    # between any two runs whose upstream gradients differ in rounding; both must be noise-sized
    cancelling = {f"{prefix}.{i}.bias" for prefix, seq in ref.named_modules() if isinstance(seq, torch.nn.Sequential)
                  for i, (a, b) in enumerate(zip(seq, list(seq)[1:]))
                  if isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d) and a.bias is not None}
    assert cancelling
    for (name, _), a, b in zip(ref.named_parameters(), g_fused, g_ref):
        if name in cancelling:
            assert max(a.norm().item(), b.norm().item()) <= 1e-5 * largest, name
        else:
            assert_close_l2(a, b, 1e-4, name=name, floor=1e-3 * largest)


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile of the configurations the default MaxViT-T uses
# ----------------------------------------------------------------------------------------------

def _signature(kernel, dtype_name):
    """Every argument of ``kernel``: tensors as ``*dtype``, the fp32 scalars, i32 integers;
    the channel strides are constexpr 1 (channels-last tokens), as Triton specialises them."""
    sig = {}
    # the plain Python function (the interpreter's wrapper and triton.jit both hold it as .fn)
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if name == "seed_ptr":
            sig[name] = "*i64"
        elif name in ("stats_ptr", "partial_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype_name}"
        elif "constexpr" in str(param.annotation) or name in ("stride_xc", "stride_oc", "stride_gc", "stride_dc",
                                                                 "stride_ec", "stride_eoc"):
            sig[name] = "constexpr"
        elif name == "eps" or name.startswith(("p_", "scale_")):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def maxvit_t_requests(dtypes=(torch.float16, torch.bfloat16), widths=(64, 128, 256, 512)):
    """The launches the default MaxViT-T makes, eval (no dropout) and train (dropout 0.1; the
    one-pass forward then also writes the LayerNorm statistics), forward and backward kernels,
    from the launcher's own config functions. The backward kernel runs in training with and
    without dropout: "eval" below means its no-dropout variant."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    requests = []
    for dtype in dtypes:
        for C in widths:
            hidden = 4 * C
            cfg = K.fused_mlp_config(C, dtype)
            common = dict(C=C, HIDDEN=hidden, stride_xc=1, stride_ec=1, FP32_DOT=dtype == torch.float32, ROUND_BF16=False,
                          HAS_BIAS=True, STREAM=K.STREAM_OUT)  # ff_down_kernel: the feed-forward's bias and stream
            if cfg is not None:
                launches = [(K.ff_fused_mlp_kernel, dict(cfg, BLOCK_C=triton.next_power_of_2(C), stride_oc=1, stride_eoc=1),
                             ("DROPOUT_HIDDEN", "DROPOUT_OUT", "WRITE_STATS"))]
                bwd = K.backward_config(C, dtype)
                if bwd is not None:
                    launches.append((K.ff_fused_mlp_backward_kernel,
                                     dict(bwd, BLOCK_C=triton.next_power_of_2(C), stride_gc=1, stride_dc=1),
                                     ("DROPOUT_HIDDEN", "DROPOUT_OUT")))
            else:
                up, down = K.two_pass_configs(C, hidden, dtype)
                launches = [(K.ff_up_kernel, dict(up), ("DROPOUT_HIDDEN",)),
                            (K.ff_down_kernel, dict(down, stride_oc=1, stride_eoc=1), ("DROPOUT_OUT",)),
                            (K.ff_up_backward_kernel, dict(K.up_backward_config(dtype)), ("DROPOUT_HIDDEN",))]
            for kernel, cfg, flags in launches:
                for train in (False, True):
                    sig = _signature(kernel, names[dtype])
                    const = dict(common, **{k: v for k, v in cfg.items() if not k.startswith("num_")},
                                 **{f: train for f in flags})
                    const = {k: v for k, v in const.items() if k in sig}
                    requests.append(dict(
                        module="maxvit_fast.kernels.feedforward", kernel=kernel.__name__, signature=sig,
                        constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        # strides of channels-last maps with 16 | C are multiples of 16
                        divisible=[n for n, t in sig.items() if n.startswith("stride") and t == "i32"],
                    ))
    return requests


def test_aot_compile_maxvit_t_configurations():
    """fp16/bf16 and fp32 launches of the default model, forward and backward: no spills;
    tensor cores in fp16/bf16."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requests = [dict(r, arch=arch) for r in maxvit_t_requests(dtypes) for arch in (80, 90)]
    failures, table = [], []
    for k in compile_kernels(requests):
        req, c = k.request, k.request["constexprs"]
        flags = "train" if c.get("DROPOUT_HIDDEN", c.get("DROPOUT_OUT")) else "eval"
        dtype = req["signature"]["w2_ptr" if "w2_ptr" in req["signature"] else "w1_ptr"]
        line = f"{k.summary()} {dtype} C={c['C']} {flags}"
        table.append(line)
        if k.spills:
            failures.append("spills: " + line)
        if dtype != "*fp32" and not (k.uses("HMMA") or (k.arch == 90 and k.uses("HGMMA"))):
            failures.append("no tensor-core instructions: " + line)
    print("\n".join(table))
    assert not failures, "\n".join(failures)
