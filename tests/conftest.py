"""Test setup.

Without a CUDA device the Triton kernels run through the Triton interpreter on the CPU. The
interpreter must be switched on before any @triton.jit function is created, i.e. before
maxvit_fast.kernels is imported, hence before the imports below. On a GPU machine it stays
off, so the same tests run the compiled kernels.

Every test starts from a fresh random seed (fresh inputs on every run); a failing test's report
names its seed, and ``MAXVIT_TEST_SEED=<seed>`` replays that draw.
"""

import os
import random

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
import maxvit_fast.kernels.layernorm_backward  # noqa: E402,F401
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


@pytest.fixture(autouse=True)
def fresh_torch_seed(request):
    """Seed torch (and Python's random) per test: from MAXVIT_TEST_SEED when set, else a fresh
    random seed. The seed is attached to the test's report, so a failure can be replayed."""
    seed = int(os.environ.get("MAXVIT_TEST_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seed = dict(item.user_properties).get("torch_seed")
        if seed is not None:
            report.sections.append(("torch seed", f"replay with MAXVIT_TEST_SEED={seed}"))


@pytest.fixture
def device():
    return DEVICE
