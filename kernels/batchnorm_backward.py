"""Backward of a train-mode BatchNorm over channels-last pixels, optionally followed by GELU and
by the squeeze-excitation (SE) gate and mean, in three passes.

Forward being inverted (batch statistics mean, biased var over all N = B * P rows; scale, shift
as kernels/batchnorm_statistics.py formed them):

    xhat = (y - mean) * rsqrt(var + eps)
    z = y * scale + shift                 (the forward's expression, so z is bitwise its value)
    h = gelu(z) (exact erf) or h = z (plain)
    SE: the consumer reads gate[b, c] * h and the SE mean of h over each image's P pixels

dh is the gradient of the consumer's input (gate * h with SE, h otherwise); with SE the op layer
later supplies gate (B, C) and dm (B, C) = dL/d(SE mean) / P, so dL/dh = dh * gate + dm. With
g = dL/dz (dh, dh * gelu'(z), or (dh * gate + dm) * gelu'(z)), gelu'(z) = Phi(z) + z * phi(z):

    dy = scale * (g - m1 - xhat * m2),   m1 = sum(g) / N,   m2 = sum(g * xhat) / N
    dbeta = sum(g),   dgamma = sum(g * xhat)          (sums over all B * P rows)

Passes:
1. ``batchnorm_backward_sums``: per tile of BLOCK_P pixels of ONE image and per channel, the
   partial sums (B * T, K, C) fp32, T = ``batchnorm_backward_tiles_per_image(P)``:
   plain / GELU (K = 2): sum g, sum g * xhat.
   SE (K = 5), gp = gelu'(z): sum dh * gp, sum dh * gp * xhat, sum gp, sum gp * xhat, and
   sum dh * hs, hs = h rounded to y's dtype (the value the forward stored and the SE gate
   multiplied): its sum over an image's tiles is dL/dgate. Since g = gate * dh * gp + dm * gp
   with gate, dm constant per image, the first four give sum g and sum g * xhat once gate and
   dm are known, without a second pass over the tensors.
2. ``batchnorm_backward_coefficients``: one launch over channel blocks, looping over the tile
   rows: dbeta, dgamma (stored in the BatchNorm parameters' dtype) and the per-channel terms
   w = -scale * dbeta / N, q = -scale * dgamma / N (fp32).
   Frozen statistics (eval-mode BatchNorm with gradients: mean and var are the running
   statistics, constants of the batch): dy = scale * g, so w = q = 0, and the gradient of the
   conv bias in front, sum(dy) = scale * dbeta, is stored too (in the bias's dtype).
3. ``batchnorm_backward_apply``: dy = scale * g + w + q * xhat, g recomputed from dh and y; out
   may be dh itself (each element is read and written by the same program).

No bias sums in train mode: the gradient of a conv bias in front of a train-mode BatchNorm is
exactly zero (the batch mean removes any per-channel constant), returned as zeros by
maxvit_fast/ops/mbconv.py.

Layout: dh, y, out (B, P, C) contiguous (fp16/bf16/fp32, any mix; dy has dh's dtype); mean,
var, scale, shift, w, q (C,) fp32 contiguous; gate, dm (B, C) fp32 contiguous. Tiles as in
kernels/batchnorm_gelu.py: grid (B * T, cdiv(C, BLOCK_C)), 64 pixels x 32 channels, 4 warps
(16 values per thread). All math in fp32, one rounding at the store.

Resources: registers per thread sm_80 / sm_90, from the ahead-of-time compile in
tests/test_batchnorm_backward.py::test_aot_compile_configurations (every configuration the
MaxViT-T MBConv backward launches: BN1/BN2 at hidden 256..2048, BN3 at 64..512, which all get
the same blocks; `pytest tests/test_batchnorm_backward.py -k aot -s` prints them). Triton 3.9
toolchain, C divisible by 16 as the runtime specialises it. All LOCAL 0 and STACK 0 (no spills).
    sums  plain w4:            fp16 56/56,   bf16 56/56,   fp32 56/56
    sums  gelu  w4:            fp16 80/84,   bf16 80/84,   fp32 80/80
    sums  se    w4:            fp16 96/96,   bf16 96/96,   fp32 96/127
    apply plain w4:            fp16 56/64,   bf16 62/64,   fp32 60/64
    apply gelu  w4:            fp16 83/85,   bf16 84/84,   fp32 72/72
    apply se    w4:            fp16 107/110, bf16 108/110, fp32 96/95
    coefficients w4 (32 rows x 64 channels; dgamma/dbeta fp16, bf16, fp32): plain/gelu 56/52,
                 56/52, 48/54; se 96/96 for all three
(8 warps, i.e. 8 values per thread, would bring the SE kernels to 60..76 registers; 4 warps kept
as in batchnorm_gelu.py, the choice is for a GPU measurement.)
GPU speed: not measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .numerics import gelu, gelu_derivative, to_storage

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COEFFICIENTS_BLOCK_R = 32
COEFFICIENTS_BLOCK_C = 64


@triton.jit
def _load_tile(dh_ptr, y_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, eps, pid_tile, pid_c, P, C,
               tiles_per_image, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile's offsets, masks and fp32 dh, xhat, z; masked elements have dh = 0."""
    image = pid_tile // tiles_per_image
    tile = pid_tile % tiles_per_image
    offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_p < P)[:, None] & mask_c[None, :]
    offsets = ((image.to(tl.int64) * P + offs_p) * C)[:, None] + offs_c[None, :]

    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    xhat = (y - mean[None, :]) * tl.rsqrt(var + eps)[None, :]
    z = y * scale[None, :] + shift[None, :]  # as kernels/batchnorm_gelu.py computes it
    return image, offs_c, mask_c, mask, offsets, dh, xhat, z, scale


@triton.jit
def batchnorm_backward_sums_kernel(
    dh_ptr, y_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, sums_ptr,
    P, C, tiles_per_image, eps,
    GELU: tl.constexpr, SE: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_tile = tl.program_id(0)  # image * tiles_per_image + tile
    pid_c = tl.program_id(1)
    _, offs_c, mask_c, mask, _, dh, xhat, z, _ = _load_tile(
        dh_ptr, y_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, eps, pid_tile, pid_c, P, C, tiles_per_image,
        BLOCK_P, BLOCK_C)

    if SE:
        out_ptrs = sums_ptr + pid_tile.to(tl.int64) * (5 * C) + offs_c
        # gelu'(z) of a padded element is not 0: mask it (dh is 0 there, so dh * anything is)
        gp = tl.where(mask, gelu_derivative(z), 0.0)
        h_stored = to_storage(gelu(z), y_ptr.dtype.element_ty, EMULATE_BF16_RTNE).to(tl.float32)
        dh_gp = dh * gp
        tl.store(out_ptrs, tl.sum(dh_gp, axis=0), mask=mask_c)
        tl.store(out_ptrs + C, tl.sum(dh_gp * xhat, axis=0), mask=mask_c)
        tl.store(out_ptrs + 2 * C, tl.sum(gp, axis=0), mask=mask_c)
        tl.store(out_ptrs + 3 * C, tl.sum(gp * xhat, axis=0), mask=mask_c)
        tl.store(out_ptrs + 4 * C, tl.sum(dh * h_stored, axis=0), mask=mask_c)
    else:
        out_ptrs = sums_ptr + pid_tile.to(tl.int64) * (2 * C) + offs_c
        g = dh
        if GELU:
            g = dh * gelu_derivative(z)
        g = tl.where(mask, g, 0.0)
        tl.store(out_ptrs, tl.sum(g, axis=0), mask=mask_c)
        tl.store(out_ptrs + C, tl.sum(g * xhat, axis=0), mask=mask_c)


@triton.jit
def batchnorm_backward_coefficients_kernel(
    sums_ptr, scale_ptr, gate_ptr, dm_ptr, w_ptr, q_ptr, dgamma_ptr, dbeta_ptr, dbias_ptr,
    rows, C, tiles_per_image, inv_count,
    SE: tl.constexpr, FROZEN: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if SE:
        row_stride = 5 * C
    else:
        row_stride = 2 * C

    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < rows)[:, None] & mask_c[None, :]
        ptrs = sums_ptr + offs_r.to(tl.int64)[:, None] * row_stride + offs_c[None, :]
        s0 = tl.load(ptrs, mask=mask, other=0.0)
        s1 = tl.load(ptrs + C, mask=mask, other=0.0)
        if SE:
            # row r is a tile of image r // tiles_per_image: g = gate * dh * gp + dm * gp there
            per_image = (offs_r // tiles_per_image).to(tl.int64)[:, None] * C + offs_c[None, :]
            gate = tl.load(gate_ptr + per_image, mask=mask, other=0.0)
            dm = tl.load(dm_ptr + per_image, mask=mask, other=0.0)
            s2 = tl.load(ptrs + 2 * C, mask=mask, other=0.0)
            s3 = tl.load(ptrs + 3 * C, mask=mask, other=0.0)
            sum_g += tl.sum(gate * s0 + dm * s2, axis=0)
            sum_gx += tl.sum(gate * s1 + dm * s3, axis=0)
        else:
            sum_g += tl.sum(s0, axis=0)
            sum_gx += tl.sum(s1, axis=0)

    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    # dgamma / dbeta in the parameters' dtype (one rounding of the fp32 sums); w, q stay fp32
    tl.store(dbeta_ptr + offs_c, to_storage(sum_g, dbeta_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask_c)
    tl.store(dgamma_ptr + offs_c, to_storage(sum_gx, dgamma_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask_c)
    if FROZEN:  # the statistics do not depend on the batch: dy = scale * g, d conv bias = sum(dy)
        tl.store(w_ptr + offs_c, tl.zeros_like(sum_g), mask=mask_c)
        tl.store(q_ptr + offs_c, tl.zeros_like(sum_g), mask=mask_c)
        tl.store(dbias_ptr + offs_c, to_storage(scale * sum_g, dbias_ptr.dtype.element_ty, EMULATE_BF16_RTNE),
                 mask=mask_c)
    else:
        tl.store(w_ptr + offs_c, -scale * sum_g * inv_count, mask=mask_c)
        tl.store(q_ptr + offs_c, -scale * sum_gx * inv_count, mask=mask_c)


@triton.jit
def batchnorm_backward_apply_kernel(
    dh_ptr, y_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, w_ptr, q_ptr, gate_ptr, dm_ptr, out_ptr,
    P, C, tiles_per_image, eps,
    GELU: tl.constexpr, SE: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_tile = tl.program_id(0)  # image * tiles_per_image + tile
    pid_c = tl.program_id(1)
    image, offs_c, mask_c, mask, offsets, dh, xhat, z, scale = _load_tile(
        dh_ptr, y_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, eps, pid_tile, pid_c, P, C, tiles_per_image,
        BLOCK_P, BLOCK_C)

    g = dh
    if GELU:
        if SE:
            gate = tl.load(gate_ptr + image.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
            dm = tl.load(dm_ptr + image.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
            g = dh * gate[None, :] + dm[None, :]
        g = g * gelu_derivative(z)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0)
    q = tl.load(q_ptr + offs_c, mask=mask_c, other=0.0)
    dy = scale[None, :] * g + w[None, :] + q[None, :] * xhat
    tl.store(out_ptr + offsets, to_storage(dy, out_ptr.dtype.element_ty, EMULATE_BF16_RTNE), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def batchnorm_backward_config(C: int) -> dict:
    """Blocks of the sums and apply kernels (the same for both). BLOCK_P is fixed, so T depends
    on P only."""
    return dict(BLOCK_P=64, BLOCK_C=max(16, min(32, triton.next_power_of_2(max(C, 1)))), num_warps=4)


def batchnorm_backward_coefficients_config() -> dict:
    return dict(BLOCK_R=COEFFICIENTS_BLOCK_R, BLOCK_C=COEFFICIENTS_BLOCK_C, num_warps=4)


def batchnorm_backward_tiles_per_image(P: int) -> int:
    return triton.cdiv(P, batchnorm_backward_config(1)["BLOCK_P"])


def _check_activation(name, t, shape=None):
    if not isinstance(t, torch.Tensor) or t.ndim != 3:
        raise ValueError(f"{name} must be a (B, P, C) tensor, got {getattr(t, 'shape', type(t))}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_vector(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(t, 'shape', ())) or type(t)}")
    if t.dtype != dtype:
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        raise TypeError(f"{name} must be {names.get(dtype, dtype)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_fp32(name, t, shape, device):
    _check_vector(name, t, shape, torch.float32, device)


def _check_inputs(dh, y, mean, var, scale, shift):
    _check_activation("y", y)
    _check_activation("dh", dh, tuple(y.shape))
    if dh.device != y.device:
        raise ValueError(f"dh is on {dh.device}, y on {y.device}")
    C = y.shape[2]
    for name, t in (("mean", mean), ("var", var), ("scale", scale), ("shift", shift)):
        _check_fp32(name, t, (C,), y.device)


def _check_se(gate, dm, images, C, device):
    if (gate is None) != (dm is None):
        raise ValueError("gate and dm come together (the SE case) or not at all")
    if gate is not None:
        _check_fp32("gate", gate, (images, C), device)
        _check_fp32("dm", dm, (images, C), device)


def batchnorm_backward_sums(dh, y, mean, var, eps: float, scale, shift, *, gelu: bool, se: bool = False,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tile partial sums, fp32 (B * T, K, C), T = ``batchnorm_backward_tiles_per_image(P)``,
    row b * T + t = tile t of image b. plain / GELU: K = 2 (sum g, sum g * xhat); SE (``se``,
    needs ``gelu``): K = 5 (sum dh * gp, sum dh * gp * xhat, sum gp, sum gp * xhat,
    sum dh * h_stored), gp = gelu'(z). See the module docstring."""
    _check_inputs(dh, y, mean, var, scale, shift)
    if se and not gelu:
        raise ValueError("the SE case is GELU only (se=True needs gelu=True)")
    B, P, C = y.shape
    cfg = batchnorm_backward_config(C)
    T = triton.cdiv(P, cfg["BLOCK_P"])
    shape = (B * T, 5 if se else 2, C)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=y.device)
    else:
        _check_fp32("out", out, shape, y.device)
    if y.numel() > 0:
        grid = (B * T, triton.cdiv(C, cfg["BLOCK_C"]))
        batchnorm_backward_sums_kernel[grid](
            dh, y, mean, var, scale, shift, out, P, C, T, float(eps),
            GELU=gelu, SE=se, EMULATE_BF16_RTNE=INTERPRET and y.dtype == torch.bfloat16, **cfg,
        )
    return out


def batchnorm_backward_coefficients(sums, scale, *, images: int, count: int, gate=None, dm=None,
                                    param_dtype: torch.dtype = torch.float32, frozen_bias_dtype=None,
                                    out: tuple[torch.Tensor, ...] | None = None):
    """(w, q, dgamma, dbeta), each (C,), from the tile sums of ``batchnorm_backward_sums`` (rows =
    images * T, row r a tile of image r // T): w, q fp32, dgamma and dbeta in ``param_dtype``
    (the BatchNorm weight's: no cast launches after). ``count`` = N = B * P, the rows the
    BatchNorm normalised. SE sums (K = 5) need ``gate`` and ``dm`` (images, C) fp32.

    ``frozen_bias_dtype`` (a dtype): the statistics were frozen (eval-mode BatchNorm, the
    running statistics); w = q = 0 (``count`` is not used) and a fifth tensor, the gradient of
    the conv bias in front (scale * dbeta), is returned in that dtype.
    ``out``: four (five when frozen) preallocated (C,) tensors of those dtypes."""
    if not isinstance(sums, torch.Tensor) or sums.ndim != 3 or sums.shape[1] not in (2, 5):
        raise ValueError(f"sums must be a (rows, 2 or 5, C) tensor, got {getattr(sums, 'shape', type(sums))}")
    if sums.dtype != torch.float32:
        raise TypeError(f"sums must be fp32, got {sums.dtype}")
    if not sums.is_contiguous():
        raise ValueError("sums must be contiguous")
    rows, K, C = sums.shape
    se = K == 5
    if images < 0 or count < 0 or (images == 0 and rows > 0) or (images > 0 and rows % images):
        raise ValueError(f"{rows} tile rows do not split into {images} images")
    _check_fp32("scale", scale, (C,), sums.device)
    _check_se(gate, dm, images, C, sums.device)
    if se != (gate is not None):
        raise ValueError("SE sums (K = 5) need gate and dm, plain/GELU sums (K = 2) take neither")
    if param_dtype not in _DTYPES:
        raise TypeError(f"param_dtype must be fp16, bf16 or fp32, got {param_dtype}")
    frozen = frozen_bias_dtype is not None
    if frozen and frozen_bias_dtype not in _DTYPES:
        raise TypeError(f"frozen_bias_dtype must be fp16, bf16 or fp32, got {frozen_bias_dtype}")
    dtypes = (torch.float32, torch.float32, param_dtype, param_dtype) + ((frozen_bias_dtype,) if frozen else ())
    if out is None:
        out = tuple(torch.empty(C, dtype=dt, device=sums.device) for dt in dtypes)
    else:
        if len(out) != len(dtypes):
            raise ValueError(f"out must be {len(dtypes)} (C,) tensors (w, q fp32; dgamma, dbeta in param_dtype"
                             f"{'; the conv bias gradient in frozen_bias_dtype' if frozen else ''})")
        for name, t, dt in zip(("w", "q", "dgamma", "dbeta", "dbias"), out, dtypes):
            _check_vector(f"out {name}", t, (C,), dt, sums.device)
    w, q, dgamma, dbeta = out[:4]
    if C > 0:
        cfg = batchnorm_backward_coefficients_config()
        grid = (triton.cdiv(C, cfg["BLOCK_C"]),)
        tiles_per_image = max(1, rows // images) if images else 1
        batchnorm_backward_coefficients_kernel[grid](
            sums, scale, gate if se else scale, dm if se else scale, w, q, dgamma, dbeta,
            out[4] if frozen else w, rows, C, tiles_per_image, 1.0 / count if count > 0 else 0.0,
            SE=se, FROZEN=frozen, EMULATE_BF16_RTNE=INTERPRET and torch.bfloat16 in dtypes, **cfg,
        )
    return out


def batchnorm_backward_apply(dh, y, mean, var, eps: float, scale, shift, w, q, *, gelu: bool, gate=None, dm=None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """dy = scale * g + w + q * xhat in dh's dtype, (B, P, C); ``gate`` and ``dm`` (B, C) fp32:
    the SE case (needs ``gelu``). ``out`` may be ``dh`` itself (in place) or None (a new tensor)."""
    _check_inputs(dh, y, mean, var, scale, shift)
    B, P, C = y.shape
    _check_fp32("w", w, (C,), y.device)
    _check_fp32("q", q, (C,), y.device)
    _check_se(gate, dm, B, C, y.device)
    se = gate is not None
    if se and not gelu:
        raise ValueError("the SE case (gate, dm) is GELU only")
    if out is None:
        out = torch.empty_like(dh)
    else:
        _check_activation("out", out, (B, P, C))
        if out.dtype != dh.dtype:
            raise TypeError(f"out must have dh's dtype {dh.dtype}, got {out.dtype}")
    cfg = batchnorm_backward_config(C)
    T = triton.cdiv(P, cfg["BLOCK_P"])
    if y.numel() > 0:
        grid = (B * T, triton.cdiv(C, cfg["BLOCK_C"]))
        batchnorm_backward_apply_kernel[grid](
            dh, y, mean, var, scale, shift, w, q, gate if se else scale, dm if se else scale, out,
            P, C, T, float(eps), GELU=gelu, SE=se,
            EMULATE_BF16_RTNE=INTERPRET and out.dtype == torch.bfloat16, **cfg,
        )
    return out
