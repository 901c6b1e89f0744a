"""Triton GEMV kernels for decode: y[m] = W x[m] for a few rows x, W read once in its stored format.

Formats (kernels/reference/linear.py QWeight): FP8 e4m3 with 128x128 block scales (ue8m0 or float32), MXFP4
(e2m1 pairs, low nibble first, ue8m0 scale per 32), NVFP4 (e2m1, e4m3 scale per 16, float32 tensor
scale), and dense BF16/F32. Each program reduces a BLOCK_N x K-slice tile of W (split-K when the
rows alone would not fill the GPU), accumulating in float32; the last program of each output tile
adds the split-K partials, in split order, in the same launch. The grid's fastest axis is the row
of x: the programs of all rows for one W tile are launched together, so for a few rows (MTP's
batched verify) W comes from HBM once and from L2 for the other rows; each row's sums do not
depend on M (a row's result is the same bits whatever rows run beside it).
Decoding happens in registers (FP8 by a bit-cast conversion, e2m1 by placing its bits in an fp16,
scales by exp2), so the bytes read are the stored bytes. ``_block_step`` / ``_fp4_step`` are one
K step, shared with the routed-expert kernels (kernels/triton/moe.py). ``grouped`` makes row block g read its own slice of x
(the V4 grouped output projection wo_a). Used for M <= MAX_ROWS (``linear_supported``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels import streams
from dsv4.kernels.reference.linear import QWeight

from . import pdl
from .actquant import fake_quant_pairs, fake_quant_vector

MAX_ROWS = 16
# K per program step, output rows per program and warps (bench/tune_kernels.py --only gemv); FP8
# weights with K <= short_k take fp8_short_block_k / short_warps (H200, cold L2, faithful: wq_b
# 11.7 vs 12.2 us, indexer wq_b 4.7 vs 5.9, shared w2 5.8 vs 6.1; bench/results/h200_tune_gemv.json).
# programs: split-K aims at about this many programs per row of x (~4 per SM on an H100 / H200);
# prefetch: _gemv_fp8_dense / _gemv_fp4's PREFETCH (0: load then compute; 1: the next step's weights
# in flight during this step's arithmetic; 2: and the first tile's loads before the PDL wait);
# weights of fewer than prefetch_below bytes take 2 (H100, cold L2, a chain of GEMVs: the 2-8 MB
# weights 0.5-1.2 us faster each with 2, the 16-34 MB ones 2-4 us slower: twice the registers).
GEMV = {"fp8_block_k": 512, "dense_block_k": 256, "rows": 32, "warps": 4,
        "short_k": 2048, "fp8_short_block_k": 1024, "short_warps": 8, "programs": 4 * 132, "prefetch": 0,
        "prefetch_below": 0}


@triton.jit
def _e2m1_pairs(b):
    """Packed e2m1 bytes (uint8, low nibble first) -> (low, high) values x 2^-14 as float32.

    A nibble's three magnitude bits placed at bits 9-11 of an fp16 (the exponent's two low bits and
    the top mantissa bit) read as 2^-14 times the e2m1 value, subnormal 0.5 included; the sign bit
    goes to bit 15. Two integer ops and a convert per value; callers fold 2^14 into the scales."""
    h = b.to(tl.uint16)
    lo = ((h & 7) << 9) | ((h & 8) << 12)
    hi = ((h & 0x70) << 5) | ((h & 0x80) << 8)
    return lo.to(tl.float16, bitcast=True).to(tl.float32), hi.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store_split(acc, out_ptr, part_ptr, cnt_ptr, pid_n, pid_k, m, M, N, rn, nmask, SPLIT: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Write this program's [BLOCK_N] result. With split-K, partials go to part [SPLIT, M, N]; the
    last program of an output tile to arrive (an atomic count per tile) adds them in split order
    (deterministic) and resets the count, so no second launch is needed. The counts are indexed
    [M, cdiv(N, BLOCK_N)], whatever the grid's order."""
    if SPLIT == 1:
        tl.store(out_ptr + m * N + rn, acc, mask=nmask)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + rn, acc, mask=nmask)
        tl.debug_barrier()  # every thread's partial is written before the count moves
        tile = cnt_ptr + m * tl.cdiv(N, BLOCK_N) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            tot = tl.zeros_like(acc)
            for sp in range(0, SPLIT):
                tot += tl.load(part_ptr + (sp * M + m) * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + m * N + rn, tot, mask=nmask)
            tl.atomic_xchg(tile, 0)


@triton.jit
def _block_load(w_ptr, s_ptr, rn, nmask, k0, k_end, K, SB_K, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """The loads of one ``_block_step``: W[rn, k0:k0+BLOCK_K] as stored (0 at k >= k_end, which
    loads nothing) and, for FP8 (k0 a multiple of 128), its block scales [BLOCK_N, BLOCK_K / 128] as
    stored; for dense W the second value is the tile again (unused)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & (rk < k_end)[None, :], other=0)
    if FMT >= 2:
        s = w
    else:
        NB: tl.constexpr = BLOCK_K // 128
        sb = k0 // 128 + tl.arange(0, NB)
        s = tl.load(s_ptr + (rn // 128)[:, None] * SB_K + sb[None, :], mask=nmask[:, None] & (sb < SB_K)[None, :],
                    other=0)
    return w, s


@triton.jit
def _block_math(x_row, w, s, k0, K, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                QX: tl.constexpr):
    """The arithmetic of one ``_block_step`` on a tile from ``_block_load`` -> [BLOCK_N] float32."""
    rk = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
    if QX:
        x = fake_quant_vector(x, BLOCK_K)
    if FMT >= 2:
        out = tl.sum(w.to(tl.float32) * x[None, :], 1)
    else:
        NB: tl.constexpr = BLOCK_K // 128
        prod = w.to(tl.float8e4nv, bitcast=True).to(tl.float32) * x[None, :]
        blk = tl.reshape(tl.sum(tl.reshape(prod, [BLOCK_N, NB, 128]), 2), [BLOCK_N, NB])
        if FMT == 0:
            s = tl.exp2(s.to(tl.float32) - 127.0)
        out = tl.sum(blk * s, 1)
    return out


@triton.jit
def _block_step(x_row, w_ptr, s_ptr, rn, nmask, k0, K, SB_K, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, QX: tl.constexpr = False):
    """sum over k in [k0, k0 + BLOCK_K) of W[rn, k] x[k] -> [BLOCK_N] float32, W [N, K] dense (FMT >= 2,
    any float dtype) or FP8 with 128x128 block scales s [N/128, SB_K] (FMT 0: ue8m0, 1: float32);
    for FP8, k0 is a multiple of 128 and BLOCK_K spans BLOCK_K / 128 scale blocks. QX (faithful
    mode, FP8 only): x's 128-slices through e4m3 first (kernels/triton/actquant.py)."""
    w, s = _block_load(w_ptr, s_ptr, rn, nmask, k0, K, K, SB_K, FMT, BLOCK_N, BLOCK_K)
    return _block_math(x_row, w, s, k0, K, FMT, BLOCK_N, BLOCK_K, QX)


@triton.jit
def _fp4_load(w_ptr, s_ptr, rn, nmask, kp0, kp_end, K, NV: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_KP: tl.constexpr):
    """The loads of one ``_fp4_step``: packed bytes [BLOCK_N, BLOCK_KP] from kp0 (0 at kp >= kp_end,
    which loads nothing) and their raw group scales [BLOCK_N, BLOCK_KP * 2 / G]."""
    G: tl.constexpr = 16 if NV else 32
    NG: tl.constexpr = BLOCK_KP * 2 // G
    rp = kp0 + tl.arange(0, BLOCK_KP)
    b = tl.load(w_ptr + rn[:, None] * (K // 2) + rp[None, :], mask=nmask[:, None] & (rp < kp_end)[None, :], other=0)
    rg = kp0 * 2 // G + tl.arange(0, NG)
    s = tl.load(s_ptr + rn[:, None] * (K // G) + rg[None, :], mask=nmask[:, None] & (rg[None, :] < K // G), other=0)
    return b, s


@triton.jit
def _fp4_math(x_row, b, s, kp0, K, NV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
              QX: tl.constexpr):
    """The arithmetic of one ``_fp4_step`` on a tile from ``_fp4_load`` -> [BLOCK_N] float32 x 2^-14."""
    G: tl.constexpr = 16 if NV else 32
    NG: tl.constexpr = BLOCK_KP * 2 // G
    rp = kp0 + tl.arange(0, BLOCK_KP)
    pmask = rp < K // 2
    xe = tl.load(x_row + 2 * rp, mask=pmask, other=0.0).to(tl.float32)
    xo = tl.load(x_row + 2 * rp + 1, mask=pmask, other=0.0).to(tl.float32)
    if QX:
        xe, xo = fake_quant_pairs(xe, xo, BLOCK_KP)
    lo, hi = _e2m1_pairs(b)
    grp = tl.sum(tl.reshape(lo * xe[None, :] + hi * xo[None, :], [BLOCK_N, NG, G // 2]), 2)  # per scale group
    if NV:
        s = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        s = tl.exp2(s.to(tl.float32) - 127.0)
    return tl.sum(grp * s, 1)


@triton.jit
def _fp4_step(x_row, w_ptr, s_ptr, rn, nmask, kp0, K, NV: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_KP: tl.constexpr, QX: tl.constexpr = False):
    """sum over the packed bytes [kp0, kp0 + BLOCK_KP) of W[rn, :] x -> [BLOCK_N] float32 x 2^-14, W
    packed e2m1 [N, K/2] with per-G scales s [N, K/G]: ue8m0 (NV=0, G=32) or e4m3 (NV=1, G=16;
    the tensor scale is the caller's). QX (faithful mode): x's 128-slices through e4m3 first
    (kp0 a multiple of 64, BLOCK_KP of 64)."""
    b, s = _fp4_load(w_ptr, s_ptr, rn, nmask, kp0, K // 2, K, NV, BLOCK_N, BLOCK_KP)
    return _fp4_math(x_row, b, s, kp0, K, NV, BLOCK_N, BLOCK_KP, QX)


@triton.jit
def _gemv_fp8_dense(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, SB_K, ROWS_PER_GROUP,
                    FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                    SPLIT: tl.constexpr, QX: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """FMT 0: fp8 + ue8m0 block scale, 1: fp8 + float32 block scale, 2: dense (any float dtype);
    QX: quantised activations (FP8 only). PREFETCH 1: each step's weight loads are issued before the
    previous step's arithmetic (two tiles in flight per program); 2: the same, and the first tile's
    loads go before the PDL wait (weights are no kernel's output); 0: load, then compute."""
    m, pid_n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        if PREFETCH == 1:
            pdl.wait(PDL)
        w, s = _block_load(w_ptr, s_ptr, rn, nmask, k_start, k_end, K, SB_K, FMT, BLOCK_N, BLOCK_K)
        if PREFETCH == 2:  # the weights are no kernel's output: the first tile's loads may precede the wait
            pdl.wait(PDL)
        x_row = x_ptr + m * stride_xm + ((pid_n * BLOCK_N) // ROWS_PER_GROUP) * K
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            wn, sn = _block_load(w_ptr, s_ptr, rn, nmask, k_start + kk + BLOCK_K, k_end, K, SB_K, FMT, BLOCK_N,
                                 BLOCK_K)
            acc += _block_math(x_row, w, s, k_start + kk, K, FMT, BLOCK_N, BLOCK_K, QX)
            w, s = wn, sn
    else:
        pdl.wait(PDL)
        x_row = x_ptr + m * stride_xm + ((pid_n * BLOCK_N) // ROWS_PER_GROUP) * K
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            acc += _block_step(x_row, w_ptr, s_ptr, rn, nmask, k_start + kk, K, SB_K, FMT, BLOCK_N, BLOCK_K, QX)
    _store_split(acc, out_ptr, part_ptr, cnt_ptr, pid_n, pid_k, m, M, N, rn, nmask, SPLIT, BLOCK_N)


@triton.jit
def _gemv_fp4(x_ptr, w_ptr, s_ptr, gs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm,
              NV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
              KP_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, QX: tl.constexpr, PREFETCH: tl.constexpr,
              PDL: tl.constexpr):
    """Packed e2m1 [N, K/2] with per-G scales [N, K/G]: ue8m0 (NV=0, G=32) or e4m3 x global (NV=1, G=16)."""
    m, pid_n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    kp_start = pid_k * KP_PER_SPLIT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        kp_end = tl.minimum(kp_start + KP_PER_SPLIT, K // 2)
        if PREFETCH == 1:
            pdl.wait(PDL)
        b, s = _fp4_load(w_ptr, s_ptr, rn, nmask, kp_start, kp_end, K, NV, BLOCK_N, BLOCK_KP)
        if PREFETCH == 2:
            pdl.wait(PDL)
        for kk in range(0, KP_PER_SPLIT, BLOCK_KP):
            bn, sn = _fp4_load(w_ptr, s_ptr, rn, nmask, kp_start + kk + BLOCK_KP, kp_end, K, NV, BLOCK_N, BLOCK_KP)
            acc += _fp4_math(x_ptr + m * stride_xm, b, s, kp_start + kk, K, NV, BLOCK_N, BLOCK_KP, QX)
            b, s = bn, sn
    else:
        pdl.wait(PDL)
        for kk in range(0, KP_PER_SPLIT, BLOCK_KP):
            acc += _fp4_step(x_ptr + m * stride_xm, w_ptr, s_ptr, rn, nmask, kp_start + kk, K, NV, BLOCK_N, BLOCK_KP,
                             QX)
    acc = acc * 16384.0
    if NV:
        acc = acc * tl.load(gs_ptr)
    _store_split(acc, out_ptr, part_ptr, cnt_ptr, pid_n, pid_k, m, M, N, rn, nmask, SPLIT, BLOCK_N)


def _block_n(n_rows: int, rows_per_group: int) -> int:
    b = 32
    while b > 1 and rows_per_group % b:
        b //= 2
    return b


def _split(n_prog: int, k_blocks: int) -> tuple[int, int]:
    """-> (blocks of K per program, number of K splits) so that about GEMV["programs"] run."""
    want = max(1, min(k_blocks, triton.cdiv(GEMV["programs"], max(n_prog, 1))))
    per = triton.cdiv(k_blocks, want)
    return per, triton.cdiv(k_blocks, per)


def _prefetch(w: QWeight) -> int:
    return 2 if w.nbytes() < GEMV["prefetch_below"] else GEMV["prefetch"]


def gemv(x: torch.Tensor, w: QWeight, rows_per_group: int | None = None, act_quant: bool = False) -> torch.Tensor:
    """x: [M, K_total] (K_total = K x groups when grouped) -> [M, N] float32, M <= MAX_ROWS.

    rows_per_group: rows of W that read the same K-slice of x (grouped projection), None = all.
    act_quant: faithful mode's e4m3 activations (FP8 / FP4 weights; kernels/reference/linear.py)."""
    qx = act_quant and w.fmt != "dense"
    M = x.shape[0]
    N, K = w.shape
    x = x.contiguous()
    R = rows_per_group or N
    BN = _block_n(N, R) if rows_per_group else GEMV["rows"]
    n_prog = triton.cdiv(N, BN)  # per row: the split, and so each row's sums, do not depend on M
    if n_prog > 65535:  # the grid's y axis
        raise ValueError(f"gemv: {n_prog} output tiles of {BN} rows pass the grid's 65535")
    out = torch.empty((M, N), device=x.device, dtype=torch.float32)
    if w.fmt in ("mxfp4", "nvfp4"):
        BKP = 64
        per, split = _split(n_prog, triton.cdiv(K // 2, BKP))
        part, cnt = _split_buffers(split, M, N, BN, x.device)
        gs = w.global_scale if w.fmt == "nvfp4" else out  # unused pointer for mxfp4
        _gemv_fp4[(M, triton.cdiv(N, BN), split)](
            x, w.data.view(torch.uint8), w.scale.view(torch.uint8), gs, out, part, cnt, M, N, K, x.stride(0),
            NV=w.fmt == "nvfp4", BLOCK_N=BN, BLOCK_KP=BKP, KP_PER_SPLIT=per * BKP, SPLIT=split, QX=qx,
            PREFETCH=_prefetch(w), num_warps=4, **pdl.launch(x.device))
    else:
        short = w.fmt == "fp8" and K <= GEMV["short_k"]
        BK = GEMV["fp8_short_block_k" if short else "fp8_block_k" if w.fmt == "fp8" else "dense_block_k"]
        warps = GEMV["short_warps" if short else "warps"]
        per, split = _split(n_prog, triton.cdiv(K, BK))
        part, cnt = _split_buffers(split, M, N, BN, x.device)
        if w.fmt == "fp8":
            f32 = w.scale.dtype == torch.float32
            s = w.scale if f32 else w.scale.view(torch.uint8)
            fmt, data, sbk = (1 if f32 else 0), w.data.view(torch.uint8), w.scale.shape[1]
        else:
            fmt, data, s, sbk = 2, w.data, out, 0
        _gemv_fp8_dense[(M, triton.cdiv(N, BN), split)](
            x, data, s, out, part, cnt, M, N, K, x.stride(0), sbk, R,
            FMT=fmt, BLOCK_N=BN, BLOCK_K=BK, K_PER_SPLIT=per * BK, SPLIT=split, QX=qx,
            PREFETCH=_prefetch(w), num_warps=warps, **pdl.launch(x.device))
    return out


_COUNTS: dict = {}


def _split_buffers(split: int, M: int, N: int, BN: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials [split, M, N] and the per-tile arrival counts (int32, kept zero between
    calls: the last program of each tile resets its count). One count buffer per device and stream
    lane (kernels/streams.py: kernels on the side stream may run beside the main stream's), grown
    when needed (a decode step's warm-up grows them before any CUDA-graph capture)."""
    tiles = M * triton.cdiv(N, BN)
    key = (device, streams.lane(device) if device.type == "cuda" else 0)
    cnt = _COUNTS.get(key)
    if cnt is None or cnt.numel() < tiles:
        cnt = _COUNTS[key] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    if split == 1:
        return cnt, cnt  # unused
    return torch.empty((split, M, N), device=device, dtype=torch.float32), cnt


def linear_supported(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    """Up to MAX_ROWS rows of x, a weight in its stored format (not a cached dense copy); no autograd."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= MAX_ROWS and w.dense is None and not (x.requires_grad or w.data.requires_grad)


def grouped_linear_supported(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    return 0 < og.shape[0] <= MAX_ROWS and w.dense is None and not (og.requires_grad or w.data.requires_grad)


def linear_triton(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """kernels.linear for CUDA tensors: the GEMV kernels, up to MAX_ROWS rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    return gemv(x2, w, act_quant=act_quant).to(x.dtype).reshape(*lead, w.shape[0])


def grouped_linear_triton(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """kernels.grouped_linear for CUDA tensors: og [S, G, Kg] -> [S, G*R]."""
    S, G, Kg = og.shape
    return gemv(og.reshape(S, G * Kg), w, rows_per_group=w.shape[0] // G, act_quant=act_quant).to(og.dtype)
