"""Faithful mode's activation quantisation: each 1 x 128 slice of an activation row through FP8 e4m3
with one ue8m0 scale, giving the values the reference multiplies (kernels/quant.act_quant_dequant).
Inside the decode GEMV / expert kernels' K steps (no launch of its own), in the grouped expert
kernel's epilogue (h), or as one pass over a prefill chunk's rows: ``quantise_rows`` (bf16 values, for
the grouped expert GEMM's bf16 dots) or ``quantise_rows_fp8`` (e4m3 bytes + ue8m0 exponent bytes, for
the FP8 x FP8 GEMM of the dense FP8 linears). The rounding runs in
float32 arithmetic (attention._e4m3_at), so the CPU interpreter and the GPU give the same values
(``to_e4m3``, for e4m3 bytes out, takes the hardware's round-to-nearest-even conversion on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _e4m3_at, _pow2, _pow2_exponent

BLOCK = 128  # kernels.formats.FP8_BLOCK


@triton.jit
def _through_e4m3(g, e):
    """g [R, C] float32 through e4m3 with the per-row ue8m0 exponent bytes e [R] (int32)."""
    return _e4m3_at(g, e) * _pow2(e)[:, None]


@triton.jit
def to_e4m3(v, ex, IEEE: tl.constexpr):
    """v [R, C] float32 / 2^(ex - 127) per row (ex [R] int32 ue8m0 bytes from _pow2_exponent, so that
    |v| / 2^(ex - 127) <= 448) as e4m3, rounded to nearest even: on the GPU by the hardware's conversion
    (staged_experts' up kernel: its epilogue 1437 sm_90 instructions against 1982 with the float32 rounding), in the
    interpreter by _e4m3_at's float32 arithmetic (its own conversion need not round to even).
    tests/test_gpu_prefill.py holds the two to the same values."""
    if IEEE:
        out = _e4m3_at(v, ex).to(tl.float8e4nv)
    else:
        out = (v * _pow2(254 - ex)[:, None]).to(tl.float8e4nv)
    return out


@triton.jit
def fake_quant_rows(v):
    """v [R, 128] float32, one slice per row -> the same rows through e4m3 x 2^(e-127)."""
    return _through_e4m3(v, _pow2_exponent(tl.max(tl.abs(v), 1), 448.0))


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
    qe, qo = _through_e4m3(ge, e), _through_e4m3(go, e)
    return tl.reshape(qe, [NP]), tl.reshape(qo, [NP])


@triton.jit
def _quantise_rows(x_ptr, y_ptr, K, sxm, NB: tl.constexpr):
    """Row m, slices [pid * NB, +NB) of x [M, K] (row stride sxm) -> y [M, K] bf16 (contiguous)."""
    m, pid = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    k = pid * NB * 128 + tl.arange(0, NB * 128)
    km = k < K
    v = tl.load(x_ptr + m * sxm + k, mask=km, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * K + k, fake_quant_vector(v, NB * 128).to(tl.bfloat16), mask=km)


def quantise_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (unit column stride) -> bf16 [M, K] holding kernels/quant.act_quant_dequant(x)
    exactly (an e4m3 value times a power of two fits bf16): the grouped expert GEMM then multiplies it
    with one bf16 dot per tile, at half the bytes of float32 rows. One launch."""
    M, K = x.shape
    y = torch.empty((M, K), device=x.device, dtype=torch.bfloat16)
    nb = 4 if K >= 512 else 1
    _quantise_rows[(M, triton.cdiv(K, nb * 128))](x, y, K, x.stride(0), NB=nb, num_warps=4)
    return y


@triton.jit
def _quantise_rows_fp8(x_ptr, q_ptr, e_ptr, K, sxm, NB: tl.constexpr):
    """Row m, slices [pid * NB, +NB) of x [M, K] -> q [M, K] e4m3 bits (uint8) and the slices'
    ue8m0 exponent bytes e [M, ceil(K / 128)] (uint8)."""
    m, pid = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    k = pid * NB * 128 + tl.arange(0, NB * 128)
    km = k < K
    v = tl.reshape(tl.load(x_ptr + m * sxm + k, mask=km, other=0.0).to(tl.float32), [NB, 128])
    e = _pow2_exponent(tl.max(tl.abs(v), 1), 448.0)
    q = _e4m3_at(v, e)
    tl.store(q_ptr + m * K + k, tl.reshape(q, [NB * 128]).to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=km)
    nk = (K + 127) // 128
    s = pid * NB + tl.arange(0, NB)
    tl.store(e_ptr + m * nk + s, e.to(tl.uint8), mask=s < nk)


def quantise_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit column stride) -> (q [M, K] uint8: e4m3 bits, e [M, ceil(K / 128)] uint8:
    ue8m0 exponent bytes), with q x 2^(e - 127) per 128-slice == kernels/quant.act_quant_dequant(x):
    faithful mode's activations in the form the FP8 tensor-core GEMM reads (half bf16's bytes). One launch."""
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.uint8)
    e = torch.empty((M, triton.cdiv(K, BLOCK)), device=x.device, dtype=torch.uint8)
    nb = 4 if K >= 512 else 1
    _quantise_rows_fp8[(M, triton.cdiv(K, nb * 128))](x, q, e, K, x.stride(0), NB=nb, num_warps=4)
    return q, e
