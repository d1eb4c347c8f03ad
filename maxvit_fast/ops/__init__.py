"""Operations of one MaxViT block, each choosing between fused kernels and the reference modules.

The model calls only these; a fused kernel plugs in here without touching the model code.
Activations between them are (B, H, W, C) views ("channels-last" tokens) for the transformer
steps and NCHW tensors (any memory format) for MBConv.
"""

from .feedforward import feedforward_residual
from .mbconv import mbconv
from .window_attention import window_attention_residual, window_partition, window_unpartition

__all__ = [
    "feedforward_residual",
    "mbconv",
    "window_attention_residual",
    "window_partition",
    "window_unpartition",
]
