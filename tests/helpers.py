"""Shared test utilities: tolerance checks, the vit-pytorch peer."""

from __future__ import annotations

import importlib.util
import pathlib

import torch


def assert_close_normwise(actual, expected, rtol, atol=0.0, name="tensor"):
    """max |actual - expected| <= rtol * max |expected| + atol, and no NaN where the reference
    has none. Normwise (scaled by the largest reference entry) because entries near zero make
    an elementwise relative error meaningless."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN pattern differs"
    finite = torch.isfinite(expected)
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    bound = rtol * scale + atol
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} (rtol {rtol:g} x max|ref| {scale:.3e} + atol {atol:g})"
    return err


def assert_close_l2(actual, expected, rtol, name="tensor", floor=0.0):
    """||actual - expected||_2 <= rtol * max(||expected||_2, floor): the relative error of the
    tensor as one vector. Used for gradients, which are long sums whose small entries carry the
    rounding of the large ones. ``floor`` keeps a gradient that is zero in exact arithmetic (a
    bias in front of a train-mode BatchNorm) from being compared noise against noise."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).norm().item()
    ref = expected.norm().item()
    scale = max(ref, floor)
    assert err <= rtol * scale, f"{name}: L2 error {err:.3e} > {rtol:g} x {scale:.3e}"
    return err


def load_vit_pytorch_maxvit():
    """vit-pytorch 1.26.11's max_vit_with_registers module, loaded by file path (the package's
    __init__ imports torchvision, which we do not install)."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "max_vit_with_registers.py"
    mod_spec = importlib.util.spec_from_file_location("_peer_max_vit_with_registers", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def assert_within_reference_error(actual, ref_lowp, ref_fp32, factor=2.0, atol=0.0, name="tensor"):
    """Low-precision rule: the fused result's error against an fp32 (or fp64) reference is at
    most ``factor`` times the error of the reference module run in the same low precision,
    plus ``atol`` (for outputs where the reference happens to round almost exactly)."""
    truth = ref_fp32.detach().double()
    err = (actual.detach().double() - truth).abs().max().item()
    ref_err = (ref_lowp.detach().double() - truth).abs().max().item()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: error {err:.3e} > {factor:g} x reference's own error {ref_err:.3e} + {atol:g}"
    return err, ref_err


def poison_(t):
    """Fill with NaN so anything a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def randomize_batchnorm_buffers_(model, mean_std=0.5):
    """Non-trivial BatchNorm running statistics (a fresh model's mean 0 / var 1 hide folding
    bugs): running_mean ~ N(0, mean_std), running_var ~ U(0.5, 1.5)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, mean_std)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model
