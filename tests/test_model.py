"""Constructor and input validation, empty batches, the fused/reference switch and its fallback."""

import warnings

import pytest
import torch

import maxvit_fast
from maxvit_fast import FusedFallbackWarning, MaxViT, image_size_ok, nearest_valid_sizes
from maxvit_fast import dispatch

from .helpers import assert_close_normwise

SMALL = dict(num_classes=5, dim=16, depth=(1, 1), dim_head=8, window_size=4)


def small_model(**kw):
    return MaxViT(**{**SMALL, **kw})


@pytest.mark.parametrize("depth", [2, [1, 2], (1, 0), (1, -1), (1, 2.0), (), (True,)])
def test_depth_must_be_tuple_of_positive_ints(depth):
    with pytest.raises(ValueError, match="depth"):
        small_model(depth=depth)


def test_dim_divisible_by_dim_head():
    with pytest.raises(ValueError, match=r"dim \(20\) must be divisible by dim_head \(8\)"):
        small_model(dim=20)


@pytest.mark.parametrize("r", [0, -2])
def test_num_register_tokens_at_least_one(r):
    with pytest.raises(ValueError, match="num_register_tokens"):
        small_model(num_register_tokens=r)


@pytest.mark.parametrize("w", [0, -1])
def test_window_size_at_least_one(w):
    with pytest.raises(ValueError, match="window_size"):
        small_model(window_size=w)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (32,)])
def test_input_must_be_4d(shape):
    with pytest.raises(ValueError, match="4-D"):
        small_model()(torch.randn(*shape))


def test_input_channel_count():
    with pytest.raises(ValueError, match="4 channels.*channels=3"):
        small_model()(torch.randn(2, 4, 32, 32))


def test_non_tensor_and_integer_input():
    with pytest.raises(TypeError):
        small_model()([[1.0]])
    with pytest.raises(TypeError, match="floating"):
        small_model()(torch.zeros(1, 3, 32, 32, dtype=torch.long))


def test_image_size_not_divisible_names_nearest_valid_sizes():
    m = small_model()  # 2 stages, window 4: every multiple of 32 is valid
    with pytest.raises(ValueError, match=r"height 40 .*nearest valid heights: \[32, 61\]"):
        m(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"width 34 .*\[32, 61\]"):
        m(torch.randn(1, 3, 32, 34))


def test_nearest_valid_sizes_are_valid():
    for w, stages, size in [(7, 4, 200), (7, 2, 50), (8, 3, 100), (3, 1, 5)]:
        near = nearest_valid_sizes(size, stages, w)
        assert near and all(image_size_ok(s, stages, w) for s in near)
    assert image_size_ok(224, 4, 7) and not image_size_ok(225, 4, 7)
    assert image_size_ok(2 * 7 * 2 * 2 - 3, 1, 7)  # 25 -> 13 -> 7: ceil division is allowed


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_empty_batch_returns_empty_output(fused, train):
    m = small_model(fused=fused).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FusedFallbackWarning)
        out = m(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 5)


def test_fused_is_not_part_of_the_state_dict_and_can_be_switched():
    m = small_model().eval()
    m2 = small_model(fused=True).eval()
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    m2.fused = False
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_fused_on_cpu_without_interpreter_falls_back_with_exactly_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    maxvit_fast.reset_fallback_warnings()
    m = small_model(fused=True).eval()
    ref = small_model().eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(x)
        out2 = m(x)  # a second forward does not warn again
    ours = [w for w in caught if issubclass(w.category, FusedFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "CUDA" in str(ours[0].message)
    # same function; the fused path hands the convolutions channels-last tensors, so only the
    # summation order differs
    assert_close_normwise(out, ref(x), 1e-5, name="logits")
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_fused_model_in_float64_falls_back_with_exactly_one_warning():
    """float64 (which no kernel computes in): the whole model runs the reference modules, after
    one warning naming the dtype (not one per op)."""
    maxvit_fast.reset_fallback_warnings()
    m = small_model(fused=True).double().train()
    ref = small_model().double().train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = m(x)
    ours = [w for w in caught if issubclass(w.category, FusedFallbackWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "float64" in str(ours[0].message)
    torch.manual_seed(0)  # the same dropout masks: the reference path draws them with torch
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)


def test_dispatch_reasons(monkeypatch):
    x = torch.zeros(1)
    assert not dispatch.use_kernels(x, fused=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "cpu" in dispatch.kernels_unavailable_reason(x)
    if maxvit_fast.kernels.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.kernels_unavailable_reason(x) is None


def test_drop_path_is_per_sample_and_unbiased():
    from maxvit_fast.reference import Dropsample

    d = Dropsample(0.5).train()
    x = torch.ones(4000, 3, 2, 2)
    y = d(x)
    per_sample = y.flatten(1)
    # each sample is either all zero or all 1 / (1 - p)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))
    kept = (per_sample[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.5) < 4 * (0.25 / 4000) ** 0.5  # binomial, 4 sigma
    assert torch.equal(d.eval()(x), x)
    with pytest.raises(ValueError):
        Dropsample(1.0)


def test_package_imports_kernels_under_maxvit_fast_only(tmp_path):
    import subprocess
    import sys

    assert maxvit_fast.kernels.__name__ == "maxvit_fast.kernels"
    # From outside the source tree, the installed package must not provide a top-level
    # `kernels` (another PyPI package owns that name).
    code = (
        "import importlib.util, maxvit_fast.kernels as k, os;"
        "s = importlib.util.find_spec('kernels');"
        "print('OURS' if s and os.path.dirname(s.origin or '') == os.path.dirname(k.__file__) else 'OK')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "OK", out.stdout + out.stderr
