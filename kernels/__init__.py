"""Triton kernels and their thin launchers (installed as ``maxvit_fast.kernels``).

Each module holds the ``@triton.jit`` functions of one fused operation and a launcher that
takes tensors, checks shapes and strides, and picks the grid. No nn.Modules here.
"""

import os

# Whether the @triton.jit functions of this package are created under the Triton interpreter.
# triton.jit reads TRITON_INTERPRET when a function is decorated, i.e. when the kernel modules
# are imported, so this must be read at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_upcasts_dot(dtype) -> bool:
    """Whether a kernel's tl.dot operands of this dtype must be upcast to fp32: only bf16 under the
    interpreter (its bf16 tl.dot multiplies raw bit patterns, triton issue 11584). Its fp16 dot
    is right (numpy matmul into the fp32 accumulator), so fp16 runs the GPU's code path under
    test too."""
    import torch

    return INTERPRET and dtype == torch.bfloat16


def seed_pointer(seed, dropout: bool, placeholder):
    """The dropout seed as the kernels take it: a 1-element int64 tensor on the kernels' device,
    read in the kernel (so a captured CUDA graph uses each replay's seed). ``seed`` is such a
    tensor, or an int (copied to the device; tests and direct launcher calls). Without dropout
    the kernels never read it and ``placeholder`` (any tensor of the launch) stands in, so an
    eval-mode launch allocates nothing."""
    import torch

    if not dropout:
        return placeholder
    if seed is None:
        raise ValueError("dropout needs a seed (an int or a 1-element int64 tensor)")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"the seed tensor must hold one int64, got {seed.dtype} {tuple(seed.shape)}")
        return seed.to(placeholder.device).reshape(1)
    return torch.tensor([int(seed)], dtype=torch.int64, device=placeholder.device)
