"""A kernel for tests/test_gpu_prefill.py: actquant.to_e4m3 both ways (the float32 rounding the
interpreter takes, the hardware conversion the GPU takes) on the same rows."""

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.attention import _pow2_exponent
from dsv4.kernels.triton.actquant import to_e4m3


@triton.jit
def _both(v_ptr, a_ptr, b_ptr, C: tl.constexpr):
    r = tl.program_id(0)
    c = tl.arange(0, C)[None, :]
    v = tl.load(v_ptr + r * C + c)
    ex = _pow2_exponent(tl.max(tl.abs(v), 1), 448.0)
    tl.store(a_ptr + r * C + c, to_e4m3(v, ex, True).to(tl.uint8, bitcast=True))
    tl.store(b_ptr + r * C + c, to_e4m3(v, ex, False).to(tl.uint8, bitcast=True))


def rounded_both(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [R, C] float32 (C a power of two) -> (float32-rounded, hardware-rounded) e4m3 bits [R, C] uint8,
    each row over its own power-of-two scale (its largest magnitude / 448, rounded up)."""
    R, C = rows.shape
    a = torch.empty((R, C), dtype=torch.uint8, device=rows.device)
    b = torch.empty_like(a)
    _both[(R,)](rows.contiguous(), a, b, C=C)
    return a, b
