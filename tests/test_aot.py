"""The ahead-of-time compile helper, on two small kernels (CPU only: no GPU needed)."""

import pytest

from maxvit_fast.aot import compile_kernel

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", [80, 90])
def test_elementwise_kernel_reports_resources(arch):
    k = compile_kernel(
        "tests.aot_sample_kernels", "scale_kernel",
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": 256}, arch=arch,
    )
    assert 0 < k.registers <= 64
    assert not k.spills
    assert k.uses("LDG") and k.uses("STG")
    assert not k.uses("HMMA")
    assert k.arch == arch


@pytest.mark.parametrize("arch,mma", [(80, "HMMA"), (90, "HMMA")])
def test_fp16_dot_uses_tensor_cores(arch, mma):
    k = compile_kernel(
        "tests.aot_sample_kernels", "tile_matmul_kernel",
        {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
        {"BLOCK": 64}, arch=arch,
    )
    assert k.uses(mma) or k.uses("HGMMA"), sorted(k.sass_opcodes)
    assert not k.spills
