"""Fused-or-reference dispatch.

A fused op runs its Triton kernels when they can run for the given input: on a CUDA tensor
with Triton installed, or on any device when the kernels were created under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``maxvit_fast.kernels`` is first imported).
Otherwise the op uses the reference PyTorch modules and warns once per distinct reason.
"""

from __future__ import annotations

import os
import warnings

import torch


class FusedFallbackWarning(UserWarning):
    """The fused path could not run and the reference PyTorch modules were used instead."""


_warned: set[str] = set()


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already reported (so the next one warns again)."""
    _warned.clear()


def warn_fallback(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"maxvit_fast: fused kernels cannot run ({reason}); using the reference PyTorch modules.",
        FusedFallbackWarning,
        stacklevel=3,
    )


def triton_interpreting() -> bool:
    """True when the kernels were created under the Triton interpreter and it is still on."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from maxvit_fast import kernels
    except ImportError:
        return False
    return kernels.INTERPRET


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled()


def kernels_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if autocast_enabled(x.device.type):
        # The kernels compute in their input dtype; under autocast every op falls back alike,
        # so the model computes exactly the reference's autocast function.
        return "autocast is enabled (the fused kernels run in the input dtype: cast the model with .to(dtype) instead)"
    if x.is_cuda:
        return None
    if triton_interpreting():
        return None
    return (
        f"input is on {x.device.type}; the kernels need a CUDA device "
        "(or TRITON_INTERPRET=1 set before maxvit_fast.kernels is imported)"
    )


def use_kernels(x: torch.Tensor, fused: bool, unsupported: str | None = None) -> bool:
    """Decide one op call: True runs the kernels, False the reference (after one warning).

    ``unsupported`` is the op's own reason it cannot handle this configuration, if any.
    """
    if not fused:
        return False
    reason = kernels_unavailable_reason(x) or unsupported
    if reason is None:
        return True
    warn_fallback(reason)
    return False
