"""Test setup.

Without a CUDA device the Triton kernels run through the Triton interpreter on the CPU. The
interpreter must be switched on before any @triton.jit function is created, i.e. before
maxvit_fast.kernels is imported, hence before the imports below. On a GPU machine it stays
off, so the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Create every kernel now, in the mode chosen above. A kernel module first imported later, while
# a test has TRITON_INTERPRET switched off, would be created compiled for the whole session.
import maxvit_fast.kernels.batchnorm_backward  # noqa: E402,F401
import maxvit_fast.kernels.batchnorm_gelu  # noqa: E402,F401
import maxvit_fast.kernels.batchnorm_statistics  # noqa: E402,F401
import maxvit_fast.kernels.depthwise_conv  # noqa: E402,F401
import maxvit_fast.kernels.expand_depthwise_conv  # noqa: E402,F401
import maxvit_fast.kernels.feedforward  # noqa: E402,F401
import maxvit_fast.kernels.layernorm_linear  # noqa: E402,F401
import maxvit_fast.kernels.pointwise_conv  # noqa: E402,F401
import maxvit_fast.kernels.squeeze_excitation  # noqa: E402,F401
import maxvit_fast.kernels.window_attention  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
