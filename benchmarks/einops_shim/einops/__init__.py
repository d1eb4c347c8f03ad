"""A stand-in for einops, for a GPU image that lacks it (``gpu_run.sh`` puts this folder on
PYTHONPATH only when ``import einops`` fails; it never shadows a real einops).

It implements only what maxvit_fast uses: ``einops.layers.torch.Reduce`` for patterns whose
output axes are a subsequence of the input axes (``"b c h w -> b c", "mean"``) and
``einops.layers.torch.Rearrange`` for patterns that only insert unit axes (``"b c -> b c 1 1"``).
Anything else raises NotImplementedError.
"""

__version__ = "0+maxvit_fast_shim"
