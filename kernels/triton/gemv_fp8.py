"""Faithful mode's FP8 GEMV on the FP8 tensor cores: y[m] = W xq[m] for up to MAX_ROWS rows.

Faithful mode quantises the input of an FP8 linear to e4m3 per 1 x 128 slice with a ue8m0 scale
(kernels/reference/linear.py), so both operands are FP8 and the weight tile can go to the tensor
cores as it is stored: no widening of the weight bytes in registers, which is what limits the CUDA-
core GEMV (kernels/triton/linear.py) to about 40% of HBM bandwidth. The rows are the dot's narrow
side: W [BLOCK_N, 128] . xq^T [128, ROWS] (ROWS = 16, the smallest tensor-core width; rows past M
are zero), one dot per 128-column block, scaled by the weight block's and the row slice's scales
into a float32 accumulator (as the prefill GEMM, prefill_linear._gemm_fp8, and DeepSeek's FP8 GEMMs
promote each 128-block's sum; Hopper adds a block's products at reduced precision). Each row's
result depends only on that row, so a verify step of several tokens gives each the value a
single-token step gives it.

Each program quantises the slices of x it reads (no launch of its own) and reduces BLOCK_N rows of W
over KB_PER_SPLIT 128-column blocks (split-K where the output rows alone would not fill the GPU);
the last program of an output tile adds the partials in split order in the same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.linear import QWeight

from .attention import _e4m3_at, _pow2, _pow2_exponent, interpreted

ROWS = 16  # the dot's row side (x rows, zero-padded): the smallest FP8 tensor-core width
# Output rows per program, programs aimed for (split-K fills up to it), warps, pipeline stages.
# "enabled": False sends faithful FP8 GEMVs back to the CUDA-core kernel (the benchmarks compare both).
GEMV_FP8 = {"enabled": True, "rows": 128, "target": 264, "warps": 4, "stages": 3}


@triton.jit
def _gemv_fp8_tc(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, SB_K, ROWS_PER_GROUP,
                 SCALE_U8: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, MP: tl.constexpr,
                 KB_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr):
    """out [M, N] float32 = W [N, K] (e4m3, scales s [ceil(N/128), SB_K]: ue8m0 bytes or float32) times
    x [M, K_total] (row stride stride_xm) through e4m3 per 128-slice; row block n reads x's K-slice
    (n * BLOCK_N) // ROWS_PER_GROUP (grouped projections; 0 otherwise). IEEE: float32 dots (interpreter)."""
    pid_n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, MP)
    nmask, mmask = rn < N, rm < M
    x_base = x_ptr + ((pid_n * BLOCK_N) // ROWS_PER_GROUP) * K
    rk = tl.arange(0, 128)
    nkb = tl.cdiv(K, 128)
    acc = tl.zeros([BLOCK_N, MP], tl.float32)
    for i in range(0, KB_PER_SPLIT):
        kb = pid_k * KB_PER_SPLIT + i
        k = kb * 128 + rk
        km = k < K
        xv = tl.load(x_base + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        e = _pow2_exponent(tl.max(tl.abs(xv), 1), 448.0)  # [MP] the slices' ue8m0 bytes
        xq = _e4m3_at(xv, e)  # e4m3 values as float32
        w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=nmask[:, None] & km[None, :], other=0)
        w = w.to(tl.float8e4nv, bitcast=True)
        if IEEE:
            part = tl.dot(w.to(tl.float32), tl.trans(xq), input_precision="ieee")
        else:
            part = tl.dot(w, tl.trans(xq.to(tl.float8e4nv)))
        sw = tl.load(s_ptr + (rn // 128) * SB_K + tl.minimum(kb, nkb - 1), mask=nmask, other=0)  # past K: part is 0
        if SCALE_U8:
            sw = _pow2(sw.to(tl.int32))
        acc += part * sw[:, None] * _pow2(e)[None, :]
    offs = rm[None, :] * N + rn[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + offs, acc, mask=omask)
    else:
        tl.store(part_ptr + pid_k * M * N + offs, acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the count moves
        tile = cnt_ptr + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            tot = tl.zeros_like(acc)
            for sp in range(0, SPLIT):
                tot += tl.load(part_ptr + sp * M * N + offs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, tot, mask=omask)
            tl.atomic_xchg(tile, 0)


def gemv_fp8_supported(x2: torch.Tensor, w: QWeight, act_quant: bool, rows_per_group: int | None = None) -> bool:
    """Faithful activations before a stored FP8 weight, up to ROWS rows of x [M, K]; a grouped
    projection's groups a whole number of 16-row blocks."""
    return (GEMV_FP8["enabled"] and act_quant and w.fmt == "fp8" and w.dense is None
            and 0 < x2.shape[0] <= ROWS and (rows_per_group or 16) % 16 == 0)


def gemv_fp8(x2: torch.Tensor, w: QWeight, out: torch.Tensor, rows_per_group: int | None, split_buffers) -> None:
    """out [M, N] float32 <- W xq for x2 [M, K_total] (unit column stride; K_total = K x groups when
    grouped). rows_per_group: rows of W reading the same K-slice of x (a multiple of 16), None = all. split_buffers(split, M, N, BN) -> (partials, counts) (linear.py)."""
    M = x2.shape[0]
    N, K = w.shape
    t = GEMV_FP8
    BN = t["rows"]
    R = rows_per_group or N
    while rows_per_group and R % BN and BN > 16:
        BN //= 2
    n_prog = triton.cdiv(N, BN)
    kbs = triton.cdiv(K, 128)
    want = max(1, min(kbs, triton.cdiv(t["target"], n_prog)))
    per = triton.cdiv(kbs, want)
    split = triton.cdiv(kbs, per)
    part, cnt = split_buffers(split, M, N, BN)
    u8 = w.scale.dtype != torch.float32
    s = w.scale.view(torch.uint8) if u8 else w.scale
    _gemv_fp8_tc[(n_prog, split)](
        x2, w.data.view(torch.uint8), s, out, part, cnt, M, N, K, x2.stride(0), w.scale.shape[1], R,
        SCALE_U8=u8, IEEE=interpreted(), BLOCK_N=BN, MP=ROWS, KB_PER_SPLIT=per, SPLIT=split,
        num_warps=t["warps"], num_stages=t["stages"])
