"""Fused Triton kernels for mHC (manifold-constrained hyper-connections), decode rows and prefill chunks.

mhc_pre in two launches instead of ~130 small ones:
  1. split-K partial dot products of the flattened streams [S, K = n*d] with the 24 mixing rows of
     ``fn`` [24, K], and partial sums of squares (for the RMS normalisation, applied afterwards: it
     is linear), all float32; one row per program for a few rows (decode), a tile of rows per
     program for a chunk (tensor-core dots that read the streams once, ``chunk_partials``), the
     tile converted to float32 (the engine's streams are float32; bf16 ones are widened), 3xTF32
     dots. (A bf16 path, fn split in three bf16 parts and one bf16 dot per part, ran 4x faster on bf16
     streams but disagreed with the reference on an H100 at 6400 rows while passing at 700, and the
     engine never has bf16 streams: removed; it is in git history.)
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
# a few rows (decode): K columns per mixing-partials program (128: 128 programs per row for the 24
# mixes at V4 sizes; latency, not bytes, bounds it) and warps of the epilogue (partials reduced,
# Sinkhorn, collapse; also a chunk's). bench/profile_decode.py --compare mhc.DECODE.block_k=256 times
# other values in the decode step (H100, 16 layers: 256 and 2 or 4 warps within the step's noise).
DECODE = {"block_k": 128, "epilogue_warps": 1}
BLOCK_D = 512
# a chunk's mixing partials (more than MAX_ROWS rows): rows per program, K columns per step, K cut
# into "splits" ranges (more for a short chunk: at least MIN_PROGRAMS programs, at most the decode
# path's cdiv(K, DECODE["block_k"]) ranges), warps, pipeline stages. H100, a 6400-row chunk of float32
# streams (python3 bench/tune_prefill.py --only mhc, h100_tune_prefill_mhc.json): 64 x 32, 16 ranges,
# 4 warps, 4 stages 0.347 ms (warp-group tensor-core dots, no register spills) against 0.856 ms for the
# 32 x 128 tile before (255 registers + a stack on sm_90, mma.sync dots); all within 3.1e-6.
TILE = {"rows": 64, "k": 32, "splits": 16, "warps": 4, "stages": 4}
MIN_PROGRAMS = 132  # one per SM of an H100 / H200


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
    [M, K] against fn [NMIX, K]: partial mixes part[row, pid1, :MIXP] and sums of squares
    ss[row, pid1], float32; the dots at PRECISION ("tf32x3" on the GPU: three TF32 products,
    float32-level accuracy; the FMA path, "ieee", ran 9x slower than the bytes allow on the H200)."""
    pid_m, p = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    rj = tl.arange(0, MIXP)
    acc = tl.zeros([BLOCK_M, MIXP], tl.float32)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, SPAN, BLOCK_K):
        rk = p * SPAN + k0 + tl.arange(0, BLOCK_K)
        km = (rk < K) & (k0 + tl.arange(0, BLOCK_K) < SPAN)
        xf = tl.load(s_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + rj[:, None] * K + rk[None, :], mask=(rj[:, None] < NMIX) & km[None, :], other=0.0)
        acc += tl.dot(xf, tl.trans(f.to(tl.float32)), input_precision=PRECISION)
        ss += tl.sum(xf * xf, 1)
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


def chunk_partials(flat: torch.Tensor, fn: torch.Tensor):
    """A chunk's mixing partials: flat streams [S, K], fn [NMIX, K] -> part [S, P, MIXP] and ss
    [S, P] float32 over P ranges of K (TILE's shapes)."""
    S, K = flat.shape
    nmix = fn.shape[0]
    mixp = triton.next_power_of_2(nmix)
    t = TILE
    rows = triton.cdiv(S, t["rows"])
    P = min(triton.cdiv(K, DECODE["block_k"]), max(t["splits"], triton.cdiv(MIN_PROGRAMS, rows)))
    span = triton.cdiv(triton.cdiv(K, P), t["k"]) * t["k"]
    P = triton.cdiv(K, span)
    part = torch.empty((S, P, mixp), device=flat.device, dtype=torch.float32)
    ss = torch.empty((S, P), device=flat.device, dtype=torch.float32)
    _mix_partials_rows[(rows, P)](flat, fn.contiguous(), part, ss, S, K, P, span, NMIX=nmix, MIXP=mixp,
                                  BLOCK_M=t["rows"], BLOCK_K=t["k"], PRECISION=_precision(),
                                  num_warps=t["warps"], num_stages=t["stages"])
    return part, ss


def mhc_pre_triton(streams, fn, base, scale, iters: int, hc_eps: float, norm_eps: float):
    """Same contract as kernels.mhc.mhc_pre, any number of rows: one row per program in the mixing
    partials up to MAX_ROWS rows (decode), a tile of rows per program beyond (a prefill chunk)."""
    S, n, d = streams.shape
    streams = streams.contiguous()
    K, nmix = n * d, (2 + n) * n
    mixp = triton.next_power_of_2(nmix)
    dev = streams.device
    if S > MAX_ROWS:
        part, ss = chunk_partials(streams.reshape(S, K), fn)
    else:
        block_k = DECODE["block_k"]
        P = triton.cdiv(K, block_k)
        part = torch.empty((S, P, mixp), device=dev, dtype=torch.float32)
        ss = torch.empty((S, P), device=dev, dtype=torch.float32)
        _mix_partials[(S, P)](streams, fn.contiguous(), part, ss, K, P, NMIX=nmix, MIXP=mixp, BLOCK_K=block_k,
                              **pdl.launch(dev))
    P = part.shape[1]
    x = torch.empty((S, d), device=dev, dtype=streams.dtype)
    post = torch.empty((S, n), device=dev, dtype=torch.float32)
    comb = torch.empty((S, n, n), device=dev, dtype=torch.float32)
    _pre_epilogue[(S, triton.cdiv(d, BLOCK_D))](  # one warp (default): 20 Sinkhorn rounds of warp-local sums
        streams, part, ss, base.float().contiguous(), scale.float().contiguous(), x, post, comb, d, P,
        norm_eps, hc_eps, ITERS=iters, N=n, MIXP=mixp, PP=max(2, triton.next_power_of_2(P)), BLOCK_D=BLOCK_D,
        num_warps=DECODE["epilogue_warps"],
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
