"""FeedForward + residual over tokens (any leading shape, channels last)."""

from __future__ import annotations

import torch
from torch import nn

from ..dispatch import use_kernels


def feedforward_residual(x: torch.Tensor, ff: nn.Sequential, fused: bool = False) -> torch.Tensor:
    """``ff(x) + x`` for tokens ``x`` of shape (..., C).

    The feed-forward is per token, so it runs on the whole feature map at once: the window
    partition of the reference does not change its result.
    """
    if use_kernels(x, fused, unsupported="no fused feed-forward kernel yet"):
        raise AssertionError("unreachable: no fused feed-forward kernel is registered")
    return ff(x) + x
