"""Fused Triton kernels for mHC (manifold-constrained hyper-connections), decode rows and prefill chunks.

mhc_pre in two launches instead of ~130 small ones:
  1. split-K partial dot products of the flattened streams with the 24 mixing rows of ``fn``, and
     partial sums of squares (for the RMS normalisation, applied afterwards: it is linear); one row
     per program for a few rows (decode), BLOCK_ROWS rows per program for a chunk (3xTF32
     tensor-core dots that read the streams once);
  2. per (row, block of d): reduce the partials, then sigmoid / 2*sigmoid / softmax + 20 Sinkhorn
     iterations on the n x n matrix, all in registers, and the pre-weighted collapse of the streams.
mhc_post in one launch: post_j * out + sum_i comb[i, j] * stream_i.
Shapes as kernels/mhc.py; n (hc_mult) must be a power of two (4 in V4), else the reference runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .attention import _precision


MAX_ROWS = 16
BLOCK_K = 128  # 128 programs per row for the 24 mixes at V4 sizes (latency, not bytes, bounds it)
BLOCK_D = 512
BLOCK_ROWS = 32  # a chunk's rows per program in the mixing partials; K cut into CHUNK_SPLITS ranges
CHUNK_SPLITS = 8


@triton.jit
def _mix_partials(s_ptr, fn_ptr, part_ptr, ss_ptr, K, P, NMIX: tl.constexpr, MIXP: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row, p = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rk = p * BLOCK_K + tl.arange(0, BLOCK_K)
    km = rk < K
    x = tl.load(s_ptr + row * K + rk, mask=km, other=0.0).to(tl.float32)
    rj = tl.arange(0, MIXP)
    f = tl.load(fn_ptr + rj[:, None] * K + rk[None, :], mask=(rj[:, None] < NMIX) & km[None, :], other=0.0)
    tl.store(part_ptr + (row * P + p) * MIXP + rj, tl.sum(f.to(tl.float32) * x[None, :], 1))
    tl.store(ss_ptr + row * P + p, tl.sum(x * x, 0))


@triton.jit
def _mix_partials_rows(s_ptr, fn_ptr, part_ptr, ss_ptr, M, K, P, SPAN, NMIX: tl.constexpr, MIXP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Rows [pid0 * BLOCK_M, +BLOCK_M) and columns [pid1 * SPAN, +SPAN) of the flattened streams
    [M, K]: partial mixes part[row, pid1, :NMIX] and sums of squares ss[row, pid1]. PRECISION:
    "tf32x3" on the GPU (three TF32 tensor-core products, float32-level accuracy: ~2^-22 per product;
    the FMA path, "ieee", ran 9x slower than the bytes allow on the H200), "ieee" in the interpreter."""
    pid_m, p = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    rj = tl.arange(0, MIXP)
    acc = tl.zeros([BLOCK_M, MIXP], tl.float32)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, SPAN, BLOCK_K):
        rk = p * SPAN + k0 + tl.arange(0, BLOCK_K)
        km = (rk < K) & (k0 + tl.arange(0, BLOCK_K) < SPAN)
        x = tl.load(s_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + rj[:, None] * K + rk[None, :], mask=(rj[:, None] < NMIX) & km[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(f.to(tl.float32)), input_precision=PRECISION)
        ss += tl.sum(x * x, 1)
    tl.store(part_ptr + (rm[:, None] * P + p) * MIXP + rj[None, :], acc, mask=mm[:, None])
    tl.store(ss_ptr + rm * P + p, ss, mask=mm)


@triton.jit
def _pre_epilogue(s_ptr, part_ptr, ss_ptr, base_ptr, scale_ptr, x_ptr, post_ptr, comb_ptr, D, P,
                  norm_eps, hc_eps, ITERS: tl.constexpr, N: tl.constexpr, MIXP: tl.constexpr,
                  PP: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row, db = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rp = tl.arange(0, PP)
    pm = rp < P
    r = tl.rsqrt(tl.sum(tl.load(ss_ptr + row * P + rp, mask=pm, other=0.0), 0) / (N * D) + norm_eps)
    ri = tl.arange(0, N)
    rij = tl.arange(0, N * N)
    base = part_ptr + row * P * MIXP + rp[:, None] * MIXP
    pre_m = tl.sum(tl.load(base + ri[None, :], mask=pm[:, None], other=0.0), 0) * r
    post_m = tl.sum(tl.load(base + N + ri[None, :], mask=pm[:, None], other=0.0), 0) * r
    comb_m = tl.sum(tl.load(base + 2 * N + rij[None, :], mask=pm[:, None], other=0.0), 0) * r
    sc0 = tl.load(scale_ptr)
    sc1 = tl.load(scale_ptr + 1)
    sc2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(pre_m * sc0 + tl.load(base_ptr + ri)) + hc_eps
    post = 2.0 * tl.sigmoid(post_m * sc1 + tl.load(base_ptr + N + ri))
    logits = tl.reshape(comb_m * sc2 + tl.load(base_ptr + 2 * N + rij), [N, N])
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    comb = e / tl.sum(e, 1)[:, None] + hc_eps
    comb = comb / (tl.sum(comb, 0)[None, :] + hc_eps)
    for _ in range(ITERS - 1):
        comb = comb / (tl.sum(comb, 1)[:, None] + hc_eps)
        comb = comb / (tl.sum(comb, 0)[None, :] + hc_eps)
    rd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    st = tl.load(s_ptr + row * N * D + ri[:, None] * D + rd[None, :], mask=dm[None, :], other=0.0)
    x = tl.sum(pre[:, None] * st.to(tl.float32), 0)
    tl.store(x_ptr + row * D + rd, x.to(x_ptr.dtype.element_ty), mask=dm)
    if db == 0:
        tl.store(post_ptr + row * N + ri, post)
        tl.store(comb_ptr + row * N * N + rij, tl.reshape(comb, [N * N]))


@triton.jit
def _post(out_ptr, s_ptr, post_ptr, comb_ptr, y_ptr, D, N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row, db = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    ri = tl.arange(0, N)
    rd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    st = tl.load(s_ptr + row * N * D + ri[:, None] * D + rd[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
    comb = tl.load(comb_ptr + row * N * N + ri[:, None] * N + ri[None, :])  # [i, j]
    post = tl.load(post_ptr + row * N + ri)
    o = tl.load(out_ptr + row * D + rd, mask=dm, other=0.0).to(tl.float32)
    mixed = tl.sum(comb[:, :, None] * st[:, None, :], 0)  # [j, d]
    y = post[:, None] * o[None, :] + mixed
    tl.store(y_ptr + row * N * D + ri[:, None] * D + rd[None, :], y.to(y_ptr.dtype.element_ty), mask=dm[None, :])


def mhc_supported(streams: torch.Tensor, fn_or_out: torch.Tensor, *args) -> bool:
    """Any number of rows, a power-of-two stream count >= 2; no autograd (mhc_pre and mhc_post)."""
    S, n, _ = streams.shape
    return 0 < S and n & (n - 1) == 0 and n >= 2 and not (streams.requires_grad or fn_or_out.requires_grad)


def mhc_post_supported(out: torch.Tensor, streams: torch.Tensor, *args) -> bool:
    return mhc_supported(streams, out)


def mhc_pre_triton(streams, fn, base, scale, iters: int, hc_eps: float, norm_eps: float):
    """Same contract as kernels.mhc.mhc_pre, any number of rows: one row per program in the mixing
    partials up to MAX_ROWS rows (decode), BLOCK_ROWS rows per program beyond (a prefill chunk)."""
    S, n, d = streams.shape
    streams = streams.contiguous()
    K, nmix = n * d, (2 + n) * n
    mixp = triton.next_power_of_2(nmix)
    P = triton.cdiv(K, BLOCK_K)
    dev = streams.device
    if S > MAX_ROWS:  # a chunk: BLOCK_ROWS rows per program, K in CHUNK_SPLITS ranges
        P = min(CHUNK_SPLITS, P)
        span = triton.cdiv(triton.cdiv(K, P), BLOCK_K) * BLOCK_K
        P = triton.cdiv(K, span)
    part = torch.empty((S, P, mixp), device=dev, dtype=torch.float32)
    ss = torch.empty((S, P), device=dev, dtype=torch.float32)
    if S > MAX_ROWS:
        _mix_partials_rows[(triton.cdiv(S, BLOCK_ROWS), P)](streams, fn.contiguous(), part, ss, S, K, P, span,
                                                            NMIX=nmix, MIXP=mixp, BLOCK_M=BLOCK_ROWS, BLOCK_K=BLOCK_K,
                                                            PRECISION=_precision())
    else:
        _mix_partials[(S, P)](streams, fn.contiguous(), part, ss, K, P, NMIX=nmix, MIXP=mixp, BLOCK_K=BLOCK_K,
                              **pdl.launch(dev))
    x = torch.empty((S, d), device=dev, dtype=streams.dtype)
    post = torch.empty((S, n), device=dev, dtype=torch.float32)
    comb = torch.empty((S, n, n), device=dev, dtype=torch.float32)
    _pre_epilogue[(S, triton.cdiv(d, BLOCK_D))](  # one warp: 20 Sinkhorn rounds of warp-local sums
        streams, part, ss, base.float().contiguous(), scale.float().contiguous(), x, post, comb, d, P,
        norm_eps, hc_eps, ITERS=iters, N=n, MIXP=mixp, PP=max(2, triton.next_power_of_2(P)), BLOCK_D=BLOCK_D, num_warps=1,
        **pdl.launch(dev))
    return x, post, comb


def mhc_post_triton(out, streams, post, comb):
    """Same contract as kernels.mhc.mhc_post (out [S, d], streams [S, n, d]) -> [S, n, d]."""
    S, n, d = streams.shape
    y = torch.empty_like(streams, memory_format=torch.contiguous_format)
    _post[(S, triton.cdiv(d, BLOCK_D))](out.contiguous(), streams.contiguous(), post.float().contiguous(),
                                        comb.float().contiguous(), y, d, N=n, BLOCK_D=BLOCK_D,
                                        **pdl.launch(streams.device))
    return y


@triton.jit
def _rms_norm(x_ptr, w_ptr, y_ptr, N, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK)
    m = r < N
    x = tl.load(x_ptr + row * N + r, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + r, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + r, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> bool:
    """Rows up to 16384 wide; no autograd."""
    return not (x.numel() == 0 or x.shape[-1] > 16384 or x.requires_grad or (weight is not None and weight.requires_grad))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Same contract as kernels.norm.rms_norm: one program per row (rows up to 16384 wide)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    y = torch.empty_like(x2)
    w = weight.contiguous() if weight is not None else x2
    _rms_norm[(x2.shape[0],)](x2, w, y, N, eps, HAS_W=weight is not None, BLOCK=triton.next_power_of_2(N),
                              **pdl.launch(x2.device))
    return y.reshape(x.shape)
