"""maxvit_fast: fused Triton kernels for MaxViT with register tokens."""

from .dispatch import FusedFallbackWarning, reset_fallback_warnings
from .model import MaxViT, image_size_ok, nearest_valid_sizes

__all__ = ["MaxViT", "FusedFallbackWarning", "reset_fallback_warnings", "image_size_ok", "nearest_valid_sizes"]
__version__ = "0.1.0"
