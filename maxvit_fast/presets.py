"""The MaxViT variants of the paper (Tu et al., 2022, table 1), with register tokens.

``maxvit_tiny(**overrides)`` etc. return a :class:`maxvit_fast.MaxViT`; any constructor argument
can be overridden (e.g. ``maxvit_tiny(fused=True, num_classes=10)``). The stem width follows
``dim`` unless ``dim_conv_stem`` is given.
"""

from __future__ import annotations

from .model import MaxViT

# Architecture of each variant: block width of the first stage and blocks per stage.
VARIANTS = {
    "tiny": dict(dim=64, depth=(2, 2, 5, 2)),
    "small": dict(dim=96, depth=(2, 2, 5, 2)),
    "base": dict(dim=96, depth=(2, 6, 14, 2)),
    "large": dict(dim=128, depth=(2, 6, 14, 2)),
}

# Shared by every variant.
DEFAULTS = dict(num_classes=1000, window_size=7, num_register_tokens=4, dim_head=32)


def preset_kwargs(name: str, **overrides) -> dict:
    """The MaxViT constructor arguments of variant ``name`` with ``overrides`` applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(VARIANTS)}")
    kwargs = {**DEFAULTS, **VARIANTS[name], **overrides}
    kwargs.setdefault("dim_conv_stem", kwargs["dim"])
    return kwargs


def build_preset(name: str, **overrides) -> MaxViT:
    return MaxViT(**preset_kwargs(name, **overrides))


def maxvit_tiny(**overrides) -> MaxViT:
    """MaxViT-T: dim 64, depth (2, 2, 5, 2)."""
    return build_preset("tiny", **overrides)


def maxvit_small(**overrides) -> MaxViT:
    """MaxViT-S: dim 96, depth (2, 2, 5, 2)."""
    return build_preset("small", **overrides)


def maxvit_base(**overrides) -> MaxViT:
    """MaxViT-B: dim 96, depth (2, 6, 14, 2)."""
    return build_preset("base", **overrides)


def maxvit_large(**overrides) -> MaxViT:
    """MaxViT-L: dim 128, depth (2, 6, 14, 2)."""
    return build_preset("large", **overrides)


PRESETS = {"tiny": maxvit_tiny, "small": maxvit_small, "base": maxvit_base, "large": maxvit_large}
