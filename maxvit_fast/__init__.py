"""maxvit_fast: fused Triton kernels for MaxViT with register tokens."""

from .dispatch import FusedFallbackWarning, reset_fallback_warnings
from .model import MaxViT, clear_fused_caches, image_size_ok, nearest_valid_sizes
from .presets import maxvit_base, maxvit_large, maxvit_small, maxvit_tiny

__all__ = [
    "MaxViT",
    "FusedFallbackWarning",
    "reset_fallback_warnings",
    "clear_fused_caches",
    "image_size_ok",
    "nearest_valid_sizes",
    "maxvit_tiny",
    "maxvit_small",
    "maxvit_base",
    "maxvit_large",
]
__version__ = "0.1.0"
