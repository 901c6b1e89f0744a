"""Faithful mode's activation quantisation inside the GEMM / GEMV / expert kernels (no launch of its
own): each 1 x 128 slice of an activation row through FP8 e4m3 with one ue8m0 scale, returned as
the float32 values the reference multiplies (kernels/quant.act_quant_dequant). The rounding runs in
float32 arithmetic (attention._round_e4m3), so the CPU interpreter and the GPU give the same values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import _pow2, _pow2_exponent, _round_e4m3

BLOCK = 128  # kernels.formats.FP8_BLOCK


@triton.jit
def fake_quant_rows(v):
    """v [R, 128] float32, one slice per row -> the same rows through e4m3 x 2^(e-127)."""
    e = _pow2_exponent(tl.max(tl.abs(v), 1), 448.0)
    q = _round_e4m3(tl.minimum(tl.maximum(v * _pow2(254 - e)[:, None], -448.0), 448.0))
    return q * _pow2(e)[:, None]


@triton.jit
def fake_quant_vector(v, N: tl.constexpr):
    """v [N] float32 (N a multiple of 128, slices aligned) -> the same through e4m3 per slice."""
    return tl.reshape(fake_quant_rows(tl.reshape(v, [N // 128, 128])), [N])


@triton.jit
def fake_quant_pairs(xe, xo, NP: tl.constexpr):
    """The even and odd elements xe, xo [NP] of 2 * NP consecutive values (slices of 128 aligned,
    NP a multiple of 64) -> both through e4m3 per 128-slice (amax over the slice's 64 + 64)."""
    ge = tl.reshape(xe, [NP // 64, 64])
    go = tl.reshape(xo, [NP // 64, 64])
    e = _pow2_exponent(tl.maximum(tl.max(tl.abs(ge), 1), tl.max(tl.abs(go), 1)), 448.0)
    inv = _pow2(254 - e)[:, None]
    sc = _pow2(e)[:, None]
    qe = _round_e4m3(tl.minimum(tl.maximum(ge * inv, -448.0), 448.0)) * sc
    qo = _round_e4m3(tl.minimum(tl.maximum(go * inv, -448.0), 448.0)) * sc
    return tl.reshape(qe, [NP]), tl.reshape(qo, [NP])
