"""@triton.jit numerics helpers shared by the kernels.

``to_storage``: cast an fp32 value to the storage dtype. On a GPU ``.to(tl.bfloat16)`` rounds to
nearest even; the Triton interpreter (3.9) truncates fp32 -> bf16 (round toward zero, also when
``fp_downcast_rounding="rtne"`` is asked for), which doubles the bf16 rounding error under test.
With ``EMULATE_BF16_RTNE`` (set by the launchers only under the interpreter, for bf16) the value
is first rounded to the nearest bf16 with integer bit operations, so the truncating cast is
exact and the interpreter matches the GPU's rounding.
"""

import triton
import triton.language as tl


@triton.jit
def gelu(x):
    # exact (erf) GELU, nn.GELU's default
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gelu_derivative(z):
    # d/dz z * Phi(z) = Phi(z) + z * phi(z), exact erf GELU
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


@triton.jit
def round_fp32_to_bf16_nearest_even(x):
    # add half an ulp of bf16 (minus one when the kept bit is even: ties go to even), then
    # clear the 16 bits bf16 drops
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_storage(x, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    # EMULATE_BF16_RTNE (interpreter only) rounds a bf16 store; stores of other dtypes in the same
    # kernel are left alone
    if EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        x = round_fp32_to_bf16_nearest_even(x)
    return x.to(dtype)


@triton.jit
def dot_accumulate(a, b, acc, UPCAST_DOT: tl.constexpr, FP32_IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST_DOT (set only under the interpreter, for bf16): operands
    upcast to fp32 first (the interpreter's bf16 tl.dot is wrong, triton issue 11584).
    FP32_IEEE (fp32 inputs): exact fp32 products, no TF32."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
