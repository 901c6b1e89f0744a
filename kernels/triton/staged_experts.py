"""Faithful-mode routed experts of a large prefill chunk on the FP8 tensor cores, through FP8 staging.

The grouped expert GEMM (prefill_experts.py) widens each FP4 weight tile in registers once per tile
of pairs that uses it: an expert with 280 pairs of a 12k-token chunk widens its weights 4-5 times,
and the widening, not the tensor cores, bounds that kernel. Here a group of experts' MXFP4 weights
is first widened once into an FP8 staging buffer (``_stage``, one pass at memory speed), then the
pairs multiply it on the FP8 tensor cores (``_up8`` / ``_down8``), with the activations in the
e4m3 + ue8m0 form faithful mode gives them anyway. Experts are staged in groups so the buffer stays
under TILE["budget"] bytes.

Staged format, per expert weight [N, K] (MXFP4: e2m1 with one ue8m0 byte per 32 columns): e4m3
bytes [N, K] and one exponent byte per 128 x 128 block, ``r`` = the largest MX byte in the block (the
checkpoints' FP8 layout); a value is e2m1 x 2^(s - r + 6) (s its own MX byte) and its weight that
times 2^(r - 127) x 2^-6. That is exact in e4m3 when s >= r - 14 for every 32-column group holding a
non-zero value (``stageable`` checks each expert set once; otherwise the grouped GEMM runs).
The dots: one FP8 dot per 128-column block, promoted into the float32 accumulator with the pair's
activation scale times the weight block's (one FMA per element, as DeepSeek's FP8 GEMMs promote). h leaves
_up8 as e4m3 + an exponent per 128-slice (the reference's act_quant of h). Both GEMM kernels are
persistent: one program per SM walks the group's (tile, column block) items, read on the device
(no host sync, no early-exiting programs of other groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.moe import ExpertSet

from .actquant import quantise_rows_fp8
from .expert_schedule import expert_counts, schedule
from .attention import _e4m3_at, _pow2, _pow2_exponent, interpreted
from .linear import _e2m1_pairs

# on: use this path (off until timed on a GPU against the grouped GEMM); min_rows: chunks of at least
# this many tokens (staging reads and writes every expert's weights once per chunk, ~3.4 ms per V4-Flash
# layer on an H100, which small chunks do not earn back); budget: staging buffer bytes (V4-Flash:
# 64 experts per group); m: pairs per tile; n: output columns per tile (128: one h slice per row);
# programs: persistent programs per SM.
TILE = {"on": False, "min_rows": 4096, "budget": 1 << 30, "m": 64, "warps": 8, "stages": 4, "programs": 1}
SPAN = 14  # binades an MX group may lie below its 128-block's largest and stage exactly (2^-9 = e4m3's least)


@triton.jit
def _stage(w_tab, s_tab, cnt_ptr, q_ptr, r_ptr, e0, N, K):
    """Expert e0 + program_id(0), the 128 x 128 block (pid1, pid2) of an MXFP4 weight [N, K] -> its e4m3
    bytes in q [G, N, K] and the block's exponent byte in r [G, N / 128, K / 128] (uint8). Experts with
    no pairs in the chunk (cnt 0) are skipped."""
    el = tl.program_id(0).to(tl.int64)
    e = e0 + el
    if tl.load(cnt_ptr + e) > 0:
        nb, kb = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        rn = nb * 128 + tl.arange(0, 128)
        w = tl.multiple_of(tl.load(w_tab + e).to(tl.pointer_type(tl.uint8)), 16)
        s = tl.multiple_of(tl.load(s_tab + e).to(tl.pointer_type(tl.uint8)), 16)
        b = tl.load(w + rn[:, None] * (K // 2) + (kb * 64 + tl.arange(0, 64))[None, :])
        sc = tl.load(s + rn[:, None] * (K // 32) + (kb * 4 + tl.arange(0, 4))[None, :]).to(tl.int32)
        ref = tl.max(tl.max(sc, 1), 0)
        # 2^(s - r + 20): the 2^6 of the staged form and the 2^14 that _e2m1_pairs leaves out (an
        # all-zero group further below r may get any positive factor: its values stay 0)
        f = (tl.maximum(sc - ref + 147, 1) << 23).to(tl.float32, bitcast=True)
        lo, hi = _e2m1_pairs(b)
        v = tl.reshape(tl.reshape(tl.interleave(lo, hi), [128, 4, 32]) * f[:, :, None], [128, 128])
        tl.store(q_ptr + (el * N + rn)[:, None] * K + (kb * 128 + tl.arange(0, 128))[None, :],
                 v.to(tl.float8e4nv).to(tl.uint8, bitcast=True))
        tl.store(r_ptr + (el * (N // 128) + nb) * (K // 128) + kb, ref.to(tl.uint8))


@triton.jit
def _dot8(a, w, IEEE: tl.constexpr):
    """a [M, 128] e4m3 . w [N, 128]^T e4m3 -> [M, N] float32 (IEEE float32 in the CPU interpreter)."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        out = tl.dot(a, tl.trans(w))
    return out


@triton.jit
def _work(span_ptr, w):
    """Work item w of the group -> (tile, column block): items run tile-fastest, so the programs in
    flight share column blocks of the same experts' weights (in L2)."""
    t0 = tl.load(span_ptr)
    nt = tl.load(span_ptr + 1) - t0
    return t0 + w % nt, w // nt


@triton.jit
def _n_work(span_ptr, N):
    """The group's work items: its tiles x the 128-column blocks of an output of N columns."""
    return (tl.load(span_ptr + 1) - tl.load(span_ptr)) * (N // 128)


@triton.jit
def _up8(xq_ptr, xe_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, span_ptr, q1_ptr, r1_ptr, q3_ptr, r3_ptr,
         hq_ptr, he_ptr, e0, I, D, limit, K_SEL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    """h = swiglu(w1 x, w3 x) for the group's tiles of sorted pairs, as e4m3 bytes hq [P, I] and one
    exponent byte per 128-slice he [P, I / 128]; x is e4m3 xq [S, D] with exponents xe [S, D / 128];
    w1 / w3 staged (q [G, I, D], r [G, I / 128, D / 128])."""
    rk = tl.arange(0, 128)
    for w in range(tl.program_id(0), _n_work(span_ptr, I), tl.num_programs(0)):
        t, nb = _work(span_ptr, w)
        e = tl.load(tile_e_ptr + t).to(tl.int64)
        r = tl.load(tile_lo_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)
        rm = r < tl.load(tile_hi_ptr + t)
        tok = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64) // K_SEL
        rn = nb.to(tl.int64) * 128 + tl.arange(0, 128)
        wr = (e - e0) * I + rn
        wb = ((e - e0) * (I // 128) + nb) * (D // 128)  # the column block's staged exponents
        g = tl.zeros([BLOCK_M, 128], tl.float32)
        u = tl.zeros([BLOCK_M, 128], tl.float32)
        for kb in range(0, D // 128):
            k = kb * 128 + rk
            a = tl.load(xq_ptr + tok[:, None] * D + k[None, :], mask=rm[:, None], other=0.0)
            sa = _pow2(tl.load(xe_ptr + tok * (D // 128) + kb, mask=rm, other=0).to(tl.int32))
            w1 = tl.load(q1_ptr + wr[:, None] * D + k[None, :])
            g += _dot8(a, w1, IEEE) * (sa * _pow2(tl.load(r1_ptr + wb + kb).to(tl.int32)))[:, None]
            w3 = tl.load(q3_ptr + wr[:, None] * D + k[None, :])
            u += _dot8(a, w3, IEEE) * (sa * _pow2(tl.load(r3_ptr + wb + kb).to(tl.int32)))[:, None]
        g = tl.minimum(g * 0.015625, limit)  # the staged form's 2^-6
        u = tl.minimum(tl.maximum(u * 0.015625, -limit), limit)
        h = g * tl.sigmoid(g) * u
        ex = _pow2_exponent(tl.max(tl.abs(h), 1), 448.0)
        tl.store(hq_ptr + r[:, None] * I + rn[None, :], _e4m3_at(h, ex).to(tl.float8e4nv), mask=rm[:, None])
        tl.store(he_ptr + r * (I // 128) + nb, ex.to(tl.uint8), mask=rm)


@triton.jit
def _down8(hq_ptr, he_ptr, order_ptr, wts_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, span_ptr, q2_ptr, r2_ptr, y_ptr,
           e0, I, D, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    """y[pair] = weight(pair) x w2 h for the group's tiles (w2 staged: q [G, D, I], r [G, D / 128, I / 128]),
    stored at the pair's (token, slot) row of y [P, D] (float32)."""
    rk = tl.arange(0, 128)
    for w in range(tl.program_id(0), _n_work(span_ptr, D), tl.num_programs(0)):
        t, nb = _work(span_ptr, w)
        e = tl.load(tile_e_ptr + t).to(tl.int64)
        r = tl.load(tile_lo_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)
        rm = r < tl.load(tile_hi_ptr + t)
        rn = nb.to(tl.int64) * 128 + tl.arange(0, 128)
        wr = (e - e0) * D + rn
        wb = ((e - e0) * (D // 128) + nb) * (I // 128)
        acc = tl.zeros([BLOCK_M, 128], tl.float32)
        for kb in range(0, I // 128):
            k = kb * 128 + rk
            a = tl.load(hq_ptr + r[:, None] * I + k[None, :], mask=rm[:, None], other=0.0)
            sa = _pow2(tl.load(he_ptr + r * (I // 128) + kb, mask=rm, other=0).to(tl.int32))
            w2 = tl.load(q2_ptr + wr[:, None] * I + k[None, :])
            acc += _dot8(a, w2, IEEE) * (sa * _pow2(tl.load(r2_ptr + wb + kb).to(tl.int32)))[:, None]
        pair = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64)
        wt = tl.load(wts_ptr + pair, mask=rm, other=0.0) * 0.015625
        tl.store(y_ptr + pair[:, None] * D + rn[None, :], acc * wt[:, None], mask=rm[:, None])


def stageable(experts: ExpertSet) -> bool:
    """Whether the set's weights stage exactly (cached in experts.tables): MXFP4, every dimension a
    multiple of 128, and in every 128 x 128 block each MX group holding a non-zero value lies at most
    SPAN binades below the block's largest MX byte, which is at least 1."""
    t = experts.tables
    if "staged_ok" not in t:
        ws = experts.w1 + experts.w3 + experts.w2
        ok = getattr(experts, "local", None) is None and all(
            w.fmt == "mxfp4" and w.dense is None and w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0
            and w.data.is_contiguous() and w.scale.is_contiguous() for w in ws)
        for w in ws if ok else ():
            N, K = w.shape
            s = w.scale.view(torch.uint8).reshape(N // 128, 128, K // 128, 4).int()
            used = (w.data.view(torch.uint8).reshape(N // 128, 128, K // 128, 4, 16) & 0x77).amax(-1) > 0
            ref = s.amax((1, 3), keepdim=True)
            if bool((used & ((s < ref - SPAN) | (ref < 1))).any()):
                ok = False
                break
        t["staged_ok"] = ok
    return t["staged_ok"]


def staged_supported(x: torch.Tensor, experts: ExpertSet, act_quant: bool) -> bool:
    """This path for a chunk: TILE on, faithful mode, at least TILE["min_rows"] tokens, a stageable set."""
    return TILE["on"] and act_quant and x.shape[0] >= TILE["min_rows"] and stageable(experts)


def _spans(counts: torch.Tensor, block: int, G: int) -> torch.Tensor:
    """The first tile of each group of G experts, then the end [ceil(E / G) + 1], in
    expert_schedule.schedule's tile order (experts in id order, cdiv(count, block) tiles each)."""
    starts = torch.cat([counts.new_zeros(1), torch.cumsum((counts + block - 1) // block, 0)])
    return torch.cat([starts[0:len(counts):G], starts[len(counts):]])


def _programs(device) -> int:
    sms = 4 if interpreted() else torch.cuda.get_device_properties(device).multi_processor_count
    return sms * TILE["programs"]


def staged_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSet, limit: float,
                   tables: dict) -> torch.Tensor:
    """kernels.routed_experts for a chunk in faithful mode (contract: kernels/reference/moe.routed_experts)
    on a stageable MXFP4 set: x [S, D], ids / weights [S, k] -> [S, D] in x's dtype. ``tables`` are
    prefill_experts' per-expert address tables."""
    S, D = x.shape
    k = ids.shape[1]
    E = len(experts)
    I = experts.w1[0].shape[0]
    t = TILE
    G = max(1, min(E, t["budget"] // (2 * I * D)))
    order, tile_e, lo, hi = schedule(ids.long(), E, t["m"])
    counts = expert_counts(ids.long(), E)
    spans = _spans(counts, t["m"], G)
    xq, xe = quantise_rows_fp8(x.contiguous())
    P = S * k
    hq = torch.empty((P, I), device=x.device, dtype=torch.float8_e4m3fn)
    he = torch.empty((P, I // 128), device=x.device, dtype=torch.uint8)
    y = torch.empty((P, D), device=x.device, dtype=torch.float32)
    q = torch.empty((2, G * I * D), device=x.device, dtype=torch.float8_e4m3fn)
    rb = torch.empty((2, G * I * D // 128 // 128), device=x.device, dtype=torch.uint8)
    wts = weights.float().contiguous().reshape(-1)
    ieee, progs = interpreted(), _programs(x.device)
    xq8 = xq.view(torch.float8_e4m3fn)
    for j, e0 in enumerate(range(0, E, G)):
        n = min(G, E - e0)
        span = spans[j:j + 2]
        for i, name in enumerate(("w1", "w3")):
            _stage[(n, I // 128, D // 128)](tables[name], tables["s" + name], counts, q[i].view(torch.uint8), rb[i],
                                            e0, I, D, num_warps=4)
        _up8[(progs,)](xq8, xe, order, tile_e, lo, hi, span, q[0], rb[0], q[1], rb[1], hq, he, e0, I, D, float(limit),
                       K_SEL=k, IEEE=ieee, BLOCK_M=t["m"], num_warps=t["warps"], num_stages=t["stages"])
        _stage[(n, D // 128, I // 128)](tables["w2"], tables["sw2"], counts, q[0].view(torch.uint8), rb[0], e0, D,
                                        I, num_warps=4)
        _down8[(progs,)](hq, he, order, wts, tile_e, lo, hi, span, q[0], rb[0], y, e0, I, D, IEEE=ieee,
                         BLOCK_M=t["m"], num_warps=t["warps"], num_stages=t["stages"])
    return y.view(S, k, D).sum(1).to(x.dtype)
