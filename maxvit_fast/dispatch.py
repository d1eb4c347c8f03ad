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


# the dtypes the fused kernels compute in
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the active ``torch.autocast`` region for ``device_type``, or None."""
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def kernels_autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """For the fused model: the dtype to run the kernels in when autocast is on for ``x``'s
    device and the kernels can run on ``x`` (None otherwise: no autocast, or the reference path
    under autocast)."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None or _platform_reason(x) is not None:
        return None
    return dtype


def _platform_reason(x: torch.Tensor) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if x.is_cuda or triton_interpreting():
        return None
    return (
        f"input is on {x.device.type}; the kernels need a CUDA device "
        "(or TRITON_INTERPRET=1 set before maxvit_fast.kernels is imported)"
    )


def kernels_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``, or None when they can."""
    reason = _platform_reason(x)
    if reason is None and autocast_enabled(x.device.type):
        # A fused op called on its own inside an autocast region: the kernels compute in their
        # input dtype, and autocast would cast the reference's ops one by one, so the op uses the
        # reference. (The fused model runs its kernels in the autocast dtype: MaxViT.forward.)
        return "autocast is enabled around a single fused op (MaxViT(fused=True) handles autocast itself)"
    return reason


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
