"""Fused window attention (block and grid steps, registers, relative-position bias) against the
reference path, forward and backward, through the Triton interpreter on the CPU (compiled kernels
on a GPU).

Tolerances: fp32 1e-5 relative (normwise for outputs, L2 for gradients): both sides compute in
fp32 and only the summation order differs. fp16/bf16: the fused error against an fp32 reference
(the same weights and inputs, upcast) is at most 2x the reference module's own error in that
dtype (max entry error for outputs, L2 error for gradients), plus an atol of 1e-3 x the reference's
scale (max entry, resp. norm), for values the reference happens to round almost exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import maxvit_fast.ops.window_attention as wa_op
from maxvit_fast import FusedFallbackWarning, MaxViT, reset_fallback_warnings
from maxvit_fast.kernels import layernorm_linear as LNL
from maxvit_fast.kernels import window_attention as K
from maxvit_fast.ops.window_attention import _reference, window_attention_residual
from maxvit_fast.reference import Attention
from maxvit_fast.traffic import TrafficCounter, triton_launches

from .helpers import (assert_close_l2, assert_close_normwise, assert_within_reference_error, poison_,
                      randomize_batchnorm_buffers_)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the kernels must write completely starts as NaN (qkv and register q/k/v from
    the LayerNorm + projection kernel; out, register outputs, lse, dqkv, register-row gradients,
    dK/dV partials)."""
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    monkeypatch.setattr(LNL, "POISON_OUTPUTS", True)


def make_attention(dim, dim_head, window, num_registers, dtype=torch.float32, dropout=0.0):
    attn = Attention(dim, dim_head=dim_head, dropout=dropout, window_size=window, num_registers=num_registers)
    with torch.no_grad():  # non-trivial LayerNorm affine so its gradients are exercised
        attn.norm.weight.normal_(1.0, 0.2)
        attn.norm.bias.normal_(0.0, 0.2)
    return attn.to(DEVICE, dtype)


def make_inputs(batch, nx, ny, window, dim, pattern, dtype=torch.float32):
    """x: the channels-last view of an NCHW tensor (as the model hands it over)."""
    return torch.randn(batch, dim, nx * window, ny * window, device=DEVICE, dtype=dtype).permute(0, 2, 3, 1)


def make_registers(batch, num_registers, dim, per_image, dtype=torch.float32):
    shape = (batch, num_registers, dim) if per_image else (num_registers, dim)
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def run(x, registers, attn, pattern, fused, need_register_outputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedFallbackWarning)  # the fused path must really run
        return window_attention_residual(x, registers, attn, pattern, fused, need_register_outputs)


def assert_l2_within_reference_error(actual, ref_lowp, ref_fp32, factor, name):
    """The low-precision rule for gradients, in the L2 norm: a gradient is a long sum, and the max
    entry error of a short vector (a LayerNorm bias: C entries) is a noisy statistic. The atol is
    1e-3 of the reference gradient's norm."""
    truth = ref_fp32.detach().double()
    err = (actual.detach().double() - truth).norm().item()
    ref_err = (ref_lowp.detach().double() - truth).norm().item()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    bound = factor * ref_err + 1e-3 * truth.norm().item()
    assert err <= bound, f"{name}: L2 error {err:.3e} > {factor:g} x reference's own {ref_err:.3e} + atol"


def grads_of(outputs, cotangents, tensors):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents) if o is not None)
    return torch.autograd.grad(loss, tensors)


def assert_gradients_match(fused_outputs, ref_outputs, x, registers, attn, rtol=1e-5):
    """Gradients of x, the registers and every attention parameter under one random cotangent,
    fused against reference (relative L2)."""
    cot = [torch.randn_like(r) if r is not None else None for r in ref_outputs]
    params = dict(x=x, registers=registers, **dict(attn.named_parameters()))
    g_f = grads_of(fused_outputs, cot, list(params.values()))
    g_r = grads_of(ref_outputs, cot, list(params.values()))
    for name, a, b in zip(params, g_f, g_r):
        assert_close_l2(a, b, rtol, name=f"grad {name}")


# (pattern, batch, nX, nY, window, registers, dim_head, heads, need_register_outputs)
# Covers: both patterns, batch 1 and 3, windows 3/5/7/8, registers 1/4, dim_head 16/32, 1-3 heads,
# several windows per image, register outputs on and off in both patterns, one and several query
# tiles (w=8 block step: 68 query rows), 16-, 64- and 128-key tiles.
FP32_CASES = [
    ("block", 1, 2, 3, 7, 4, 32, 2, True),
    ("grid", 3, 2, 2, 3, 1, 16, 2, False),
    ("block", 3, 1, 2, 8, 1, 16, 1, True),
    ("grid", 1, 2, 1, 8, 4, 32, 2, False),
    ("block", 1, 2, 2, 5, 4, 16, 3, False),
    ("grid", 3, 2, 1, 5, 1, 16, 1, True),
]


# Sequences longer than one 128-key tile (the key-loop kernels; fp32 tiles are 32 queries x 16 keys,
# so these run 5-9 query tiles x 9-10 key tiles): w = 12 with 4 registers (n = 148, a 24x24 map of
# 4 windows, batch 2) in both patterns, and w = 11 with 8 registers (n = 129, just over the
# one-tile limit) with register outputs. One head where the interpreter's cost counts.
LONG_FP32_CASES = [
    ("block", 2, 2, 2, 12, 4, 16, 1, True),
    ("grid", 2, 2, 2, 12, 4, 16, 1, False),
    ("block", 1, 1, 2, 11, 8, 16, 2, True),
]


@pytest.mark.parametrize("case", FP32_CASES + LONG_FP32_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp32_forward_and_gradients_match_reference(case):
    pattern, batch, nx, ny, window, r, dim_head, heads, need_regs = case
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r)
    x = make_inputs(batch, nx, ny, window, dim, pattern).requires_grad_()
    registers = make_registers(batch, r, dim, per_image=pattern == "grid").requires_grad_()

    out_f, regs_f = run(x, registers, attn, pattern, True, need_regs)
    out_r, regs_r = run(x, registers, attn, pattern, False, need_regs)
    assert_close_normwise(out_f, out_r, 1e-5, name="tokens")
    if need_regs:
        assert_close_normwise(regs_f, regs_r, 1e-5, name="register rows")
    else:
        assert regs_f is None and regs_r is None

    assert_gradients_match([out_f, regs_f], [out_r, regs_r if need_regs else None], x, registers, attn)


LOWP_CASES = [
    ("block", torch.float16, 1, 2, 2, 7, 4, 32, 2),
    ("grid", torch.bfloat16, 3, 2, 1, 5, 4, 16, 2),
    ("block", torch.bfloat16, 1, 1, 2, 8, 1, 32, 1),
    # key-loop kernels (64 x 32 tiles): w = 12 (n = 148) both patterns, w = 16 (n = 260).
    # C >= 32 everywhere: the LayerNorm gradients' L2 error over C = 16 entries is a noisy statistic
    # (ratio to the bound 0.15-1.01 seen in bf16, one failure in ~50 runs; <= 0.6 at C = 32)
    ("block", torch.float16, 2, 2, 2, 12, 4, 32, 1),
    ("grid", torch.bfloat16, 2, 2, 2, 12, 4, 32, 1),
    ("block", torch.bfloat16, 1, 1, 2, 16, 4, 32, 1),
]


@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_low_precision_within_twice_the_reference_error(case):
    pattern, dtype, batch, nx, ny, window, r, dim_head, heads = case
    dim = dim_head * heads
    need_regs = pattern == "block"
    attn = make_attention(dim, dim_head, window, r, dtype=dtype)
    attn32 = make_attention(dim, dim_head, window, r)
    attn32.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    x = make_inputs(batch, nx, ny, window, dim, pattern, dtype=dtype).requires_grad_()
    registers = make_registers(batch, r, dim, per_image=pattern == "grid", dtype=dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    registers32 = registers.detach().float().requires_grad_()

    outs = {
        "fused": run(x, registers, attn, pattern, True, need_regs),
        "ref": run(x, registers, attn, pattern, False, need_regs),
        "fp32": run(x32, registers32, attn32, pattern, False, need_regs),
    }
    for i, what in enumerate(["tokens", "register rows"][: 1 + need_regs]):
        truth = outs["fp32"][i]
        assert_within_reference_error(outs["fused"][i], outs["ref"][i], truth, factor=2.0,
                                      atol=1e-3 * truth.abs().max().item(), name=what)

    cot = [torch.randn_like(outs["fp32"][0]), torch.randn_like(outs["fp32"][1]) if need_regs else None]
    names = ["x", "registers"] + [n for n, _ in attn.named_parameters()]
    g_f = grads_of(outs["fused"], cot, [x, registers, *attn.parameters()])
    g_r = grads_of(outs["ref"], cot, [x, registers, *attn.parameters()])
    g_t = grads_of(outs["fp32"], cot, [x32, registers32, *attn32.parameters()])
    for name, a, b, t in zip(names, g_f, g_r, g_t):
        assert_l2_within_reference_error(a, b, t, factor=2.0, name=f"grad {name}")


@pytest.mark.parametrize("case", [("block", 1, 2, 1, 5, 4, 16, 2), ("block", 1, 1, 1, 11, 8, 16, 1)],
                         ids=["one-tile", "key-loop"])
def test_large_logits_stay_finite_and_match(case):
    """to_qkv scaled by 10 makes q.k 100x larger (the LayerNorm in front would undo scaling the
    input); the input is scaled by 100 as well, for the residual. The key-loop case (n = 129)
    checks the online softmax's rescaling with near-one-hot rows."""
    pattern, batch, nx, ny, window, r, dim_head, heads = case
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r)
    with torch.no_grad():
        attn.to_qkv.weight.mul_(10.0)
    x = (100 * make_inputs(batch, nx, ny, window, dim, pattern)).requires_grad_()
    registers = (100 * make_registers(batch, r, dim, per_image=False)).requires_grad_()
    out_f, regs_f = run(x, registers, attn, pattern, True, True)
    out_r, regs_r = run(x, registers, attn, pattern, False, True)
    assert torch.isfinite(out_f).all() and torch.isfinite(regs_f).all()
    assert_close_normwise(out_f, out_r, 1e-5, name="tokens")
    assert_close_normwise(regs_f, regs_r, 1e-5, name="register rows")
    cot = [torch.randn_like(out_r), torch.randn_like(regs_r)]
    g_f = grads_of([out_f, regs_f], cot, [x, attn.to_qkv.weight, attn.rel_pos_bias.weight])
    g_r = grads_of([out_r, regs_r], cot, [x, attn.to_qkv.weight, attn.rel_pos_bias.weight])
    for name, a, b in zip(["x", "to_qkv", "bias table"], g_f, g_r):
        # near-one-hot softmax: the gradients are differences of nearly equal terms, 1e-4
        assert_close_l2(a, b, 1e-4, name=f"grad {name}")


def test_key_loop_ops_pass_opcheck():
    """torch.library.opcheck (schema, fake tensors, autograd registration with the saved outputs,
    AOT dispatch) of the attention-core ops on a long sequence (w = 11, r = 8: n = 129), with
    register queries and dropout, and of the backward op with the forward's outputs. fp16: the
    fp16 tiles are the cheaper ones under the interpreter."""
    window, r, heads, dim_head = 11, 8, 1, 16
    C = heads * dim_head
    attn = Attention(C, dim_head=dim_head, window_size=window, num_registers=r)
    f16 = dict(device=DEVICE, dtype=torch.float16)
    qkv = torch.randn(1, window, window, 3 * C, **f16).requires_grad_()
    reg_qkv = torch.randn(1, r, 3 * C, **f16).requires_grad_()
    table = torch.randn(attn.rel_pos_bias.weight.shape, **f16).requires_grad_()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=DEVICE)
    config = (window, r, heads, dim_head, False, True, dim_head**-0.5, 0.3, seed)
    torch.library.opcheck(wa_op.window_attention_core_op, (qkv, reg_qkv, table, *config))
    with torch.no_grad():
        out, reg_out, lse = wa_op.window_attention_core_op(qkv, reg_qkv, table, *config)
    d_out, d_reg_out = torch.randn_like(out), torch.randn_like(reg_out)
    torch.library.opcheck(wa_op.window_attention_core_backward_op, (
        qkv.detach(), reg_qkv.detach(), table.detach(), lse, d_out, d_reg_out, *config, out, reg_out))
    with pytest.raises(ValueError, match="forward's output"):
        wa_op.window_attention_core_backward_op(
            qkv.detach(), reg_qkv.detach(), table.detach(), lse, d_out, d_reg_out, *config)


def test_preallocated_poisoned_outputs_are_fully_written():
    batch, nx, ny, window, r, dim_head, heads = 3, 1, 2, 3, 4, 16, 2
    dim = dim_head * heads
    qkv = torch.randn(batch, nx * window, ny * window, 3 * dim, device=DEVICE)
    reg_qkv = torch.randn(1, r, 3 * dim, device=DEVICE)
    table = torch.randn((2 * window - 1) ** 2 + 1, heads, device=DEVICE)
    out = poison_(torch.empty(batch, nx * window, ny * window, dim, device=DEVICE))
    reg_out = poison_(torch.empty(batch, nx, ny, r, dim, device=DEVICE))
    lse = poison_(torch.empty(batch * nx * ny, heads, r + window * window, device=DEVICE))
    K.window_attention_forward(qkv, reg_qkv, table, window=window, num_registers=r, heads=heads, head_dim=dim_head,
                               grid_pattern=False, register_queries=True, scale=dim_head**-0.5,
                               out=out, reg_out=reg_out, lse=lse)
    for name, t in (("out", out), ("reg_out", reg_out), ("lse", lse)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) entries"


# ---------------------------------------------------------------------------------------------
# the steps around the attention core: LayerNorm + qkv projection, output projection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_eval_step_is_four_or_three_launches_and_matches(pattern):
    """Eval mode without autograd: one LayerNorm + qkv launch for tokens and registers, the
    attention kernel, addmm (tokens) and, in the block step, one baddbmm for the register rows of
    every window (no per-window copy of the shared rows: no clone). fp32 at 1e-5."""
    batch, nx, ny, window, r, dim_head, heads = 3, 2, 2, 3, 4, 16, 2
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r).eval()
    # a channels-last map, as in the model (the token residual's rows are then a view; from an
    # NCHW-stored map addmm's input would first be copied)
    x = make_inputs(batch, nx, ny, window, dim, pattern).contiguous()
    registers = make_registers(batch, r, dim, per_image=pattern == "grid")
    need_regs = pattern == "block"
    with torch.no_grad():
        with TrafficCounter() as counter:
            out_f, regs_f = run(x, registers, attn, pattern, True, need_regs)
        out_r, regs_r = run(x, registers, attn, pattern, False, need_regs)
    # (aten::full: this file's NaN poisoning of the kernels' outputs, not part of the step)
    ops = [o for o in counter.report().ops if o.launches and o.op != "aten::full"]
    expected = ["aten::addmm", "triton:layernorm_linear_kernel", "triton:window_attention_fwd_kernel"]
    assert sorted(o.op for o in ops) == sorted(expected + (["aten::baddbmm"] if need_regs else []))
    assert all(o.launches == 1 for o in ops)
    assert_close_normwise(out_f, out_r, 1e-5, name="tokens")
    if need_regs:
        assert_close_normwise(regs_f, regs_r, 1e-5, name="register rows")


@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_backward_sums_the_residual_gradient_in_the_layernorm_kernel(pattern):
    """Training: x's residual gradient reaches the LayerNorm + qkv op's backward through its
    carrier output and is added inside the LayerNorm backward kernel: the backward writes no
    x-sized sum (autograd's add of x's two gradients), and x's gradient is the reference's."""
    batch, nx, ny, window, r, dim_head, heads = 2, 2, 2, 3, 4, 16, 2
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r, dropout=0.0).train()
    x = make_inputs(batch, nx, ny, window, dim, pattern).contiguous().requires_grad_()
    registers = make_registers(batch, r, dim, per_image=pattern == "grid").requires_grad_()
    need_regs = pattern == "block"
    out_f, regs_f = run(x, registers, attn, pattern, True, need_regs)
    out_r, regs_r = run(x, registers, attn, pattern, False, need_regs)
    cot = [torch.randn_like(out_r), torch.randn_like(regs_r) if need_regs else None]
    loss = sum((o * c).sum() for o, c in zip((out_f, regs_f), cot) if o is not None)
    with TrafficCounter() as counter:
        (gx_f,) = torch.autograd.grad(loss, [x])
    x_bytes = x.numel() * x.element_size()
    sums = [o for o in counter.report().ops if o.op.split(".")[0] in ("aten::add", "aten::add_") and o.bytes >= x_bytes]
    assert not sums, sums
    assert any(o.op == "triton:layernorm_backward_kernel" for o in counter.report().ops)
    (gx_r,) = torch.autograd.grad(sum((o * c).sum() for o, c in zip((out_r, regs_r), cot) if o is not None), [x])
    assert_close_l2(gx_f, gx_r, 1e-5, name="grad x")


def test_eval_per_image_registers_with_register_outputs():
    """(B, r, C) register rows with register outputs (not a model configuration): the register
    projection takes the addmm over an expanded residual; fp32 at 1e-5."""
    batch, nx, ny, window, r, dim_head, heads = 3, 2, 1, 3, 2, 16, 2
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r).eval()
    x = make_inputs(batch, nx, ny, window, dim, "grid")
    registers = make_registers(batch, r, dim, per_image=True)
    with torch.no_grad():
        out_f, regs_f = run(x, registers, attn, "grid", True, True)
        out_r, regs_r = run(x, registers, attn, "grid", False, True)
    assert_close_normwise(out_f, out_r, 1e-5, name="tokens")
    assert_close_normwise(regs_f, regs_r, 1e-5, name="register rows")


@pytest.mark.parametrize("case", [FP32_CASES[0], FP32_CASES[1]], ids=lambda c: "-".join(map(str, c)))
def test_layernorm_cublas_path_where_the_projection_kernel_does_not_apply(monkeypatch, case):
    """Where kernels/layernorm_linear.py cannot run, LayerNorm + cuBLAS per row set (no launch of
    that kernel); forward and gradients still meet fp32 1e-5."""
    monkeypatch.setattr(wa_op, "layernorm_linear_unsupported", lambda x, extra: "test: projection kernel off")
    pattern, batch, nx, ny, window, r, dim_head, heads, need_regs = case
    dim = dim_head * heads
    attn = make_attention(dim, dim_head, window, r)
    x = make_inputs(batch, nx, ny, window, dim, pattern).requires_grad_()
    registers = make_registers(batch, r, dim, per_image=pattern == "grid").requires_grad_()
    with triton_launches() as tally:
        out_f, regs_f = run(x, registers, attn, pattern, True, need_regs)
    assert "layernorm_linear_kernel" not in tally.counts and tally.counts["window_attention_fwd_kernel"] == 1
    out_r, regs_r = run(x, registers, attn, pattern, False, need_regs)
    assert_close_normwise(out_f, out_r, 1e-5, name="tokens")
    assert_gradients_match([out_f, regs_f], [out_r, regs_r if need_regs else None], x, registers, attn)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

DROP_CFG = dict(batch=2, nx=2, ny=1, window=3, r=1, dim_head=16, heads=2)  # n = 10 <= dim_head
# n = 148: the key-loop kernels (fp16 tiles: key tiles start at 0, 32, ..., 128); 3 launches of 64 keys
LONG_DROP_CFG = dict(batch=1, nx=2, ny=1, window=12, r=4, dim_head=64, heads=2)


def philox_keep_mask(seed, p, num_windows, heads, n):
    """The documented keep mask (windows, heads, n, n), computed here with Philox4x32-10 in numpy:
    element (i, j) of window `win`, head `h` is kept when 16 bits of Philox(key = seed, counter =
    (i * ceil(n/8) + j // 8, win * heads + h (low, high 32 bits), 0)) are >= round(p * 2^16);
    output word [0, 2, 1, 3][(j % 8) // 2] (tl.join order), half j % 2 (low half first)."""
    import numpy as np

    mask32 = np.uint64(0xFFFFFFFF)
    threshold = K.dropout_threshold(p)[0]
    calls = (n + 7) // 8
    counter = (np.arange(n)[:, None] * calls + np.arange(calls)[None, :]).astype(np.uint64)  # (n, calls)
    stream = (np.arange(num_windows)[:, None] * heads + np.arange(heads)[None, :]).astype(np.uint64)
    shape = (num_windows, heads, n, calls)
    c0 = np.broadcast_to(counter, shape).copy()
    c1 = np.broadcast_to((stream & mask32)[:, :, None, None], shape).copy()
    c2 = np.broadcast_to((stream >> np.uint64(32))[:, :, None, None], shape).copy()
    c3 = np.zeros(shape, np.uint64)
    k0, k1 = np.uint64(seed) & mask32, (np.uint64(seed) >> np.uint64(32)) & mask32
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):  # products of two 32-bit values fit in uint64
        prod_b, prod_a = round_b * c2, round_a * c0
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & mask32,
                          (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & mask32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    words = np.stack([c0, c2, c1, c3], axis=-1)  # (..., calls, 4)
    halves = np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], axis=-1)  # (..., calls, 4, 2)
    bits = halves.reshape(num_windows, heads, n, calls * 8)[..., :n]
    return torch.from_numpy((bits >= threshold).copy())


def extract_keep_mask(seed, p, batch, nx, ny, window, r, dim_head, heads, dtype=torch.float32):
    """The kernel's keep mask (windows, heads, n, n) for this launch shape: with q = k = 0 and a
    zero bias every probability is 1/n, and v = one-hot of the key index within a block of
    dim_head keys (one launch per block), so output channel c of row i is
    keep[i, block start + c] * keep_scale / n."""
    n = r + window * window
    dim = dim_head * heads
    windows = batch * nx * ny
    _, keep_scale = K.dropout_threshold(p)
    table = torch.zeros((2 * window - 1) ** 2 + 1, heads, device=DEVICE, dtype=dtype)
    keep = torch.empty(windows, heads, n, n, device=DEVICE)
    for start in range(0, n, dim_head):
        keys = min(dim_head, n - start)
        one_hot = torch.zeros(n, dim_head, device=DEVICE, dtype=dtype)
        one_hot[start:start + keys] = torch.eye(keys, dim_head, device=DEVICE, dtype=dtype)
        qkv = torch.zeros(batch, nx * window, ny * window, 3 * dim, device=DEVICE, dtype=dtype)
        reg_qkv = torch.zeros(1, r, 3 * dim, device=DEVICE, dtype=dtype)
        for h in range(heads):
            reg_qkv[0, :, 2 * dim + h * dim_head: 2 * dim + (h + 1) * dim_head] = one_hot[:r]
            tok = one_hot[r:].view(window, window, dim_head)
            v = qkv[..., 2 * dim + h * dim_head: 2 * dim + (h + 1) * dim_head]
            for X in range(nx):
                for Y in range(ny):
                    v[:, X * window:(X + 1) * window, Y * window:(Y + 1) * window] = tok
        out, reg_out, _ = K.window_attention_forward(
            qkv, reg_qkv, table, window=window, num_registers=r, heads=heads, head_dim=dim_head, grid_pattern=False,
            register_queries=True, scale=1.0, dropout_p=p, seed=seed)
        tokens = wa_op.window_partition(out, window, "block")  # (B, nX, nY, w*w, C)
        rows = torch.cat([reg_out, tokens], dim=3).reshape(windows, n, heads, dim_head)
        keep[..., start:start + keys] = rows.permute(0, 2, 1, 3)[..., :keys].float() * n / keep_scale
    # fp32: exact up to rounding; fp16: the kept value is rounded to 11 bits
    atol = 1e-4 if dtype == torch.float32 else 4e-3
    assert torch.allclose(keep, keep.round(), atol=atol), "extracted mask is not 0/1"
    return keep.round()


@pytest.mark.parametrize("cfg,dtype", [(DROP_CFG, torch.float32), (LONG_DROP_CFG, torch.float16)],
                         ids=["one-tile", "key-loop"])
def test_dropout_keep_mask_is_the_counter_formula(cfg, dtype):
    """The mask the kernel applies is the documented function of (seed, window, head, i, j), the
    same for one key tile and for a loop over key tiles (the tile's key offset is part of the
    counter)."""
    p, seed = 0.25, int(torch.randint(0, 2**31 - 1, ()).item())
    keep = extract_keep_mask(seed, p, **cfg, dtype=dtype)
    n = cfg["r"] + cfg["window"] ** 2
    expected = philox_keep_mask(seed, p, cfg["batch"] * cfg["nx"] * cfg["ny"], cfg["heads"], n)
    mismatches = (keep.bool().cpu() != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {expected.numel()} mask entries differ from the counter formula (seed {seed})"


def test_dropout_keep_rate_and_mask_variety():
    p = 0.25
    keep = extract_keep_mask(1234, p, **DROP_CFG)
    count, kept = keep.numel(), keep.sum().item()
    mean, sd = count * (1 - p), (count * p * (1 - p)) ** 0.5
    assert abs(kept - mean) <= 5 * sd, f"kept {kept} of {count}, expected {mean:.0f} +- {5 * sd:.0f}"
    flat = keep.flatten(0, 1)  # every (window, head) draws its own mask
    assert len({tuple(m.flatten().tolist()) for m in flat}) == flat.shape[0]
    assert not torch.equal(keep, extract_keep_mask(4321, p, **DROP_CFG))


def masked_reference(x, registers, attn, pattern, keep, keep_scale):
    """The reference attention + residual with the attention dropout replaced by a given mask
    (windows, heads, n, n) and scale; no output dropout."""
    w, r = attn.window_size, attn.num_registers
    b, _, _, c = x.shape
    tokens = wa_op.window_partition(x, w, pattern)
    nx, ny = tokens.shape[1:3]
    regs = registers.expand(b, nx, ny, r, c) if registers.ndim == 2 else registers[:, None, None].expand(b, nx, ny, r, c)
    seq = torch.cat([regs, tokens], dim=3).reshape(b * nx * ny, r + w * w, c)
    h, d = attn.heads, attn.dim_head
    q, k, v = attn.to_qkv(attn.norm(seq)).chunk(3, dim=-1)
    q, k, v = (t.reshape(seq.shape[0], -1, h, d).transpose(1, 2) for t in (q, k, v))
    sim = (q * attn.scale) @ k.transpose(-1, -2) + attn.rel_pos_bias(attn.rel_pos_indices).permute(2, 0, 1)
    probs = sim.softmax(dim=-1) * keep * keep_scale
    o = (probs @ v).transpose(1, 2).reshape(seq.shape[0], -1, h * d)
    seq = attn.to_out[0](o) + seq
    seq = seq.reshape(b, nx, ny, r + w * w, c)
    return wa_op.window_unpartition(seq[:, :, :, r:], w, pattern), seq[:, :, :, :r]


# fp32 key-loop kernels (32 x 16 tiles) with dropout: w = 12, 4 windows, one head
LONG_DROP_GRAD_CFG = dict(batch=1, nx=2, ny=2, window=12, r=4, dim_head=16, heads=1)


@pytest.mark.parametrize("cfg", [DROP_CFG, LONG_DROP_GRAD_CFG], ids=["one-tile", "key-loop"])
@pytest.mark.parametrize("pattern", ["block", "grid"])
def test_dropout_gradients_use_the_same_mask(monkeypatch, pattern, cfg):
    """Forward and gradients equal the reference with the counter-formula mask (which
    test_dropout_keep_mask_is_the_counter_formula checks against the kernels' own) at fp32 1e-5."""
    p, seed = 0.3, int(torch.randint(0, 2**31 - 1, ()).item())
    monkeypatch.setattr(wa_op, "_draw_seed", lambda device: seed)
    dim = cfg["dim_head"] * cfg["heads"]
    attn = make_attention(dim, cfg["dim_head"], cfg["window"], cfg["r"], dropout=p).train()
    attn.to_out[1].p = 0.0  # output dropout is torch's own; this test is about the in-kernel one
    x = make_inputs(cfg["batch"], cfg["nx"], cfg["ny"], cfg["window"], dim, pattern).requires_grad_()
    registers = make_registers(cfg["batch"], cfg["r"], dim, per_image=pattern == "grid").requires_grad_()
    n = cfg["r"] + cfg["window"] ** 2
    keep = philox_keep_mask(seed, p, cfg["batch"] * cfg["nx"] * cfg["ny"], cfg["heads"], n).to(DEVICE).float()
    keep_scale = K.dropout_threshold(p)[1]

    need_regs = pattern == "block"
    out_f, regs_f = run(x, registers, attn, pattern, True, need_regs)
    out_m, regs_m = masked_reference(x, registers, attn, pattern, keep, keep_scale)
    assert_close_normwise(out_f, out_m, 1e-5, name="tokens")
    if need_regs:
        assert_close_normwise(regs_f, regs_m, 1e-5, name="register rows")
    assert_gradients_match([out_f, regs_f], [out_m, regs_m if need_regs else None], x, registers, attn)

    if cfg is not DROP_CFG:
        return
    # same seed, same output; a fresh seed, a different one
    again, _ = run(x, registers, attn, pattern, True, need_regs)
    assert torch.equal(again, out_f)
    monkeypatch.setattr(wa_op, "_draw_seed", lambda device: seed + 1)
    other, _ = run(x, registers, attn, pattern, True, need_regs)
    assert not torch.equal(other, out_f)


def test_dropout_seed_comes_from_torch_generator():
    cfg = DROP_CFG
    dim = cfg["dim_head"] * cfg["heads"]
    attn = make_attention(dim, cfg["dim_head"], cfg["window"], cfg["r"], dropout=0.2).train()
    x = make_inputs(cfg["batch"], cfg["nx"], cfg["ny"], cfg["window"], dim, "block")
    registers = make_registers(cfg["batch"], cfg["r"], dim, per_image=False)
    with torch.no_grad():
        torch.manual_seed(7)
        a, _ = run(x, registers, attn, "block", True, True)
        torch.manual_seed(7)
        b, _ = run(x, registers, attn, "block", True, True)
        c, _ = run(x, registers, attn, "block", True, True)
        attn.eval()
        e1, _ = run(x, registers, attn, "block", True, True)
        e2, _ = run(x, registers, attn, "block", False, True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_close_normwise(e1, e2, 1e-5, name="eval mode: no dropout")


def test_output_dropout_in_training_only():
    """to_out's dropout (torch's, after the projection): in training each projected entry is
    either dropped or scaled by 1 / (1 - p); the attention dropout is off here, so the eval-mode
    projection is the reference for the kept entries."""
    cfg, p = DROP_CFG, 0.5
    dim = cfg["dim_head"] * cfg["heads"]
    attn = make_attention(dim, cfg["dim_head"], cfg["window"], cfg["r"], dropout=0.0)
    attn.to_out[1].p = p
    x = make_inputs(cfg["batch"], cfg["nx"], cfg["ny"], cfg["window"], dim, "block")
    registers = make_registers(cfg["batch"], cfg["r"], dim, per_image=False)
    with torch.no_grad():
        attn.eval()
        out_e, regs_e = run(x, registers, attn, "block", True, True)
        attn.train()
        out_t, regs_t = run(x, registers, attn, "block", True, True)
    for name, train, evald, residual in (("tokens", out_t, out_e, x), ("register rows", regs_t, regs_e, registers)):
        proj_t, proj_e = (train - residual).flatten(), (evald - residual).flatten()
        dropped = proj_t.abs() <= 1e-6 * proj_e.abs().max()
        count, n_dropped = proj_t.numel(), dropped.sum().item()
        sd = (count * p * (1 - p)) ** 0.5
        assert abs(n_dropped - count * p) <= 5 * sd, f"{name}: dropped {n_dropped} of {count}"
        assert_close_normwise(proj_t[~dropped], proj_e[~dropped] / (1 - p), 1e-5, name=f"{name}: kept entries")


# ---------------------------------------------------------------------------------------------
# whole model, fallbacks, errors
# ---------------------------------------------------------------------------------------------


def test_model_fused_matches_reference():
    torch.manual_seed(torch.seed() % 2**31)
    kwargs = dict(num_classes=5, dim=32, depth=(1, 1), dim_head=16, window_size=4, num_register_tokens=4)
    ref = MaxViT(dropout=0.0, **kwargs).to(DEVICE)
    fused = MaxViT(dropout=0.0, fused=True, **kwargs).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():  # BatchNorm statistics that eval mode actually uses
        for (name, buf), (_, buf2) in zip(ref.named_buffers(), fused.named_buffers()):
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5), buf2.copy_(buf)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FusedFallbackWarning)  # MBConv / feed-forward still reference
        ref.eval(), fused.eval()
        with torch.no_grad():
            assert_close_normwise(fused(x), ref(x), 1e-5, name="eval logits")
        ref.train(), fused.train()
        target = torch.randn(2, 5, device=DEVICE)
        (ref(x) * target).sum().backward()
        (fused(x) * target).sum().backward()
    grads = dict(ref.named_parameters())
    # fp32 at 1e-4 with a floor of 1e-2 x the largest gradient norm, as tests/test_parity.py: conv
    # biases in front of a train-mode BatchNorm have gradient 0 in exact arithmetic (noise vs noise)
    floor = 1e-2 * max(p.grad.norm().item() for p in grads.values())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        assert_close_l2(p.grad, grads[name].grad, 1e-4, name=f"grad {name}", floor=floor)


def test_model_with_window_12_runs_fused_and_matches_reference():
    """MaxViT at window 12 (n = 148, the key-loop kernels in both steps): the fused eval forward
    runs without any fallback and matches the reference at fp32 1e-5."""
    kwargs = dict(num_classes=5, dim=32, depth=(1,), dim_head=16, window_size=12, num_register_tokens=4)
    ref = randomize_batchnorm_buffers_(MaxViT(dropout=0.0, **kwargs).to(DEVICE)).eval()
    fused = MaxViT(dropout=0.0, fused=True, **kwargs).to(DEVICE).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 48, 48, device=DEVICE)  # 12 x 12 map after the stem and the first MBConv
    reset_fallback_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedFallbackWarning)
        with torch.no_grad(), triton_launches() as tally:
            out = fused(x)
    assert tally.counts["window_attention_long_fwd_kernel"] == 2  # block and grid step
    with torch.no_grad():
        assert_close_normwise(out, ref(x), 1e-5, name="eval logits")


@pytest.mark.parametrize(
    "window,r,dim_head,dtype,match",
    [(33, 4, 16, torch.float32, f"r \\+ w\\*w <= {K.MAX_LONG_SEQ}"), (3, 1, 8, torch.float32, "dim_head"),
     (3, 1, 16, torch.float64, "fp16/bf16/fp32")],
)
def test_unsupported_configurations_fall_back_with_a_warning(window, r, dim_head, dtype, match):
    reset_fallback_warnings()
    attn = make_attention(2 * dim_head, dim_head, window, r, dtype=dtype)
    x = make_inputs(1, 1, 1, window, 2 * dim_head, "block", dtype=dtype)
    registers = make_registers(1, r, 2 * dim_head, per_image=False, dtype=dtype)
    with pytest.warns(FusedFallbackWarning, match=match):
        out, regs = window_attention_residual(x, registers, attn, "block", fused=True)
    ref_out, ref_regs = _reference(x, registers, attn, "block")
    assert torch.equal(out, ref_out) and torch.equal(regs, ref_regs)


def test_bad_arguments_raise_clear_errors():
    attn = make_attention(32, 16, 3, 2)
    x = make_inputs(1, 2, 2, 3, 32, "block")
    regs = make_registers(1, 2, 32, per_image=False)
    with pytest.raises(ValueError, match="pattern"):
        window_attention_residual(x, regs, attn, "diagonal", fused=True)
    with pytest.raises(ValueError, match="divide"):
        window_attention_residual(x[:, :5], regs, attn, "block", fused=True)
    with pytest.raises(ValueError, match="registers"):
        window_attention_residual(x, regs[:1], attn, "block", fused=True)
    with pytest.raises(ValueError, match="channels"):
        window_attention_residual(x[..., :16], regs, attn, "block", fused=True)


# ---------------------------------------------------------------------------------------------
# the bias-table gradient reduction
# ---------------------------------------------------------------------------------------------

TABLE_CASES = [  # window, registers, register queries, slots, heads, table dtype
    (7, 4, True, 3, 2, torch.bfloat16), (7, 4, False, 1, 2, torch.float16), (7, 4, True, 2, 1, torch.float32),
    (3, 1, True, 2, 1, torch.float16), (5, 2, False, 4, 2, torch.float32), (12, 4, True, 2, 1, torch.bfloat16),
]


@pytest.mark.parametrize("window,r,register_queries,slots,heads,dtype", TABLE_CASES,
                         ids=[f"w{c[0]}-r{c[1]}-{'q' if c[2] else 'noq'}-s{c[3]}-h{c[4]}-{str(c[5])[6:]}"
                              for c in TABLE_CASES])
def test_bias_table_gradient_kernel(window, r, register_queries, slots, heads, dtype):
    """The kernel's inverse of the forward's index formula against a float64 scatter-add through
    the module's own (n, n) index map, from random partial sums (slots, heads, n - q0, n); the
    register query rows are absent without register queries (q0 = r). fp32: 1e-6 relative (fp32
    sums of fp32 values); fp16/bf16: one rounding of the fp32 sum, half an ulp (+ 1e-6 relative).
    Deterministic: two launches give bitwise the same table."""
    attn = Attention(heads * 16, dim_head=16, window_size=window, num_registers=r)
    n = r + window * window
    q0 = 0 if register_queries else r
    dbias = torch.randn(slots, heads, n - q0, n, device=DEVICE)
    table_size = attn.rel_pos_bias.weight.shape[0]
    index = attn.rel_pos_indices[q0:].reshape(-1).to(DEVICE)
    expected = torch.zeros(table_size, heads, dtype=torch.float64, device=DEVICE)
    expected.index_add_(0, index, dbias.double().sum(0).reshape(heads, -1).t())
    out = poison_(torch.empty(table_size, heads, dtype=dtype, device=DEVICE))
    got = K.bias_table_gradient(dbias, window=window, num_registers=r, q_start=q0, table_size=table_size,
                                dtype=dtype, out=out)
    assert got is out
    again = K.bias_table_gradient(dbias, window=window, num_registers=r, q_start=q0, table_size=table_size,
                                  dtype=dtype)
    assert torch.equal(again, got)
    err = (got.double() - expected).abs()
    bound = 1e-6 * expected.abs().max() + 1e-6 * expected.abs()
    if dtype != torch.float32:
        bound = bound + 0.5 * torch.finfo(dtype).eps * expected.abs()
    assert (err <= bound).all(), f"table gradient: error {(err - bound).max():.3e} above the bound"


def test_bias_table_gradient_rejects_bad_arguments():
    dbias = torch.zeros(2, 1, 53, 53, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        K.bias_table_gradient(dbias, window=6, num_registers=4, q_start=0, table_size=170, dtype=torch.float32)
    with pytest.raises(ValueError, match="170 entries"):
        K.bias_table_gradient(dbias, window=7, num_registers=4, q_start=0, table_size=169, dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        K.bias_table_gradient(dbias.half(), window=7, num_registers=4, q_start=0, table_size=170,
                              dtype=torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        K.bias_table_gradient(dbias, window=7, num_registers=4, q_start=0, table_size=170, dtype=torch.float32,
                              out=torch.empty(170, 1, dtype=torch.float16, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile of the default model's kernels and of the key-loop kernels
# ---------------------------------------------------------------------------------------------

_FP32_POINTERS = {"lse_ptr", "dreg_ptr", "dbias_ptr", "delta_ptr"}
_FLOAT_ARGS = {"qk_scale_log2", "sm_scale", "keep_scale"}


def kernel_signature(kernel, elem, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_POINTERS else f"*{elem}"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def default_model_kernel_configs():
    """Every kernel the default model (window 7, 4 registers, dim_head 32, dropout 0.1) launches
    in fp16 and bf16: forward without dropout (eval) and with it (training), backward with it;
    block step (register queries) and grid step (none)."""
    configs = []
    for elem in ("fp16", "bf16"):
        for step, register_queries in (("block", True), ("grid", False)):
            cfg = K.tile_config(7, 4, register_queries, torch.float16)
            for which, dropout in (("fwd", False), ("fwd", True), ("bwd", True)):
                constexprs = dict(WINDOW=7, NUM_REG=4, HEAD_DIM=32, Q_START=cfg["q_start"], BLOCK_M=cfg["BLOCK_M"],
                                  BLOCK_N=cfg["BLOCK_N"], GRID_PATTERN=step == "grid", DROPOUT=dropout, ALIGN=16,
                                  UPCAST_DOT=False, DOT_PRECISION="tf32")
                configs.append((f"{which}-{step}-{elem}-{'dropout' if dropout else 'eval'}", which, elem, constexprs,
                                cfg["num_warps"], cfg[f"{which}_stages"]))
    return configs


# Integer arguments that are multiples of 16 at the default model's launches (channel counts and
# strides of channels-last maps with C = 64 * 2^i); Triton's runtime gives them the same hint.
_DIVISIBLE_BY_16 = {
    "stride_qkv_b", "stride_qkv_h", "stride_qkv_w", "stride_reg_r", "reg_q_off", "reg_k_off", "reg_v_off",
    "stride_out_b", "stride_out_h", "stride_out_w", "stride_reg_out_win", "stride_reg_out_r",
    "stride_dout_b", "stride_dout_h", "stride_dout_w", "stride_dreg_out_win", "stride_dreg_out_r",
    "stride_dq_b", "stride_dq_h", "stride_dq_w", "stride_dkv_tile", "stride_dkv_b", "stride_dkv_h", "stride_dkv_w",
    "dk_off", "dv_off", "stride_dreg_tile", "stride_dreg_win", "stride_dreg_r", "C",
}


_LONG_KERNELS = {"fwd": "long_fwd", "dq": "long_bwd_dq", "dkv": "long_bwd_dkv"}


def long_sequence_kernel_configs():
    """The key-loop kernels for windows 12 and 16 (n = 148, 260), 4 registers, dim_head 32, block
    step (register queries) and grid step: forward without and with dropout, the two backward
    kernels with dropout. fp16 and bf16 at window 12, fp16 at window 16 (bf16 there is in the
    survey in the kernel header, within a few registers of fp16), fp32 (its own tiles) at window 12."""
    configs = []
    for window, elem in ((12, "fp16"), (12, "bf16"), (16, "fp16"), (12, "fp32")):
        for step, register_queries in (("block", True), ("grid", False)):
            dtype = torch.float32 if elem == "fp32" else torch.float16
            cfg = K.tile_config(window, 4, register_queries, dtype)
            assert cfg["long"]
            for which, dropout in (("fwd", False), ("fwd", True), ("dq", True), ("dkv", True)):
                constexprs = dict(WINDOW=window, NUM_REG=4, HEAD_DIM=32, Q_START=cfg["q_start"], BLOCK_M=cfg["BLOCK_M"],
                                  BLOCK_N=cfg["BLOCK_N"], GRID_PATTERN=step == "grid", DROPOUT=dropout, ALIGN=16,
                                  UPCAST_DOT=False, DOT_PRECISION="ieee" if elem == "fp32" else "tf32")
                stages = cfg["fwd_stages" if which == "fwd" else "bwd_stages"]
                configs.append((f"w{window}-{which}-{step}-{elem}-{'dropout' if dropout else 'eval'}", _LONG_KERNELS[which],
                                elem, constexprs, cfg["num_warps"], stages))
    return configs


def compile_report(arch, configs):
    from maxvit_fast.aot import compile_kernels

    requests = []
    for name, which, elem, constexprs, warps, stages in configs:
        kernel = getattr(K, f"window_attention_{which}_kernel")
        requests.append(dict(
            module="maxvit_fast.kernels.window_attention", kernel=f"window_attention_{which}_kernel",
            signature=kernel_signature(kernel, elem, constexprs), constexprs=constexprs, arch=arch,
            num_warps=warps, num_stages=stages, divisible=sorted(_DIVISIBLE_BY_16 & set(kernel.arg_names))))
    return [(c[0], c[2], k) for c, k in zip(configs, compile_kernels(requests, shards=2))]


@pytest.mark.parametrize("configs", ["default-model", "long-sequences"])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills_on_tensor_cores(arch, configs):
    configs = default_model_kernel_configs() if configs == "default-model" else long_sequence_kernel_configs()
    problems = []
    for name, elem, k in compile_report(arch, configs):
        print(f"sm_{arch} {name}: {k.registers} registers, stack {k.stack}, local {k.local}, shared {k.shared}")
        if k.local != 0 or k.stack != 0 or k.uses("LDL") or k.uses("STL"):
            problems.append(f"{name}: spills (local {k.local}, stack {k.stack})")
        mma = k.uses("HMMA") if arch == 80 else (k.uses("HGMMA") or k.uses("HMMA"))
        if not mma and elem != "fp32":  # fp32 dots are FMA (input_precision="ieee")
            problems.append(f"{name}: no tensor-core instruction")
    assert not problems, "\n".join(problems)


def test_bias_table_gradient_kernel_compiles_without_spills():
    """The table-gradient reduction at the default model's launches (window 7, 4 registers,
    block step with register queries and grid step without; table fp16/bf16/fp32), sm_80 and
    sm_90."""
    from maxvit_fast.aot import compile_kernels

    requests = []
    for arch in (80, 90):
        for elem in ("fp16", "bf16", "fp32"):
            for q_start in (0, 4):
                constexprs = dict(WINDOW=7, NUM_REG=4, Q_START=q_start, BLOCK_T=64, BLOCK_Q=32, BLOCK_R=4, BLOCK_K=64,
                                  EMULATE_BF16_RTNE=False)
                signature = dict(dbias_ptr="*fp32", stride_slot="i32", stride_head="i32", stride_q="i32", slots="i32",
                                 out_ptr=f"*{elem}", stride_out_t="i32", stride_out_h="i32")
                signature.update({name: "constexpr" for name in constexprs})
                requests.append(dict(module="maxvit_fast.kernels.window_attention", kernel="bias_table_gradient_kernel",
                                     signature=signature, constexprs=constexprs, arch=arch, num_warps=4, num_stages=3))
    problems = []
    for req, k in zip(requests, compile_kernels(requests)):
        print(f"sm_{req['arch']} bias_table_gradient {req['signature']['out_ptr']} Q_START={req['constexprs']['Q_START']}: "
              f"{k.registers} registers, stack {k.stack}, local {k.local}")
        if k.local != 0 or k.stack != 0:
            problems.append(f"sm_{req['arch']} {req['signature']['out_ptr']}: spills (local {k.local}, stack {k.stack})")
    assert not problems, "\n".join(problems)
