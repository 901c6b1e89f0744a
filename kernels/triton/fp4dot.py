"""MXFP4 x float32 dot products on the integer units (dp4a), float32-accurate, for decode GEMVs.

Why: decoding e2m1 to float costs ~7 ALU ops per weight on the CUDA cores, which caps an MXFP4 GEMV
near a fifth of HBM bandwidth. Here the activation is split once per call into three int8 parts per
group of 32 values (``quant3``):

    x[i] ~= scale[g] * (q0[i] + q1[i] / 254 + q2[i] / 254**2),  scale[g] = max|x in g| / 127,

exact to ~2**-23 of the group's largest value. A weight nibble maps to the integer 2 * e2m1 (in
-12..12) through byte-permute lookups (PTX prmt: 8 nibbles in 6 prmt), and each part's products go
through dp4a (4 int8 products summed per instruction) into int32 sums per 32-group:

    sum_i w[i] x[i] = sum_g 2**(s_g - 128) * scale[g] * (G0_g + G1_g / 254 + G2_g / 254**2)

with s_g the weight's ue8m0 group scale and G_p the integer sums (|G| < 2**16, exact).
``ASM`` picks the inline-PTX version (GPU) or the same integer arithmetic written in Triton ops
(used where inline assembly cannot run: Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.quant import act_quant_dequant

from . import pdl
from .actquant import fake_quant_vector

STEP = tl.constexpr(254.0)  # weight of the next int8 part

# One 32-bit word of packed e2m1 (8 nibbles, element i in bits 4i..4i+3) against two words of each
# of three int8 activation parts (elements 0-3, 4-7): three int32 dot products. Tables: 2 * |e2m1|
# for magnitudes 0..7 = 0 1 2 3 4 6 8 12, and their negatives; the sign bit picks the table per byte.
_DOT8_PTX = tl.constexpr("""
{
.reg .b32 sel, sgn, tp0, tp1, tn0, tn1, p, n, v0, v1, hs, hg;
mov.b32 tp0, 0x03020100;
mov.b32 tp1, 0x0C080604;
mov.b32 tn0, 0xFDFEFF00;
mov.b32 tn1, 0xF4F8FAFC;
and.b32 sel, $3, 0x77777777;
and.b32 sgn, $3, 0x88888888;
shr.u32 sgn, sgn, 1;
or.b32 sgn, sgn, 0x32103210;
prmt.b32 p, tp0, tp1, sel;
prmt.b32 n, tn0, tn1, sel;
prmt.b32 v0, p, n, sgn;
shr.u32 hs, sel, 16;
shr.u32 hg, sgn, 16;
prmt.b32 p, tp0, tp1, hs;
prmt.b32 n, tn0, tn1, hs;
prmt.b32 v1, p, n, hg;
dp4a.s32.s32 $0, v0, $4, 0;
dp4a.s32.s32 $0, v1, $5, $0;
dp4a.s32.s32 $1, v0, $6, 0;
dp4a.s32.s32 $1, v1, $7, $1;
dp4a.s32.s32 $2, v0, $8, 0;
dp4a.s32.s32 $2, v1, $9, $2;
}
""")


@triton.jit
def _quant3(v, NG: tl.constexpr):
    """v [NG * 32] float32 -> (q0, q1, q2 [NG * 32] int8, scale [NG] float32), see the module doc."""
    g = tl.reshape(v, [NG, 32])
    amax = tl.max(tl.abs(g), 1)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    t = g * inv[:, None]
    q0 = tl.floor(t + 0.5)
    r = (t - q0) * STEP
    q1 = tl.floor(r + 0.5)
    q2 = tl.floor((r - q1) * STEP + 0.5)
    return (tl.reshape(q0, [NG * 32]).to(tl.int8), tl.reshape(q1, [NG * 32]).to(tl.int8),
            tl.reshape(q2, [NG * 32]).to(tl.int8), amax / 127.0)


@triton.jit
def _quant3_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr, QX: tl.constexpr, PDL: tl.constexpr):
    """Row m of x [M, K] -> q [M, 3, K] int8 and scales [M, K / 32]; grid (cdiv(K, BLOCK), M).
    QX: x's 128-slices through e4m3 first (faithful mode's activations; BLOCK a multiple of 128)."""
    pdl.wait(PDL)
    pid, m = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rk = pid * BLOCK + tl.arange(0, BLOCK)
    km = rk < K
    v = tl.load(x_ptr + m * stride_x + rk, mask=km, other=0.0).to(tl.float32)
    if QX:
        v = fake_quant_vector(v, BLOCK)
    q0, q1, q2, sc = _quant3(v, BLOCK // 32)
    base = q_ptr + m * 3 * K + rk
    tl.store(base, q0, mask=km)
    tl.store(base + K, q1, mask=km)
    tl.store(base + 2 * K, q2, mask=km)
    rg = pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    tl.store(s_ptr + m * (K // 32) + rg, sc, mask=rg < K // 32)


def quant3(x: torch.Tensor, act_quant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 32 == 0) -> (q [M, 3, K] int8, scales [M, K / 32] float32), one launch;
    act_quant: of x's values through e4m3 per 128-slice (kernels/quant.act_quant_dequant)."""
    M, K = x.shape
    if act_quant and K % 128:
        x, act_quant = act_quant_dequant(x), False  # a short last slice: the reference's rounding, then split
    q = torch.empty((M, 3, K), device=x.device, dtype=torch.int8)
    s = torch.empty((M, K // 32), device=x.device, dtype=torch.float32)
    block = 256 if K % 256 == 0 else 128 if act_quant else 32
    _quant3_kernel[(triton.cdiv(K, block), M)](x, q, s, K, x.stride(0), BLOCK=block, QX=act_quant, num_warps=4,
                                               **pdl.launch(x.device))
    return q, s


@triton.jit
def _nibble_values(n):
    """e2m1 nibbles (int32 0..15) -> 2 * value (int32 -12..12)."""
    m = n & 7
    v = tl.where(m < 5, m, tl.where(m == 5, 6, tl.where(m == 6, 8, 12)))
    return tl.where((n & 8) != 0, -v, v)


@triton.jit
def _group_sums(w, xq, rn, nmask, k0, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ASM: tl.constexpr):
    """Integer sums G_p [BLOCK_N, BLOCK_K / 32] (p = 0, 1, 2) of 2 * e2m1(W[rn, k0:k0+BLOCK_K]) times
    activation part p, per 32-group. w: the uint8 base of W [N, K / 2]; xq: int8 parts [3, K]."""
    NG: tl.constexpr = BLOCK_K // 32
    if ASM:
        NW: tl.constexpr = BLOCK_K // 8
        rw = k0 // 8 + tl.arange(0, NW)
        words = tl.load(w.to(tl.pointer_type(tl.int32)) + rn[:, None] * (K // 8) + rw[None, :],
                        mask=nmask[:, None], other=0)
        xw = tl.multiple_of(xq.to(tl.pointer_type(tl.int32)), 4) + k0 // 4 + tl.arange(0, 2 * NW)
        a0, b0 = _word_pairs(xw, BLOCK_N, NW)
        a1, b1 = _word_pairs(xw + K // 4, BLOCK_N, NW)
        a2, b2 = _word_pairs(xw + K // 2, BLOCK_N, NW)
        d0, d1, d2 = tl.inline_asm_elementwise(_DOT8_PTX, "=r,=r,=r,r,r,r,r,r,r,r", [words, a0, b0, a1, b1, a2, b2],
                                               dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        g0 = tl.sum(tl.reshape(d0, [BLOCK_N, NG, 4]), 2)
        g1 = tl.sum(tl.reshape(d1, [BLOCK_N, NG, 4]), 2)
        g2 = tl.sum(tl.reshape(d2, [BLOCK_N, NG, 4]), 2)
    else:
        rp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w + rn[:, None] * (K // 2) + rp[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        lo = _nibble_values(b & 15)
        hi = _nibble_values(b >> 4)
        g0 = _pair_sums(lo, hi, xq, rp, BLOCK_N, NG)
        g1 = _pair_sums(lo, hi, xq + K, rp, BLOCK_N, NG)
        g2 = _pair_sums(lo, hi, xq + 2 * K, rp, BLOCK_N, NG)
    return g0, g1, g2


@triton.jit
def _word_pairs(ptrs, BLOCK_N: tl.constexpr, NW: tl.constexpr):
    """2 * NW consecutive int32 words (4 int8 each) -> (even words, odd words), each broadcast to
    [BLOCK_N, NW]: the activation bytes of elements 8j..8j+3 and 8j+4..8j+7 of word column j."""
    a, b = tl.split(tl.reshape(tl.load(ptrs), [NW, 2]))
    return tl.broadcast_to(a[None, :], [BLOCK_N, NW]), tl.broadcast_to(b[None, :], [BLOCK_N, NW])


@triton.jit
def _pair_sums(lo, hi, xq, rp, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    prod = lo * tl.load(xq + 2 * rp).to(tl.int32)[None, :] + hi * tl.load(xq + 2 * rp + 1).to(tl.int32)[None, :]
    return tl.sum(tl.reshape(prod, [BLOCK_N, NG, 16]), 2)


@triton.jit
def mx_int_dots(xq, xs, w, s, rn, nmask, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ASM: tl.constexpr):
    """sum_k W[rn, k] x[k] -> [BLOCK_N] float32 for MXFP4 W (uint8 base w [N, K/2], ue8m0 scales s
    [N, K/32]) and x given as quant3 parts xq (int8 [3, K]) and scales xs ([K / 32]); K % BLOCK_K == 0."""
    NG: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g0, g1, g2 = _group_sums(w, xq, rn, nmask, k0, K, BLOCK_N, BLOCK_K, ASM)
        rg = k0 // 32 + tl.arange(0, NG)
        sc = tl.load(s + rn[:, None] * (K // 32) + rg[None, :], mask=nmask[:, None], other=0)
        f = tl.exp2(sc.to(tl.float32) - 128.0) * tl.load(xs + rg)[None, :]
        inner = g0.to(tl.float32) + (g1.to(tl.float32) + g2.to(tl.float32) * (1.0 / STEP)) * (1.0 / STEP)
        acc += tl.sum(inner * f, 1)
    return acc
