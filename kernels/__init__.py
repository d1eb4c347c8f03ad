"""Triton kernels and their thin launchers (installed as ``maxvit_fast.kernels``).

Each module holds the ``@triton.jit`` functions of one fused operation and a launcher that
takes tensors, checks shapes and strides, and picks the grid. No nn.Modules here.
"""

import os

# Whether the @triton.jit functions of this package are created under the Triton interpreter.
# triton.jit reads TRITON_INTERPRET when a function is decorated, i.e. when the kernel modules
# are imported, so this must be read at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
