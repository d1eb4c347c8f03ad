"""Window attention + residual for the block and grid steps of a MaxViT block.

Layout contract: ``x`` is a (B, H, W, C) tensor of any strides (usually the channels-last
view ``nchw.permute(0, 2, 3, 1)`` of the feature map); the result is a new (B, H, W, C)
tensor. Windows are

- ``"block"``: contiguous w x w tiles, pixel (X*w + a, Y*w + b) is token (a, b) of window (X, Y);
- ``"grid"``: dilated, with n = H // w, pixel (a*n + X, b*n + Y) is token (a, b) of window (X, Y).

Each window's sequence is [r register rows, w*w tokens]. ``registers`` is (r, C) for rows shared
by every window of every image (block step) or (B, r, C) for rows shared by the windows of one
image (grid step).
"""

from __future__ import annotations

import torch

from ..dispatch import use_kernels
from ..reference import Attention


def window_partition(x: torch.Tensor, window: int, pattern: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, nX, nY, w*w, C) window tokens in row-major (a, b) order."""
    b, h, w_, c = x.shape
    nx, ny = h // window, w_ // window
    if pattern == "block":
        t = x.reshape(b, nx, window, ny, window, c).permute(0, 1, 3, 2, 4, 5)
    elif pattern == "grid":
        t = x.reshape(b, window, nx, window, ny, c).permute(0, 2, 4, 1, 3, 5)
    else:
        raise ValueError(f"pattern must be 'block' or 'grid', got {pattern!r}")
    return t.reshape(b, nx, ny, window * window, c)


def window_unpartition(t: torch.Tensor, window: int, pattern: str) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B, nX, nY, w*w, C) -> (B, H, W, C)."""
    b, nx, ny, _, c = t.shape
    t = t.reshape(b, nx, ny, window, window, c)
    if pattern == "block":
        t = t.permute(0, 1, 3, 2, 4, 5)  # b, X, a, Y, b, c
        return t.reshape(b, nx * window, ny * window, c)
    if pattern == "grid":
        t = t.permute(0, 3, 1, 4, 2, 5)  # b, a, X, b, Y, c
        return t.reshape(b, window * nx, window * ny, c)
    raise ValueError(f"pattern must be 'block' or 'grid', got {pattern!r}")


def _reference(x, registers, attn: Attention, pattern: str):
    w, r = attn.window_size, attn.num_registers
    b, _, _, c = x.shape
    tokens = window_partition(x, w, pattern)  # (B, nX, nY, w*w, C)
    nx, ny = tokens.shape[1:3]
    if registers.ndim == 2:
        regs = registers.expand(b, nx, ny, r, c)
    else:
        regs = registers[:, None, None].expand(b, nx, ny, r, c)
    seq = torch.cat([regs, tokens], dim=3).reshape(b * nx * ny, r + w * w, c)
    seq = attn(seq) + seq
    seq = seq.reshape(b, nx, ny, r + w * w, c)
    return window_unpartition(seq[:, :, :, r:], w, pattern), seq[:, :, :, :r]


def window_attention_residual(
    x: torch.Tensor,
    registers: torch.Tensor,
    attn: Attention,
    pattern: str,
    fused: bool = False,
    need_register_outputs: bool = True,
):
    """``seq = attn(seq) + seq`` over every window of ``x``.

    Returns ``(x_new, register_rows)`` where ``register_rows`` is (B, nX, nY, r, C), the
    updated register rows of every window, or None when ``need_register_outputs`` is False
    (the grid step drops them, so the fused path does not compute their queries).
    """
    if use_kernels(x, fused, unsupported="no fused window-attention kernel yet"):
        raise AssertionError("unreachable: no fused window-attention kernel is registered")
    out, regs = _reference(x, registers, attn, pattern)
    return out, (regs if need_register_outputs else None)
