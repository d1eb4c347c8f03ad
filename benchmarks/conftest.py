"""Kernel benchmarks (pytest-benchmark): GPU only; every item here is skipped without CUDA.

The Triton interpreter is never used here (it is a correctness tool, not a speed): this file
does not set TRITON_INTERPRET, and without CUDA nothing runs.
"""

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="kernel benchmarks need a CUDA device")
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def roofline():
    """Measured once per session: device-to-device copy bandwidth and bf16 matmul FLOP/s."""
    from maxvit_fast.bench import measure_roofline

    return measure_roofline(torch.device("cuda"))
