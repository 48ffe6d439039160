"""Rounding helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. bf16 on the bits: the Triton interpreter truncates fp32 -> bf16
    conversions (the GPU's cvt.rn does not), and a one-element result such as a running statistic would then be
    a whole ulp off in the CPU tests, hiding the kernels' own error."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
