"""LayerNorm + Linear over two row sets in one launch (kernels/layernorm_linear.py, the
maxvit_fast::layernorm_linear op) against F.linear(F.layer_norm(...)), through the Triton
interpreter on the CPU (compiled kernels on a GPU).

Tolerances: fp32 1e-5 relative, normwise (outputs) and L2 (gradients): both sides compute in fp32
and only the summation order differs. fp16/bf16: the kernel's max error against an fp64
reference is at most 2x the error of the torch ops in that dtype, plus an atol of 1e-3 x the
output's largest entry (for cases the torch ops happen to round almost exactly).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maxvit_fast.kernels import layernorm_linear as K
from maxvit_fast.ops.layernorm_linear import layernorm_linear, layernorm_linear_op, reference, route_residual_gradient

from .conftest import DEVICE
from .helpers import assert_close_l2, assert_close_normwise, assert_within_reference_error, poison_

pytest.importorskip("triton")


def make_tokens(batch, height, width, channels, dtype, layout):
    """(B, H, W, C) tokens: the channels-last view of an NCHW tensor, stored NCHW (channels
    H*W apart: a strided input) or channels-last (the model's layout)."""
    x = torch.randn(batch, channels, height, width, device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.permute(0, 2, 3, 1)


def make_params(channels, n, dtype, ln_bias=True, bias=False):
    ln_w = 1.0 + 0.2 * torch.randn(channels, device=DEVICE, dtype=dtype)
    ln_b = 0.2 * torch.randn(channels, device=DEVICE, dtype=dtype) if ln_bias else None
    w = torch.randn(n, channels, device=DEVICE, dtype=dtype) / channels**0.5
    b = 0.1 * torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return ln_w, ln_b, w, b


def torch_ops(x, extra, ln_w, ln_b, w, b, first, dtype=None):
    """The function in torch ops, optionally computed in another dtype (fp64: the truth)."""
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype else (lambda t: t)
    return reference(cast(x), cast(extra), cast(ln_w), cast(ln_b), cast(w), cast(b), 1e-5, first)


def run_kernel_poisoned(x, extra, ln_w, ln_b, w, b, first):
    """The launcher with NaN-filled preallocated outputs: any entry it does not write fails."""
    n = w.shape[0]
    out = poison_(torch.empty((*x.shape[:-1], n), device=DEVICE, dtype=x.dtype))
    extra_out = poison_(torch.empty((*extra.shape[:-1], n - first), device=DEVICE, dtype=x.dtype))
    got, got_extra = K.layernorm_linear(x, ln_w, ln_b, 1e-5, w, b, extra=extra, extra_first_col=first,
                                        out=out, extra_out=extra_out)
    assert got is out and got_extra is extra_out
    return out, extra_out


# (C, batch, H, W, registers, register batch, first column of the register rows, token layout,
# LayerNorm bias, linear bias). C = 16/24/48/64 (one K chunk and several, partial chunks), odd
# token counts (35, 3*21 rows: partial row tiles), shared (1, r, C) and per-image (B, r, C)
# register rows, output columns 0: (block step) and C: (grid step).
CASES = [
    (16, 1, 5, 7, 4, 1, 0, "nchw", True, False),
    (24, 3, 3, 7, 3, 3, 24, "channels_last", True, True),
    (48, 3, 7, 3, 4, 1, 0, "nchw", False, False),
    (64, 1, 7, 7, 4, 1, 64, "channels_last", True, False),
    (64, 3, 5, 3, 2, 3, 0, "nchw", True, True),
]


def case_id(c):
    return "C{}-B{}-{}x{}-r{}x{}-col{}-{}{}{}".format(*c[:8], "-lnb" if c[8] else "", "-bias" if c[9] else "")


def inputs(case, dtype):
    C, batch, h, w, r, reg_batch, first, layout, ln_bias, bias = case
    x = make_tokens(batch, h, w, C, dtype, layout)
    extra = torch.randn(reg_batch, r, C, device=DEVICE, dtype=dtype)
    return (x, extra, *make_params(C, 3 * C, dtype, ln_bias, bias), first)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_matches_torch_ops(case):
    x, extra, ln_w, ln_b, w, b, first = inputs(case, torch.float32)
    out, extra_out = run_kernel_poisoned(x, extra, ln_w, ln_b, w, b, first)
    ref, ref_extra = torch_ops(x, extra, ln_w, ln_b, w, b, first)
    assert_close_normwise(out, ref, 1e-5, name="token rows")
    assert_close_normwise(extra_out, ref_extra, 1e-5, name="extra rows")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1::2] + CASES[::2][:2], ids=case_id)
def test_low_precision_within_twice_torch_error(case, dtype):
    x, extra, ln_w, ln_b, w, b, first = inputs(case, dtype)
    out, extra_out = run_kernel_poisoned(x, extra, ln_w, ln_b, w, b, first)
    ref_lowp = torch_ops(x, extra, ln_w, ln_b, w, b, first)
    truth = torch_ops(x, extra, ln_w, ln_b, w, b, first, dtype=torch.float64)
    for name, got, lowp, t in zip(("token rows", "extra rows"), (out, extra_out), ref_lowp, truth):
        assert got.dtype == dtype
        assert_within_reference_error(got, lowp, t, factor=2.0, atol=1e-3 * t.abs().max().item(), name=name)


def test_bf16_several_k_chunks():
    """C = 96 on the fp16/bf16 tile: two K chunks of 64 and 32 (unequal chunks in the statistics
    merge); N = 288 = 4 * 64 + 32, a partial last column tile."""
    C, dtype = 96, torch.bfloat16
    x = make_tokens(3, 3, 5, C, dtype, "nchw")
    extra = torch.randn(1, 4, C, device=DEVICE, dtype=dtype)
    ln_w, ln_b, w, b = make_params(C, 3 * C, dtype)
    out, extra_out = run_kernel_poisoned(x, extra, ln_w, ln_b, w, b, C)
    ref_lowp = torch_ops(x, extra, ln_w, ln_b, w, b, C)
    truth = torch_ops(x, extra, ln_w, ln_b, w, b, C, dtype=torch.float64)
    for name, got, lowp, t in zip(("token rows", "extra rows"), (out, extra_out), ref_lowp, truth):
        assert_within_reference_error(got, lowp, t, factor=2.0, atol=1e-3 * t.abs().max().item(), name=name)


def test_without_extra_rows_and_without_affine():
    C = 24
    x = make_tokens(1, 3, 5, C, torch.float32, "nchw")
    w = torch.randn(2 * C, C, device=DEVICE) / C**0.5
    out = poison_(torch.empty(1, 3, 5, 2 * C, device=DEVICE))
    got, got_extra = K.layernorm_linear(x, None, None, 1e-5, w, out=out)
    assert got is out and got_extra is None
    assert_close_normwise(out, F.linear(F.layer_norm(x, (C,), eps=1e-5), w), 1e-5, name="no affine, no extra rows")


def test_default_outputs_are_fully_written(monkeypatch):
    """The launcher's own outputs (NaN-filled under POISON_OUTPUTS) for a large row offset: the
    second image's rows of a 3-image map, so row tiles straddle images."""
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    x, extra, ln_w, ln_b, w, b, first = inputs(CASES[2], torch.float32)
    out, extra_out = K.layernorm_linear(x, ln_w, ln_b, 1e-5, w, b, extra=extra, extra_first_col=first)
    assert out.is_contiguous() and extra_out.is_contiguous()
    ref, ref_extra = torch_ops(x, extra, ln_w, ln_b, w, b, first)
    assert_close_normwise(out, ref, 1e-5, name="token rows")
    assert_close_normwise(extra_out, ref_extra, 1e-5, name="extra rows")


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=case_id)
def test_gradients_through_the_op(monkeypatch, case):
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    x, extra, ln_w, ln_b, w, b, first = inputs(case, torch.float32)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, extra, ln_w, ln_b, w, b)]
    out, extra_out, carrier = layernorm_linear(*leaves, 1e-5, first)
    assert carrier is None  # only on request
    ref, ref_extra = reference(*leaves, 1e-5, first)
    assert_close_normwise(out, ref, 1e-5, name="token rows")
    assert_close_normwise(extra_out, ref_extra, 1e-5, name="extra rows")
    cot, cot_extra = torch.randn_like(ref), torch.randn_like(ref_extra)
    wanted = [t for t in leaves if t is not None]
    names = [n for n, t in zip(("x", "extra", "ln_weight", "ln_bias", "weight", "bias"), leaves) if t is not None]
    g_kernel = torch.autograd.grad((out * cot).sum() + (extra_out * cot_extra).sum(), wanted)
    g_ref = torch.autograd.grad((ref * cot).sum() + (ref_extra * cot_extra).sum(), wanted)
    for name, a, r in zip(names, g_kernel, g_ref):
        assert_close_l2(a, r, 1e-5, name=f"grad {name}")


@pytest.mark.parametrize("path", ["kernel", "aten"])
def test_layernorm_backward_rows_matches_autograd(monkeypatch, path):
    """The op-level LayerNorm backward over several row sets (the attention's and the wide
    feed-forward's backward): the Triton kernel, and aten's LayerNorm backward for rows wider than
    the kernel takes (forced here by lowering MAX_CHANNELS). dx with the residual gradient, xn,
    and dgamma / dbeta summed over both sets, fp32 1e-5 against autograd."""
    import maxvit_fast.kernels.layernorm_backward as LB
    from maxvit_fast.ops.layernorm_linear import layernorm_backward_rows

    monkeypatch.setattr(LB, "POISON_OUTPUTS", True)
    if path == "aten":
        monkeypatch.setattr(LB, "MAX_CHANNELS", 8)
    C = 24
    x = make_tokens(2, 3, 5, C, torch.float32, "channels_last")
    extra = torch.randn(2, 3, C)
    ln_w, ln_b = 1 + 0.3 * torch.randn(C), 0.2 * torch.randn(C)
    dxn = [torch.randn(30, C), torch.randn(6, C)]
    res = [torch.randn(30, C), None]
    dxs, xns, dg, db = layernorm_backward_rows([(x, dxn[0], res[0]), (extra, dxn[1], res[1])], ln_w, ln_b, 1e-5,
                                               True, True, True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, extra, ln_w, ln_b)]
    outs = [F.layer_norm(t, (C,), leaves[2], leaves[3], 1e-5) for t in leaves[:2]]
    loss = sum((o.reshape(-1, C) * d).sum() for o, d in zip(outs, dxn))
    ref = torch.autograd.grad(loss, leaves)
    assert_close_normwise(dxs[0], ref[0] + res[0].view(x.shape), 1e-5, name="dx")
    assert_close_normwise(dxs[1], ref[1], 1e-5, name="d extra")
    for got, o in zip(xns, outs):
        assert_close_normwise(got, o.reshape(-1, C), 1e-5, name="xn")
    assert_close_normwise(dg, ref[2], 1e-5, name="dgamma")
    assert_close_normwise(db, ref[3], 1e-5, name="dbeta")


@pytest.mark.parametrize("carrier", [False, True], ids=["plain", "residual_carrier"])
def test_op_without_extra_rows_gradients(carrier):
    """Gradients through the op; with the residual carrier, y = x + (anything) computed with x
    detached and joined by route_residual_gradient gives x the residual's gradient too, added in
    the op's backward (fp32 at 1e-5 against autograd of the reference)."""
    C = 16
    x = make_tokens(3, 3, 3, C, torch.float32, "channels_last").detach().requires_grad_()
    ln_w, ln_b, w, _ = make_params(C, 3 * C, torch.float32)
    params = [t.requires_grad_() for t in (ln_w, ln_b, w)]
    out, empty, carried = layernorm_linear_op(x, None, *params[:2], params[2], None, 1e-5, 0, carrier)
    assert empty.numel() == 0
    ref = F.linear(F.layer_norm(x, (C,), params[0], params[1], 1e-5), params[2])
    cot, cot_residual = torch.randn_like(ref), torch.randn_like(x)
    loss, loss_ref = (out * cot).sum(), (ref * cot).sum()
    if carrier:
        assert carried.shape == x.shape and carried.untyped_storage().nbytes() == x.element_size()
        assert torch.all(carried == 0)
        y = route_residual_gradient(x.detach() + 1.0, carried)  # y = x + 1 with x detached
        loss, loss_ref = loss + (y * cot_residual).sum(), loss_ref + ((x + 1.0) * cot_residual).sum()
    else:
        assert carried.numel() == 0
    for name, a, r in zip(("x", "ln_weight", "ln_bias", "weight"), torch.autograd.grad(loss, [x, *params]),
                          torch.autograd.grad(loss_ref, [x, *params])):
        assert_close_l2(a, r, 1e-5, name=f"grad {name}")


def test_bad_arguments_raise_clear_errors():
    C = 16
    x = make_tokens(1, 2, 2, C, torch.float32, "nchw")
    ln_w, ln_b, w, _ = make_params(C, 3 * C, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        K.layernorm_linear(x, ln_w, ln_b, 1e-5, w[:, :8])
    with pytest.raises(ValueError, match="ln_weight"):
        K.layernorm_linear(x, ln_w[:8], ln_b, 1e-5, w)
    with pytest.raises(ValueError, match="extra"):
        K.layernorm_linear(x, ln_w, ln_b, 1e-5, w, extra=torch.randn(1, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="extra_first_col"):
        K.layernorm_linear(x, ln_w, ln_b, 1e-5, w, extra=torch.randn(1, 4, C, device=DEVICE), extra_first_col=3 * C)
    with pytest.raises(ValueError, match="out must be"):
        K.layernorm_linear(x, ln_w, ln_b, 1e-5, w, out=torch.empty(1, 2, 2, 2 * C, device=DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        K.layernorm_linear(x.double(), ln_w.double(), ln_b.double(), 1e-5, w.double())


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile of the MaxViT-T configurations
# ---------------------------------------------------------------------------------------------

_INTS = ("M", "D1", "stride_x0", "stride_x1", "M_extra", "D1_extra", "stride_e0", "stride_e1", "x_programs")
# Leading strides of channels-last maps and register rows at C = 64 * 2^i (and the 0 of a
# coalesced leading dim) are multiples of 16: Triton's runtime gives them the divisibility hint.
_DIVISIBLE = ["stride_x0", "stride_x1", "stride_e0", "stride_e1"]


def maxvit_t_requests(arch):
    """Every launch MaxViT-T makes: C = 64..512, N = 3C, block step (register columns 0:) and
    grid step (register columns C:), fp16 and bf16; the model's LayerNorm has an affine weight
    and bias, to_qkv no bias; channel strides 1 (constexpr, as Triton specialises them)."""
    requests = []
    for C in (64, 128, 256, 512):
        cfg = K.tile_config(3 * C, torch.float16)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        for elem in ("fp16", "bf16"):
            for step, first in (("block", 0), ("grid", C)):
                sig = {n: f"*{elem}" for n in ("x_ptr", "extra_ptr", "out_ptr", "extra_out_ptr", "carrier_ptr",
                                               "ln_w_ptr", "ln_b_ptr", "w_ptr")}
                sig.update({n: "i32" for n in _INTS}, eps="fp32")
                constexprs = dict(C=C, N=3 * C, EXTRA_COL0=first, **cfg, HAS_LN_WEIGHT=True, HAS_LN_BIAS=True,
                                  HAS_BIAS=False, FP32_DOT=False, ROUND_BF16=False, stride_xc=1, stride_ec=1, b_ptr=None,
                                  WRITE_CARRIER=step == "block")  # (training writes it, both steps)
                requests.append(dict(module="maxvit_fast.kernels.layernorm_linear", kernel="layernorm_linear_kernel",
                                     signature=sig, constexprs=constexprs, arch=arch, num_warps=warps, num_stages=stages,
                                     divisible=_DIVISIBLE, label=f"C={C} {step} {elem}"))
    return requests


@pytest.mark.parametrize("arch", [80, 90])
def test_maxvit_t_configurations_compile_without_spills_on_tensor_cores(arch):
    from maxvit_fast.aot import compile_kernels

    requests = maxvit_t_requests(arch)
    labels = [r.pop("label") for r in requests]
    problems = []
    for label, k in zip(labels, compile_kernels(requests, shards=2)):
        c = k.request["constexprs"]
        print(f"sm_{arch} {label} tile {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} {k.request['num_warps']} warps: "
              f"REG {k.registers} STACK {k.stack} LOCAL {k.local}")
        if k.spills:
            problems.append(f"{label}: spills (local {k.local}, stack {k.stack})")
        if not (k.uses("HMMA") if arch == 80 else (k.uses("HGMMA") or k.uses("HMMA"))):
            problems.append(f"{label}: no tensor-core instruction")
    assert not problems, "\n".join(problems)
