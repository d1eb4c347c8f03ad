"""MBConv (with its residual where the block has one) on NCHW tensors of any memory format."""

from __future__ import annotations

import torch
from torch import nn

from ..dispatch import use_kernels


def mbconv(x: torch.Tensor, module: nn.Module, fused: bool = False) -> torch.Tensor:
    if use_kernels(x, fused, unsupported="no fused MBConv kernel yet"):
        raise AssertionError("unreachable: no fused MBConv kernel is registered")
    return module(x)
