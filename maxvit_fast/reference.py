"""Reference PyTorch modules of MaxViT with register tokens.

These compute exactly the function of ``../shared/SEMANTICS.md`` and carry the same module tree
and parameter names as vit-pytorch 1.26.11's ``max_vit_with_registers``, so its state_dicts load
with ``strict=True``. Every fused kernel is tested against them and every fused op falls back to
them.

One deliberate difference: the residual wrapper's drop path (``Dropsample``) is a correct
per-sample drop path here; the original builds its mask with ``torch.FloatTensor(shape,
device=...)``, which fails whenever the path is active (probability > 0 in training).
"""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import nn


def relative_position_indices(window_size: int, num_registers: int) -> torch.Tensor:
    """Index into the bias table for every (query, key) pair of one window sequence.

    The sequence is [registers (r), window tokens (w*w, row-major)]. For tokens i=(i1, i2) and
    j=(j1, j2) the index is (i1 - j1 + w - 1) * (2w - 1) + (i2 - j2 + w - 1); any pair with a
    register row or column uses the last table entry, (2w - 1)^2.
    """
    w = window_size
    pos = torch.arange(w)
    grid = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1).t()  # (w*w, 2)
    rel = grid[:, None, :] - grid[None, :, :] + (w - 1)
    idx = rel[..., 0] * (2 * w - 1) + rel[..., 1]
    n = num_registers + w * w
    full = torch.full((n, n), (2 * w - 1) ** 2, dtype=torch.long)
    full[num_registers:, num_registers:] = idx
    return full


class Attention(nn.Module):
    """Pre-norm multi-head attention over one window sequence with relative-position bias."""

    def __init__(self, dim, dim_head=32, dropout=0.0, window_size=7, num_registers=1):
        super().__init__()
        if num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {num_registers}")
        if dim % dim_head != 0:
            raise ValueError(f"dim ({dim}) must be divisible by dim_head ({dim_head})")
        self.heads = dim // dim_head
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.window_size = window_size
        self.num_registers = num_registers
        self.dropout = dropout

        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attend = nn.Sequential(nn.Softmax(dim=-1), nn.Dropout(dropout))
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.Dropout(dropout))
        self.rel_pos_bias = nn.Embedding((2 * window_size - 1) ** 2 + 1, self.heads)
        self.register_buffer(
            "rel_pos_indices", relative_position_indices(window_size, num_registers), persistent=False
        )

    def forward(self, x):  # x: (b, n, dim)
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        x = self.norm(x)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        sim = q @ k.transpose(-1, -2)
        bias = self.rel_pos_bias(self.rel_pos_indices)  # (n, n, h)
        sim = sim + bias.permute(2, 0, 1)
        attn = self.attend(sim)
        out = attn @ v
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.to_out(out)


def FeedForward(dim, mult=4, dropout=0.0):
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(inner, dim),
        nn.Dropout(dropout),
    )


class SqueezeExcitation(nn.Module):
    def __init__(self, dim, shrinkage_rate=0.25):
        super().__init__()
        hidden = int(dim * shrinkage_rate)
        self.gate = nn.Sequential(
            Reduce("b c h w -> b c", "mean"),
            nn.Linear(dim, hidden, bias=False),
            nn.SiLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
            Rearrange("b c -> b c 1 1"),
        )

    def forward(self, x):
        return x * self.gate(x)


class Dropsample(nn.Module):
    """Per-sample drop path: in training, zero whole samples with probability ``prob`` and
    rescale the survivors by 1 / (1 - prob)."""

    def __init__(self, prob=0.0):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x):
        if self.prob == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.rand(shape, device=x.device) >= self.prob
        return x * keep.to(x.dtype) / (1.0 - self.prob)


class MBConvResidual(nn.Module):
    def __init__(self, fn, dropout=0.0):
        super().__init__()
        self.fn = fn
        self.dropsample = Dropsample(dropout)

    def forward(self, x):
        return self.dropsample(self.fn(x)) + x


def MBConv(dim_in, dim_out, *, downsample, expansion_rate=4, shrinkage_rate=0.25, dropout=0.0):
    hidden = int(expansion_rate * dim_out)
    stride = 2 if downsample else 1
    net = nn.Sequential(
        nn.Conv2d(dim_in, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.GELU(),
        nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
        nn.BatchNorm2d(hidden),
        nn.GELU(),
        SqueezeExcitation(hidden, shrinkage_rate=shrinkage_rate),
        nn.Conv2d(hidden, dim_out, 1),
        nn.BatchNorm2d(dim_out),
    )
    if dim_in == dim_out and not downsample:
        net = MBConvResidual(net, dropout=dropout)
    return net
