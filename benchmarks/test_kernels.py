"""Fused kernels vs their peers at MaxViT-T shapes, per stage, forward and forward + backward.

    python -m pytest benchmarks -q                         # everything (GPU; skipped without one)
    python -m pytest benchmarks -q -k "mbconv and stage1"  # a subset
    MAXVIT_BENCH_BATCH=64 MAXVIT_BENCH_DTYPE=fp32 python -m pytest benchmarks

Cases are defined in kernel_cases.py. Each records in ``extra_info`` the achieved GB/s (ideal
bytes / median time), its fraction of the measured copy bandwidth, TFLOP/s and its fraction of a
measured bf16 matmul, the peer's relative error against the reference, and the Triton launches
per call (0 for a fused case means it fell back to the reference: the test then fails).
"""

import math
import warnings

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import kernel_cases as kc  # noqa: E402
from maxvit_fast.bench import time_per_call  # noqa: E402
from maxvit_fast.dispatch import FusedFallbackWarning  # noqa: E402
from maxvit_fast.traffic import triton_launches  # noqa: E402

SPECS = kc.all_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_kernel(benchmark, spec, roofline):
    dtype, batch = kc.default_dtype(), kc.default_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FusedFallbackWarning)
        built = kc.build_case(spec, batch, dtype, "cuda")
        err = kc.check_agreement(built, dtype)
        for _ in range(3):  # includes compilation for the compiled peers
            built.fn()
        with triton_launches() as tally:
            built.fn()
        torch.cuda.synchronize()
    if spec.impl == "fused" and tally.total == 0:
        pytest.fail("the fused op ran no Triton kernel (it fell back to the reference)")

    # Each round is `iterations` back-to-back calls and ends with one synchronisation (the
    # round's last call synchronises), so small ops are not timed as launch + sync latency.
    one = min(time_per_call(built.fn, torch.device("cuda"), 1, 3))
    iterations = max(1, min(200, math.ceil(0.025 / max(one, 1e-7))))
    count = [0]

    def call():
        built.fn()
        count[0] += 1
        if count[0] % iterations == 0:
            torch.cuda.synchronize()

    benchmark.group = f"{spec.op} stage{spec.stage + 1} {spec.direction}"
    benchmark.pedantic(call, rounds=10, iterations=iterations, warmup_rounds=1)
    median = benchmark.stats.stats.median
    copy_bw, mm = roofline["copy_bytes_per_s"], roofline["bf16_matmul_flops_per_s"]
    benchmark.extra_info.update(
        shape=built.shape, batch=batch, dtype=str(dtype), relative_error_vs_reference=err,
        iterations_per_round=iterations, triton_launches_per_call=tally.total, ideal_bytes=built.ideal_bytes,
        gb_per_s=built.ideal_bytes / median / 1e9,
        fraction_of_copy_bandwidth=built.ideal_bytes / median / copy_bw,
        tflops_per_s=built.flops / median / 1e12,
        fraction_of_bf16_matmul=built.flops / median / mm,
    )
    assert math.isfinite(median) and median > 0
