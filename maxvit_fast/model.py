"""MaxViT with register tokens: the drop-in model with ``fused=``."""

from __future__ import annotations

import math
import sys

import torch
from einops.layers.torch import Reduce
from torch import nn
from torch.func import functional_call

from . import ops
from .batchnorm import FoldCache
from .dispatch import KERNEL_DTYPES, kernels_autocast_dtype, warn_fallback
from .reference import Attention, FeedForward, MBConv


# Parameters cast to the autocast dtype, per model and dtype, for inference under autocast (see
# MaxViT._parameters_in); FoldCache recomputes them whenever a parameter or buffer changes.
_cast_parameters = {dtype: FoldCache() for dtype in (torch.float16, torch.bfloat16, torch.float32)}


def clear_fused_caches() -> None:
    """Forget every cached tensor derived from parameters and buffers (folded BatchNorm weights,
    parameters cast for inference under autocast). Needed only after writes the caches cannot
    see, i.e. through ``param.data`` (it has its own version counter)."""
    sys.modules[f"{__package__}.ops.mbconv"].folded_cache.clear()  # (ops.mbconv is also a function name)
    for cache in _cast_parameters.values():
        cache.clear()


def _stage_sizes(size: int, num_stages: int) -> list[int]:
    """Feature-map side of each stage for an image side ``size``.

    The stem's stride-2 conv and each stage's first (stride-2) MBConv map s -> ceil(s / 2).
    """
    sizes, s = [], math.ceil(size / 2)
    for _ in range(num_stages):
        s = math.ceil(s / 2)
        sizes.append(s)
    return sizes


def image_size_ok(size: int, num_stages: int, window_size: int) -> bool:
    return size > 0 and all(s % window_size == 0 for s in _stage_sizes(size, num_stages))


def nearest_valid_sizes(size: int, num_stages: int, window_size: int) -> list[int]:
    """The closest valid image side below ``size`` (if any) and the closest above it."""
    step = window_size * 2 ** (num_stages + 1)  # every multiple of this is valid
    below = next((s for s in range(size - 1, 0, -1) if image_size_ok(s, num_stages, window_size)), None)
    above = next(s for s in range(size + 1, size + step + 1) if image_size_ok(s, num_stages, window_size))
    return [s for s in (below, above) if s is not None]


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class MaxViT(nn.Module):
    """MaxViT with register tokens (same constructor and parameter names as vit-pytorch's
    ``max_vit_with_registers.MaxViT``), plus ``fused``: False runs the reference PyTorch
    modules, True runs the fused Triton kernels where they can run and falls back to the
    reference modules (with one warning) where they cannot. ``model.fused`` can be changed at
    any time."""

    def __init__(
        self,
        *,
        num_classes,
        dim,
        depth,
        dim_head=32,
        dim_conv_stem=None,
        window_size=7,
        mbconv_expansion_rate=4,
        mbconv_shrinkage_rate=0.25,
        dropout=0.1,
        channels=3,
        num_register_tokens=4,
        fused=False,
    ):
        super().__init__()
        if not isinstance(depth, tuple) or len(depth) == 0:
            raise ValueError(f"depth must be a non-empty tuple of positive ints (one per stage), got {depth!r}")
        for i, d in enumerate(depth):
            _check_positive_int(f"depth[{i}]", d)
        for name, value in (
            ("num_classes", num_classes),
            ("dim", dim),
            ("dim_head", dim_head),
            ("window_size", window_size),
            ("channels", channels),
            ("num_register_tokens", num_register_tokens),
        ):
            _check_positive_int(name, value)
        if dim_conv_stem is not None:
            _check_positive_int("dim_conv_stem", dim_conv_stem)
        if dim % dim_head != 0:
            raise ValueError(f"dim ({dim}) must be divisible by dim_head ({dim_head})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.fused = bool(fused)
        self.num_classes = num_classes
        self.channels = channels
        self.window_size = window_size
        self.num_stages = len(depth)

        dim_conv_stem = dim if dim_conv_stem is None else dim_conv_stem
        self.conv_stem = nn.Sequential(
            nn.Conv2d(channels, dim_conv_stem, 3, stride=2, padding=1),
            nn.Conv2d(dim_conv_stem, dim_conv_stem, 3, padding=1),
        )

        dims = (dim_conv_stem,) + tuple(2**i * dim for i in range(len(depth)))
        self.layers = nn.ModuleList([])
        self.register_tokens = nn.ParameterList([])
        for (stage_in, stage_dim), stage_depth in zip(zip(dims[:-1], dims[1:]), depth):
            for k in range(stage_depth):
                first = k == 0
                conv = MBConv(
                    stage_in if first else stage_dim,
                    stage_dim,
                    downsample=first,
                    expansion_rate=mbconv_expansion_rate,
                    shrinkage_rate=mbconv_shrinkage_rate,
                )
                attn_kw = dict(dim_head=dim_head, dropout=dropout, window_size=window_size,
                               num_registers=num_register_tokens)
                self.layers.append(
                    nn.ModuleList([
                        conv,
                        nn.ModuleList([Attention(stage_dim, **attn_kw), FeedForward(stage_dim, dropout=dropout)]),
                        nn.ModuleList([Attention(stage_dim, **attn_kw), FeedForward(stage_dim, dropout=dropout)]),
                    ])
                )
                self.register_tokens.append(nn.Parameter(torch.randn(num_register_tokens, stage_dim)))

        self.mlp_head = nn.Sequential(
            Reduce("b d h w -> b d", "mean"),
            nn.LayerNorm(dims[-1]),
            nn.Linear(dims[-1], num_classes),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError/TypeError naming what is wrong with ``x``, before any compute."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"input must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model was built with channels={self.channels}")
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if not image_size_ok(size, self.num_stages, self.window_size):
                sizes = _stage_sizes(size, self.num_stages)
                near = nearest_valid_sizes(size, self.num_stages, self.window_size)
                raise ValueError(
                    f"image {name} {size} gives stage feature maps {sizes}, which must all be "
                    f"divisible by window_size={self.window_size}; nearest valid {name}s: {near}"
                )

    def forward(self, x):
        self.check_input(x)
        if x.shape[0] == 0:
            head = self.mlp_head[2]
            return head(x.new_zeros((0, head.in_features)))
        fused = self.fused
        if fused:
            dtype = kernels_autocast_dtype(x)
            if dtype is not None:
                return self._forward_in_autocast_dtype(x, dtype)
        if fused and x.dtype not in KERNEL_DTYPES:
            # one warning for the model, not one per op (each op would refuse the dtype too)
            warn_fallback(f"the fused kernels compute in {', '.join(str(d)[6:] for d in KERNEL_DTYPES)}; "
                          f"the input is {str(x.dtype)[6:]}")
            fused = False
        if fused:
            # Channels-last from the start: the stem's convolutions keep the memory format, so
            # every later op reads each pixel's channels contiguously (a copy of the 3-channel
            # image, no more).
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv_stem(x)
        for (conv, (block_attn, block_ff), (grid_attn, grid_ff)), registers in zip(self.layers, self.register_tokens):
            x = ops.mbconv(x, conv, fused)
            t = x.permute(0, 2, 3, 1)  # (B, H, W, C) tokens, a view
            t, regs = ops.window_attention_residual(t, registers, block_attn, "block", fused)
            # tokens and register rows through one feed-forward call (one launch when fused)
            t, regs = ops.feedforward_residual(t, block_ff, fused, extra=regs)
            image_registers = regs.mean(dim=(1, 2))  # (B, r, C)
            t, _ = ops.window_attention_residual(
                t, image_registers, grid_attn, "grid", fused, need_register_outputs=False
            )
            t = ops.feedforward_residual(t, grid_ff, fused)
            x = t.permute(0, 3, 1, 2)
        return self.mlp_head(x)

    def _forward_in_autocast_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fused forward under ``torch.autocast``: the kernels compute in one dtype per op,
        so instead of autocast's op-by-op casts the whole forward runs in the autocast dtype,
        with autocast off: the input and every parameter cast to ``dtype`` but the weights of
        train-mode BatchNorms when autograd records (see _parameters_in; autocast casts the
        weights of every convolution and linear layer the same way; the casts are differentiable,
        so gradients reach the fp32 parameters in fp32), the buffers (BatchNorm running
        statistics) the module's own, updated in place in training. LayerNorm and softmax
        statistics are fp32 inside the kernels, as autocast computes those ops in fp32."""
        params = self._parameters_in(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return functional_call(self, params, (x.to(dtype),), strict=False)

    def _parameters_in(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every parameter cast to ``dtype``. With autograd recording, cast anew at each call (the
        casts are part of the graph, as autocast's are), except the weights and biases of
        train-mode BatchNorms, which the fused MBConv takes in their own dtype (they stay out of
        the dict: functional_call uses the module's; autocast too runs BatchNorm in fp32), so
        they need neither a cast nor a cast of their gradients back; for inference, cast once
        and reused until a parameter or buffer changes, so the casts, and the folded BatchNorm
        weights derived from them, are not recomputed at every forward."""

        def cast(skip=frozenset()):
            return {name: p.to(dtype) for name, p in self.named_parameters() if name not in skip}

        cache = _cast_parameters.get(dtype)
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            if not torch.is_grad_enabled():
                return cast()
            return cast({f"{prefix}.{name}" for prefix, m in self.named_modules()
                         if isinstance(m, nn.BatchNorm2d) and m.training for name, _ in m.named_parameters()})
        return cache.get(self, cast)
