"""kernels/layernorm_backward.py (LayerNorm backward with the LayerNorm recomputed) against float64
autograd through F.layer_norm, on fresh random rows with per-row offsets and spreads.

Tolerances: the kernel computes in fp32 from the (exact) inputs and rounds dx and xn once.
- fp32: 1e-5 normwise (fp32 rounding of the statistics and of the C-long row sums).
- fp16/bf16 dx, xn: half an ulp of the largest value (the one rounding, to nearest even) +
  1e-5 of it (the fp32 arithmetic before it).
- dgamma, dbeta: fp32 sums of fp32 products of exact inputs, 1e-5 normwise in every dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maxvit_fast.kernels.layernorm_backward as K  # created now, in the session's interpreter mode
from maxvit_fast.aot import compile_kernels

from .helpers import assert_close_normwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHAPES = [(37, 48), (9, 96), (5, 200)]  # several tiles + a partial one; C not a power of two


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)


def rows(M, C, dtype):
    return (torch.randn(M, C, dtype=torch.float64) * (0.5 + torch.rand(M, 1, dtype=torch.float64) * 3)
            + 2 * torch.randn(M, 1, dtype=torch.float64)).to(dtype).to(DEVICE)


def reference(x, dxn, gamma, beta, eps, residual=None):
    """float64 autograd: (dx, xn, dgamma, dbeta)."""
    x64 = x.double().requires_grad_()
    g64 = None if gamma is None else gamma.double().requires_grad_()
    b64 = None if beta is None else beta.double().requires_grad_()
    xn = F.layer_norm(x64, (x.shape[1],), g64, b64, eps)
    leaves = [x64] + [t for t in (g64, b64) if t is not None]
    grads = torch.autograd.grad((xn * dxn.double()).sum(), leaves)
    dx = grads[0] + (0 if residual is None else residual.double())
    dgamma = grads[1] if gamma is not None else (dxn.double() * F.layer_norm(x.double(), (x.shape[1],), eps=eps)).sum(0)
    dbeta = grads[-1] if beta is not None else dxn.double().sum(0)
    return dx, xn.detach(), dgamma, dbeta


def check(got, ref, dtype, name):
    if dtype == torch.float32:
        assert_close_normwise(got, ref, 1e-5, name=name)
    else:
        scale = ref.abs().max().item()
        half_ulp = 0.5 * torch.finfo(dtype).eps * 2.0 ** torch.frexp(torch.tensor(scale))[1].item() / 2
        assert_close_normwise(got, ref, 1e-5, atol=half_ulp, name=name)


@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_autograd(shape, dtype):
    M, C = shape
    x, dxn = rows(M, C, dtype), torch.randn(M, C).to(dtype).to(DEVICE)
    gamma = (1 + 0.3 * torch.randn(C)).to(dtype).to(DEVICE)
    beta = (0.5 * torch.randn(C)).to(dtype).to(DEVICE)
    dx, xn, partials = K.layernorm_backward(x, dxn, gamma, beta, 1e-5)
    ref_dx, ref_xn, ref_dgamma, ref_dbeta = reference(x, dxn, gamma, beta, 1e-5)
    assert dx.dtype == xn.dtype == dtype and partials.shape == (K.layernorm_backward_tiles(M, C), 2, C)
    assert partials.shape[0] > 1 or M <= K.layernorm_backward_config(C)["BLOCK_M"]
    check(dx, ref_dx, dtype, "dx")
    check(xn, ref_xn, dtype, "xn")
    sums = partials.sum(0)
    assert_close_normwise(sums[0], ref_dgamma, 1e-5, name="dgamma")
    assert_close_normwise(sums[1], ref_dbeta, 1e-5, name="dbeta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_gradient_no_affine_and_a_shared_partial_buffer(dtype):
    """The residual's gradient added before the one rounding; no gamma/beta; two row sets writing
    disjoint slices of one partial buffer, summed once; xn not written when not asked for."""
    C = 40
    sets = [(rows(M, C, dtype), torch.randn(M, C).to(dtype).to(DEVICE), torch.randn(M, C).to(dtype).to(DEVICE))
            for M in (23, 6)]
    tiles = [K.layernorm_backward_tiles(x.shape[0], C) for x, _, _ in sets]
    partials = torch.full((sum(tiles), 2, C), float("nan"), device=DEVICE)
    ref_dgamma = ref_dbeta = 0
    start = 0
    for (x, dxn, res), t in zip(sets, tiles):
        dx, xn, part = K.layernorm_backward(x, dxn, None, None, 1e-6, residual_grad=res, write_xn=False,
                                            out_partials=partials[start:start + t])
        start += t
        assert xn is None and part.data_ptr() == partials[start - t:start].data_ptr()
        ref_dx, _, dg, db = reference(x, dxn, None, None, 1e-6, residual=res)
        check(dx, ref_dx, dtype, "dx")
        ref_dgamma, ref_dbeta = ref_dgamma + dg, ref_dbeta + db
    sums = partials.sum(0)
    assert_close_normwise(sums[0], ref_dgamma, 1e-5, name="dgamma")
    assert_close_normwise(sums[1], ref_dbeta, 1e-5, name="dbeta")


def test_constant_rows_stay_finite():
    """A row of equal values has variance 0: rstd = 1 / sqrt(eps), xhat = 0, no NaN."""
    x = torch.full((3, 32), 2.5, device=DEVICE)
    dxn = torch.randn(3, 32, device=DEVICE)
    dx, xn, partials = K.layernorm_backward(x, dxn, None, None, 1e-5)
    ref_dx, ref_xn, _, _ = reference(x, dxn, None, None, 1e-5)
    assert torch.isfinite(dx).all() and torch.isfinite(partials).all()
    assert_close_normwise(dx, ref_dx, 1e-5, name="dx")


def test_bad_arguments_raise_clear_errors():
    x, dxn = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        K.layernorm_backward(x.t(), dxn, None, None, 1e-5)
    with pytest.raises(ValueError, match="dxn must be"):
        K.layernorm_backward(x, dxn[:2], None, None, 1e-5)
    with pytest.raises(ValueError, match="gamma must be"):
        K.layernorm_backward(x, dxn, torch.ones(8, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="out_partials"):
        K.layernorm_backward(x, dxn, None, None, 1e-5, out_partials=torch.empty(1, 2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="at most"):
        K.layernorm_backward(torch.randn(1, K.MAX_CHANNELS + 1, device=DEVICE),
                             torch.randn(1, K.MAX_CHANNELS + 1, device=DEVICE), None, None, 1e-5)


def test_aot_compile_maxvit_t_configurations():
    """Every configuration the MaxViT-T backward launches (the attention's LayerNorm at 64-512
    without a residual; the wide feed-forwards' with the residual gradient: 512 in fp16/bf16,
    128-512 in fp32), sm_80 and sm_90: no spills."""
    requests = []
    for t in NAMES.values():
        sig = dict(x_ptr=f"*{t}", dxn_ptr=f"*{t}", res_ptr=f"*{t}", gamma_ptr=f"*{t}", beta_ptr=f"*{t}",
                   dx_ptr=f"*{t}", xn_ptr=f"*{t}", partial_ptr="*fp32", M="i32", C="i32", eps="fp32")
        for C in (64, 128, 256, 512):
            for residual in (False, True):
                if residual and C < (128 if t == "fp32" else 512):
                    continue  # feed-forwards this narrow take the one-pass backward kernel
                cfg = K.layernorm_backward_config(C)
                num_warps = cfg.pop("num_warps")
                requests += [dict(module="maxvit_fast.kernels.layernorm_backward", kernel="layernorm_backward_kernel",
                                  signature=sig, arch=arch, num_warps=num_warps, num_stages=1,
                                  constexprs=dict(HAS_GAMMA=True, HAS_BETA=True, HAS_RESIDUAL=residual, WRITE_XN=True,
                                                  EMULATE_BF16_RTNE=False, **cfg),
                                  divisible=["C"])
                             for arch in (80, 90)]
    failures, table = [], []
    for k in compile_kernels(requests):
        line = f"{k.summary()} {k.request['signature']['x_ptr']} {k.request['constexprs']}"
        table.append(line)
        if k.spills:
            failures.append(line)
    print("\n".join(table))
    assert not failures, "\n".join(failures)
