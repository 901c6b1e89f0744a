"""Fused Triton kernels for mHC (manifold-constrained hyper-connections), decode rows and prefill chunks.

mhc_pre in two launches instead of ~130 small ones (three for a chunk of bf16 streams):
  1. split-K partial dot products of the flattened streams [S, K = n*d] with the 24 mixing rows of
     ``fn`` [24, K], and partial sums of squares (for the RMS normalisation, applied afterwards: it
     is linear), all float32; one row per program for a few rows (decode), a tile of rows per
     program for a chunk (tensor-core dots that read the streams once, ``chunk_partials``):
     - bf16 streams (faithful mode) are exact in bf16, so only fn needs more bits: a small launch
       splits fn into three bf16 parts hi + mid + lo (~24 bits together; [3, 24, K], 2.25 MB at
       V4 sizes, made per call: not kept per weight), and three bf16 dots per K step, x [rows, k] .
       part^T [k, 32] (24 rows padded to 32), give the three products exactly (bf16 x bf16, float32
       accumulation) from the tile as loaded. H100, a 6400-row chunk (bench/tune_prefill.py --only
       mhc): 0.152 ms against 0.625 ms for the float32 path below, which reads the 210 MB at a third
       of the bandwidth (that timing was of an earlier form: one dot against the parts side by side
       and a reshape to sum them, which disagreed with the reference on the GPU for some tile shapes).
       OFF by default (TILE["split"] False) until its GPU test (tests/test_gpu_kernels.py runs both
       paths) has passed on a GPU;
     - float32 streams (exact mode), and bf16 streams while "split" is off: the tile converted to
       float32, 3xTF32 dots (TILE_F32's shapes);
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
# other values in the decode step.
DECODE = {"block_k": 128, "epilogue_warps": 1}
BLOCK_D = 512
# a chunk's mixing partials (more than MAX_ROWS rows): rows per program, K columns per step, K cut
# into "splits" ranges (more for a short chunk: at least MIN_PROGRAMS programs, at most the decode
# path's cdiv(K, DECODE["block_k"]) ranges), warps, pipeline stages. TILE: bf16 streams with fn split in three
# bf16 parts ("split"; H100 tune: 128 rows x 64, 5 ranges, 8 warps, 4 stages fastest, 0.152 ms, within
# 3% of the other 128-row shapes); TILE_F32: float32 streams, and bf16 ones while "split" is off.
TILE = {"split": False, "rows": 128, "k": 64, "splits": 5, "warps": 8, "stages": 4}
TILE_F32 = {"rows": 32, "k": 128, "splits": 8, "warps": 4, "stages": 3}
MIN_PROGRAMS = 132  # one per SM of an H100 / H200
SPLIT_BLOCK = 1024


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
def _split_fn(fn_ptr, f_ptr, N, BLOCK: tl.constexpr):
    """fn (N values) -> f [3, N] bf16: hi, mid, lo with hi + mid + lo = fn to ~2^-24 relative (each
    part the bf16 rounding of what the parts before leave, exact in float32)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    r = tl.load(fn_ptr + i, mask=m, other=0.0).to(tl.float32)
    hi = r.to(tl.bfloat16)
    r -= hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    tl.store(f_ptr + i, hi, mask=m)
    tl.store(f_ptr + N + i, mid, mask=m)
    tl.store(f_ptr + 2 * N + i, (r - mid.to(tl.float32)).to(tl.bfloat16), mask=m)


@triton.jit
def _mix_partials_rows(s_ptr, f_ptr, part_ptr, ss_ptr, M, K, P, SPAN, NMIX: tl.constexpr, MIXP: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Rows [pid0 * BLOCK_M, +BLOCK_M) and columns [pid1 * SPAN, +SPAN) of the flattened streams
    [M, K]: partial mixes part[row, pid1, :MIXP] and sums of squares ss[row, pid1], float32.
    SPLIT False: f is fn [NMIX, K], the dots at PRECISION ("tf32x3" on the GPU: three TF32 products,
    float32-level accuracy; the FMA path, "ieee", ran 9x slower than the bytes allow on the H200).
    SPLIT True: bf16 streams and f = fn split in bf16 hi, mid, lo [3, NMIX, K]: three bf16
    tensor-core dots per step (one per part, [BLOCK_M, k] x [k, MIXP]) into one float32 accumulator
    give the exact products of the streams' tile as loaded. (One dot against the parts side by side,
    [k, 4 x MIXP], then a reshape to sum the column groups, disagreed with the reference on an H100
    for some tile shapes.) PRECISION "ieee" (the interpreter, whose bf16 dot is not exact): the same
    bf16 values multiplied as float32."""
    pid_m, p = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    rj = tl.arange(0, MIXP)
    acc = tl.zeros([BLOCK_M, MIXP], tl.float32)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, SPAN, BLOCK_K):
        rk = p * SPAN + k0 + tl.arange(0, BLOCK_K)
        km = (rk < K) & (k0 + tl.arange(0, BLOCK_K) < SPAN)
        x = tl.load(s_ptr + rm[:, None] * K + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        fm = (rj[:, None] < NMIX) & km[None, :]
        fp = f_ptr + rj[:, None] * K + rk[None, :]
        xf = x.to(tl.float32)
        if not SPLIT:
            acc += tl.dot(xf, tl.trans(tl.load(fp, mask=fm, other=0.0).to(tl.float32)), input_precision=PRECISION)
        else:
            for part in tl.static_range(3):
                f = tl.load(fp + part * NMIX * K, mask=fm, other=0.0)
                if PRECISION == "ieee":
                    acc = tl.dot(xf, tl.trans(f.to(tl.float32)), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(x, tl.trans(f), acc)
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
    [S, P] float32 over P ranges of K (shapes from TILE for bf16 streams, else TILE_F32)."""
    S, K = flat.shape
    nmix = fn.shape[0]
    mixp = triton.next_power_of_2(nmix)
    bf16 = flat.dtype == torch.bfloat16
    split = bf16 and TILE["split"]
    t = TILE if split else TILE_F32
    rows = triton.cdiv(S, t["rows"])
    P = min(triton.cdiv(K, DECODE["block_k"]), max(t["splits"], triton.cdiv(MIN_PROGRAMS, rows)))
    span = triton.cdiv(triton.cdiv(K, P), t["k"]) * t["k"]
    P = triton.cdiv(K, span)
    part = torch.empty((S, P, mixp), device=flat.device, dtype=torch.float32)
    ss = torch.empty((S, P), device=flat.device, dtype=torch.float32)
    fn = fn.contiguous()
    f = torch.empty((3, nmix, K), device=flat.device, dtype=torch.bfloat16) if split else fn
    if split:
        _split_fn[(triton.cdiv(nmix * K, SPLIT_BLOCK),)](fn, f, nmix * K, BLOCK=SPLIT_BLOCK)
    _mix_partials_rows[(rows, P)](flat, f, part, ss, S, K, P, span, NMIX=nmix, MIXP=mixp,
                                  SPLIT=split, BLOCK_M=t["rows"], BLOCK_K=t["k"], PRECISION=_precision(),
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
