"""kernels/batchnorm_backward.py (train-mode BatchNorm [+ GELU [+ SE gate and mean]] backward,
and the same with frozen statistics: eval-mode BatchNorm with gradients) against float64 torch
autograd through F.batch_norm (+ F.gelu).

The three launchers are chained as the op layer chains them: sums -> coefficients -> apply.
Inputs are fresh random tensors in the tested dtype; the reference runs in float64 on the same
(rounded) inputs, with the batch statistics computed in float64 and handed to the kernels as
fp32 (as batchnorm_statistics would produce them).

Tolerances
- fp32 (dy, dgamma, dbeta, dL/dgate): 1e-5 relative, normwise. The kernels compute in fp32;
  only the summation order and fp32 rounding of the statistics differ from float64 (~1e-7).
- fp16/bf16 dy: the kernels compute dy in fp32 (observed error ~3e-7 x max|dy|) and round
  once, to nearest even, at the store: an error of at most half an ulp of the value, so at most
  half an ulp of the largest |dy| (ulp(v) = 2^floor(log2 |v|) * eps, eps = 2^-10 fp16, 2^-7
  bf16). Bound: 0.5 ulp(max|dy|) + 1e-5 max|dy| for the fp32 arithmetic. A truncating store
  (the interpreter's bf16 cast without the RTNE emulation) errs by up to a whole ulp and fails.
- fp16/bf16 dgamma, dbeta: fp32 sums of fp32 values computed from the (exact) low-precision
  inputs: the same 1e-5 normwise as fp32.
- fp16/bf16 dL/dgate = sum_p dh * h_stored: h_stored is gelu(z) rounded to the dtype (what the
  forward stored), so against the float64 h each term differs by at most half an ulp:
  per (image, channel) |error| <= eps/2 * sum_p |dh * h| + fp32 noise; checked with eps (2x).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maxvit_fast.kernels.batchnorm_backward as bnb  # created now, in the session's interpreter mode
from maxvit_fast.aot import compile_kernels

from .helpers import assert_close_normwise, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
EPS_OF = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
MODES = ("plain", "gelu", "se")


def ulp(v, dtype):
    """The spacing of ``dtype`` at the (normal-range) magnitude v."""
    _, exponent = torch.frexp(torch.as_tensor(v, dtype=torch.float64))
    return EPS_OF[dtype] * 2.0 ** (exponent.item() - 1)


def make_inputs(B, P, C, dtype, mode, bn_eps=1e-3):
    """y with per-channel offsets and spreads, dh, gamma/beta (the GELU sees both signs), the
    fp32 statistics the forward would have produced, and for SE a gate in (0, 1) and dm."""
    y = (torch.randn(B, P, C, dtype=torch.float64) * (0.5 + torch.rand(C, dtype=torch.float64) * 2)
         + torch.randn(C, dtype=torch.float64)).to(dtype)
    dh = torch.randn(B, P, C, dtype=torch.float64).to(dtype)
    gamma = 1 + 0.5 * torch.randn(C, dtype=torch.float64)
    beta = 0.5 * torch.randn(C, dtype=torch.float64)
    y64 = y.double()
    mean = y64.mean(dim=(0, 1))
    var = ((y64 - mean) ** 2).mean(dim=(0, 1))
    scale = gamma / torch.sqrt(var + bn_eps)
    shift = beta - mean * scale
    t = dict(y=y, dh=dh, gamma=gamma, beta=beta, eps=bn_eps,
             mean=mean.float(), var=var.float(), scale=scale.float(), shift=shift.float())
    if mode == "se":
        t["gate"] = torch.rand(B, C, dtype=torch.float32)
        t["dm"] = (torch.randn(B, C, dtype=torch.float64) / P).float()
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in t.items()}


def reference(t, mode, frozen=False):
    """float64 autograd: (dy, dgamma, dbeta, dL/dgate (B, C) or None). ``frozen``: eval-mode
    BatchNorm with t's mean and var as its running statistics."""
    B, P, C = t["y"].shape
    y = t["y"].double().reshape(B * P, C).requires_grad_()
    gamma = t["gamma"].clone().requires_grad_()
    beta = t["beta"].clone().requires_grad_()
    if frozen:
        z = F.batch_norm(y, t["mean"].double(), t["var"].double(), gamma, beta, training=False, eps=t["eps"])
    else:
        z = F.batch_norm(y, None, None, gamma, beta, training=True, eps=t["eps"])
    z = z.reshape(B, P, C)
    dh = t["dh"].double()
    if mode == "plain":
        loss = (dh * z).sum()
    else:
        h = F.gelu(z)
        if mode == "gelu":
            loss = (dh * h).sum()
        else:
            gate, dm = t["gate"].double()[:, None, :], t["dm"].double()[:, None, :]
            loss = (dh * gate * h + dm * h).sum()
    dy, dgamma, dbeta = torch.autograd.grad(loss, (y, gamma, beta))
    dgate = (dh * F.gelu(z)).sum(dim=1).detach() if mode == "se" else None
    return dy.reshape(B, P, C), dgamma, dbeta, dgate


def run_kernels(t, mode, *, in_place=False, frozen=False):
    """sums -> coefficients -> apply, every output preallocated NaN-filled (or dy in place).
    ``frozen``: the coefficients of frozen statistics, and the conv bias gradient appended."""
    y, dh = t["y"], t["dh"]
    B, P, C = y.shape
    T = bnb.batchnorm_backward_tiles_per_image(P)
    gelu, se = mode != "plain", mode == "se"
    stats = (t["mean"], t["var"], t["eps"], t["scale"], t["shift"])
    sums = bnb.batchnorm_backward_sums(dh, y, *stats, gelu=gelu, se=se,
                                       out=poison_(torch.empty(B * T, 5 if se else 2, C, device=DEVICE)))
    coeffs = bnb.batchnorm_backward_coefficients(
        sums, t["scale"], images=B, count=B * P, gate=t.get("gate"), dm=t.get("dm"),
        frozen_bias_dtype=torch.float32 if frozen else None,
        out=tuple(poison_(torch.empty(C, device=DEVICE)) for _ in range(5 if frozen else 4)))
    w, q, dgamma, dbeta = coeffs[:4]
    out = dh.clone() if in_place else poison_(torch.empty_like(dh))
    dy = bnb.batchnorm_backward_apply(
        out if in_place else dh, y, *stats, w, q, gelu=gelu, gate=t.get("gate"), dm=t.get("dm"), out=out)
    assert dy is out
    dgate = sums[:, 4].reshape(B, T, C).sum(dim=1) if se else None
    return (dy, dgamma, dbeta, dgate) + tuple(coeffs[4:])


SHAPES = [(3, 15, 48), (3, 135, 96), (1, 49, 40)]  # several tiles + partial last tile; partial channel blocks; batch 1


@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_backward_matches_autograd(shape, mode, dtype):
    t = make_inputs(*shape, dtype, mode)
    dy, dgamma, dbeta, dgate = run_kernels(t, mode)
    ref_dy, ref_dgamma, ref_dbeta, ref_dgate = reference(t, mode)
    assert dy.dtype == dtype
    if dtype == torch.float32:
        assert_close_normwise(dy, ref_dy, 1e-5, name="dy")
    else:
        assert_close_normwise(dy, ref_dy, 1e-5, atol=0.5 * ulp(ref_dy.abs().max(), dtype), name="dy")
    assert_close_normwise(dgamma, ref_dgamma, 1e-5, name="dgamma")
    assert_close_normwise(dbeta, ref_dbeta, 1e-5, name="dbeta")
    if mode == "se":
        if dtype == torch.float32:
            assert_close_normwise(dgate, ref_dgate, 1e-5, name="dL/dgate")
        else:
            h = F.gelu(t["y"].double() * t["scale"].double() + t["shift"].double())
            bound = EPS_OF[dtype] * (t["dh"].double() * h).abs().sum(dim=1) + 1e-6 * ref_dgate.abs().max()
            err = (dgate.double() - ref_dgate).abs()
            assert (err <= bound).all(), f"dL/dgate: error {(err - bound).max():.3e} above the bound"

    # in place (out = dh): the same values, bitwise
    dy_in_place = run_kernels(t, mode, in_place=True)[0]
    assert torch.equal(dy_in_place, dy)


@pytest.mark.parametrize("dtype", list(NAMES), ids=list(NAMES.values()))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=["x".join(map(str, s)) for s in SHAPES[:2]])
def test_frozen_statistics_backward_matches_autograd(shape, mode, dtype):
    """Eval-mode BatchNorm with gradients: the statistics are constants (t's mean and var stand
    for the running statistics; gamma and beta make them differ from the batch's), so dy = scale
    * g, and the conv bias in front gets sum(dy). Same tolerances as the train-mode test; the
    conv bias gradient is an fp32 sum like dbeta."""
    t = make_inputs(*shape, dtype, mode)
    # running statistics that are not the batch's
    t["mean"] = t["mean"] + 0.3 * torch.randn_like(t["mean"])
    t["var"] = t["var"] * (0.5 + torch.rand_like(t["var"]))
    scale = t["gamma"] / torch.sqrt(t["var"].double() + t["eps"])
    t["scale"], t["shift"] = scale.float(), (t["beta"] - t["mean"].double() * scale).float()
    dy, dgamma, dbeta, dgate, dbias = run_kernels(t, mode, frozen=True)
    ref_dy, ref_dgamma, ref_dbeta, ref_dgate = reference(t, mode, frozen=True)
    assert_close_normwise(dy, ref_dy, 1e-5, atol=0 if dtype == torch.float32 else 0.5 * ulp(ref_dy.abs().max(), dtype),
                          name="dy")
    assert_close_normwise(dgamma, ref_dgamma, 1e-5, name="dgamma")
    assert_close_normwise(dbeta, ref_dbeta, 1e-5, name="dbeta")
    assert_close_normwise(dbias, ref_dy.sum(dim=(0, 1)), 1e-5, name="d conv bias")
    if mode == "se" and dtype == torch.float32:
        assert_close_normwise(dgate, ref_dgate, 1e-5, name="dL/dgate")


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_frozen_conv_bias_gradient_in_its_dtype(bias_dtype):
    """The conv bias gradient is stored in its own dtype (one rounding of the fp32 value: within
    half an ulp + fp32 noise), independently of the BatchNorm parameters' dtype (fp32 here)."""
    t = make_inputs(3, 135, 96, torch.float32, "gelu")
    B, P, C = t["y"].shape
    sums = bnb.batchnorm_backward_sums(t["dh"], t["y"], t["mean"], t["var"], t["eps"], t["scale"], t["shift"],
                                       gelu=True)
    dtypes = (torch.float32,) * 4 + (bias_dtype,)
    out = tuple(poison_(torch.empty(C, dtype=dt, device=DEVICE)) for dt in dtypes)
    w, q, dgamma, dbeta, dbias = bnb.batchnorm_backward_coefficients(sums, t["scale"], images=B, count=B * P,
                                                                     frozen_bias_dtype=bias_dtype, out=out)
    assert dbias.dtype == bias_dtype and dgamma.dtype == torch.float32
    assert torch.count_nonzero(w) == 0 and torch.count_nonzero(q) == 0
    ref = dbeta.double() * t["scale"].double()
    _, exponent = torch.frexp(ref)
    bound = 0.5 * EPS_OF[bias_dtype] * torch.exp2(exponent.double() - 1) + 1e-6 * ref.abs().max()
    assert ((dbias.double() - ref).abs() <= bound).all()
    with pytest.raises(TypeError, match="frozen_bias_dtype"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=B, count=B * P, frozen_bias_dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be 5"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=B, count=B * P, frozen_bias_dtype=bias_dtype,
                                            out=out[:4])


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["gelu", "se"])
def test_parameter_gradients_in_the_parameter_dtype(mode, param_dtype):
    """dgamma / dbeta stored in the BatchNorm parameters' dtype (param_dtype), w and q in fp32:
    the fp32 sums rounded once to nearest even, so each element within half an ulp of the
    float64 value (+ 1e-5 of the largest for the fp32 sums); w, q unchanged (the fp32 path)."""
    t = make_inputs(3, 135, 96, param_dtype, mode)
    B, P, C = t["y"].shape
    T = bnb.batchnorm_backward_tiles_per_image(P)
    sums = bnb.batchnorm_backward_sums(t["dh"], t["y"], t["mean"], t["var"], t["eps"], t["scale"], t["shift"],
                                       gelu=True, se=mode == "se")
    dtypes = (torch.float32, torch.float32, param_dtype, param_dtype)
    w, q, dgamma, dbeta = bnb.batchnorm_backward_coefficients(
        sums, t["scale"], images=B, count=B * P, gate=t.get("gate"), dm=t.get("dm"), param_dtype=param_dtype,
        out=tuple(poison_(torch.empty(C, dtype=dt, device=DEVICE)) for dt in dtypes))
    w32, q32, dgamma32, dbeta32 = bnb.batchnorm_backward_coefficients(
        sums, t["scale"], images=B, count=B * P, gate=t.get("gate"), dm=t.get("dm"))
    assert (w.dtype, q.dtype, dgamma.dtype, dbeta.dtype) == dtypes
    assert torch.equal(w, w32) and torch.equal(q, q32)
    _, ref_dgamma, ref_dbeta, _ = reference(t, mode)
    assert T > 1
    for name, got, ref in (("dgamma", dgamma, ref_dgamma), ("dbeta", dbeta, ref_dbeta)):
        _, exponent = torch.frexp(ref)
        half_ulp = 0.5 * EPS_OF[param_dtype] * torch.exp2(exponent.double() - 1)
        bound = half_ulp + 1e-5 * ref.abs().max()
        err = (got.double() - ref).abs()
        assert (err <= bound).all(), f"{name}: error {(err - bound).max():.3e} above half an ulp"
    with pytest.raises(TypeError, match="param_dtype"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=B, count=B * P, gate=t.get("gate"),
                                            dm=t.get("dm"), param_dtype=torch.float64)
    with pytest.raises(TypeError, match="dgamma must be"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=B, count=B * P, gate=t.get("gate"),
                                            dm=t.get("dm"), param_dtype=param_dtype,
                                            out=tuple(torch.empty(C, device=DEVICE) for _ in range(4)))


def test_mixed_dtypes_and_rounding_of_the_stored_h():
    """dh fp32 with bf16 y: dy is fp32; with SE, dL/dgate uses h rounded to y's dtype (the
    forward's stored value), so it matches the float64 sum over that rounded h to fp32 accuracy."""
    t = make_inputs(2, 70, 48, torch.bfloat16, "se")
    t["dh"] = torch.randn(t["y"].shape, device=DEVICE)
    dy, dgamma, dbeta, dgate = run_kernels(t, "se")
    ref_dy, ref_dgamma, ref_dbeta, _ = reference(t, "se")
    assert dy.dtype == torch.float32
    assert_close_normwise(dy, ref_dy, 1e-5, name="dy")
    assert_close_normwise(dgamma, ref_dgamma, 1e-5, name="dgamma")
    assert_close_normwise(dbeta, ref_dbeta, 1e-5, name="dbeta")
    # the forward (kernels/batchnorm_gelu.py) stores gelu(y * scale + shift) in y's dtype
    from maxvit_fast.kernels.batchnorm_gelu import batchnorm_gelu
    h_stored = batchnorm_gelu(t["y"], t["scale"], t["shift"])
    ref_dgate = (t["dh"].double() * h_stored.double()).sum(dim=1)
    assert_close_normwise(dgate, ref_dgate, 1e-5, name="dL/dgate over the stored h")


@pytest.mark.parametrize("shape", [(0, 15, 48), (2, 0, 48), (2, 15, 0)], ids=["no-images", "no-pixels", "no-channels"])
def test_empty_tensors(shape):
    B, P, C = shape
    t = make_inputs(max(B, 1), max(P, 1), C, torch.float32, "se")
    t["y"], t["dh"] = (torch.empty(shape, device=DEVICE) for _ in range(2))
    t["gate"], t["dm"] = (torch.rand(B, C, device=DEVICE) for _ in range(2))
    dy, dgamma, dbeta, dgate = run_kernels(t, "se")
    assert dy.shape == shape and dgate.shape == (B, C)
    assert torch.equal(dgamma, torch.zeros(C, device=DEVICE)) and torch.equal(dbeta, torch.zeros(C, device=DEVICE))


def test_bad_arguments_raise_clear_errors():
    t = make_inputs(2, 10, 32, torch.float32, "se")
    y, dh = t["y"], t["dh"]
    stats = (t["mean"], t["var"], t["eps"], t["scale"], t["shift"])
    with pytest.raises(ValueError, match="dh must have shape"):
        bnb.batchnorm_backward_sums(dh[:, :5], y, *stats, gelu=True)
    with pytest.raises(ValueError, match=r"must be a \(B, P, C\)"):
        bnb.batchnorm_backward_sums(dh[0], y[0], *stats, gelu=True)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        bnb.batchnorm_backward_sums(dh.double(), y.double(), *stats, gelu=True)
    with pytest.raises(ValueError, match="contiguous"):
        bnb.batchnorm_backward_sums(dh.transpose(0, 1).contiguous().transpose(0, 1), y, *stats, gelu=True)
    with pytest.raises(ValueError, match="scale must have shape"):
        bnb.batchnorm_backward_sums(dh, y, t["mean"], t["var"], t["eps"], t["scale"][:16], t["shift"], gelu=True)
    with pytest.raises(ValueError, match="GELU only"):
        bnb.batchnorm_backward_sums(dh, y, *stats, gelu=False, se=True)
    with pytest.raises(ValueError, match="out must have shape"):
        bnb.batchnorm_backward_sums(dh, y, *stats, gelu=True, out=torch.empty(2, 5, 32, device=DEVICE))
    sums = bnb.batchnorm_backward_sums(dh, y, *stats, gelu=True, se=True)
    with pytest.raises(ValueError, match="need gate and dm"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=2, count=20)
    with pytest.raises(ValueError, match="together"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=2, count=20, gate=t["gate"])
    with pytest.raises(ValueError, match="do not split"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=3, count=30, gate=t["gate"], dm=t["dm"])
    with pytest.raises(ValueError, match="gate must have shape"):
        bnb.batchnorm_backward_coefficients(sums, t["scale"], images=2, count=20, gate=t["gate"].T.contiguous(),
                                            dm=t["dm"])
    w, q, _, _ = bnb.batchnorm_backward_coefficients(sums, t["scale"], images=2, count=20, gate=t["gate"], dm=t["dm"])
    with pytest.raises(ValueError, match="GELU only"):
        bnb.batchnorm_backward_apply(dh, y, *stats, w, q, gelu=False, gate=t["gate"], dm=t["dm"])
    with pytest.raises(TypeError, match="dh's dtype"):
        bnb.batchnorm_backward_apply(dh, y, *stats, w, q, gelu=True, out=dh.half())
    with pytest.raises(TypeError, match="w must be fp32"):
        bnb.batchnorm_backward_apply(dh, y, *stats, w.half(), q, gelu=True)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile: every configuration MaxViT-T's MBConv backward launches
# ----------------------------------------------------------------------------------------------

def kernel_requests():
    """BN1 (hidden, GELU), BN2 (hidden, GELU + SE), BN3 (dim_out, plain) of MaxViT-T (dims 64 ..
    512, expansion 4), fp16/bf16/fp32; deduplicated."""
    import json

    requests = {}

    def add(kernel, signature, constexprs, cfg):
        constexprs = dict(constexprs, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
        req = dict(module="maxvit_fast.kernels.batchnorm_backward", kernel=kernel, signature=signature,
                   constexprs=constexprs, num_warps=cfg["num_warps"], num_stages=3, divisible=["C"])
        requests[json.dumps(req, sort_keys=True)] = req

    widths = {"plain": (64, 128, 256, 512), "gelu": (256, 512, 1024, 2048), "se": (256, 512, 1024, 2048)}
    for t in NAMES.values():
        common = dict(dh_ptr=f"*{t}", y_ptr=f"*{t}", mean_ptr="*fp32", var_ptr="*fp32", scale_ptr="*fp32",
                      shift_ptr="*fp32")
        sums_sig = dict(common, sums_ptr="*fp32", P="i32", C="i32", tiles_per_image="i32", eps="fp32")
        apply_sig = dict(common, w_ptr="*fp32", q_ptr="*fp32", gate_ptr="*fp32", dm_ptr="*fp32", out_ptr=f"*{t}",
                         P="i32", C="i32", tiles_per_image="i32", eps="fp32")
        for mode, channel_counts in widths.items():
            flags = dict(GELU=mode != "plain", SE=mode == "se", EMULATE_BF16_RTNE=False)
            for C in channel_counts:
                cfg = bnb.batchnorm_backward_config(C)
                add("batchnorm_backward_sums_kernel", sums_sig, flags, cfg)
                add("batchnorm_backward_apply_kernel", apply_sig, flags, cfg)
    for t in NAMES.values():  # dgamma / dbeta in the BatchNorm parameters' dtype
        coef_sig = dict(sums_ptr="*fp32", scale_ptr="*fp32", gate_ptr="*fp32", dm_ptr="*fp32", w_ptr="*fp32",
                        q_ptr="*fp32", dgamma_ptr=f"*{t}", dbeta_ptr=f"*{t}", dbias_ptr=f"*{t}", rows="i32", C="i32",
                        tiles_per_image="i32", inv_count="fp32")
        for se in (False, True):
            for frozen in (False, True):  # train mode; eval mode with gradients (+ the conv bias gradient)
                add("batchnorm_backward_coefficients_kernel", coef_sig,
                    dict(SE=se, FROZEN=frozen, EMULATE_BF16_RTNE=False), bnb.batchnorm_backward_coefficients_config())
    return list(requests.values())


def test_aot_compile_configurations():
    requests = [dict(r, arch=arch) for r in kernel_requests() for arch in (80, 90)]
    failures, table = [], []
    for k in compile_kernels(requests):
        req = k.request
        flags = {n: v for n, v in req["constexprs"].items() if not n.startswith("EMULATE")}
        line = (f"{k.summary()} {req['signature'].get('dh_ptr', req['signature'].get('dgamma_ptr'))} {flags} "
                f"warps={req['num_warps']}")
        table.append(line)
        if k.spills:
            failures.append("spills: " + line)
    print("\n".join(table))
    assert not failures, "\n".join(failures)
