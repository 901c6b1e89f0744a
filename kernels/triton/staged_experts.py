"""Faithful-mode routed experts of a large prefill chunk on the FP8 tensor cores, through FP8 staging.

The grouped expert GEMM (prefill_experts.py) widens each FP4 weight tile in registers once per tile
of pairs that uses it: an expert with 280 pairs of a 12k-token chunk widens its weights 4-5 times,
and the widening, not the tensor cores, bounds that kernel. Here a group of experts' MXFP4 weights
is first widened once into an FP8 staging buffer (``_stage``, one pass at memory speed), then the
pairs multiply it on the FP8 tensor cores (``_up8`` / ``_down8``), with the activations in the
e4m3 + ue8m0 form faithful mode gives them anyway. Experts are staged in groups so the buffer stays
under TILE["budget"] bytes.

Staged format, per expert weight [N, K] (MXFP4: e2m1 with one ue8m0 byte per 32 columns): e4m3 bytes
[N, K] and one exponent byte per 128 x 128 block, ``r`` = the largest MX byte in the block; a value is
e2m1 x 2^(s - r + 6) (s its own MX byte) and its weight that times 2^(r - 127) x 2^-6. That is exact
in e4m3 when s >= r - 14 for every 32-column group holding a non-zero value (``stageable`` checks each
expert set once; otherwise the grouped GEMM runs). It is the block-FP8 form DeepSeek's own
inference/convert.py casts the MXFP4 experts to for FP8 hardware (as public vLLM / SGLang / miles pull
requests that reuse it describe, e.g. vllm-project/vllm#53709: bit-exact, faster for Hopper prefill,
at twice the weight memory when converted at load); here it lives only per chunk and group, so the
weights keep their FP4 bytes in memory. w1 and w3 stage with their rows interleaved, so the up kernel
makes g and u in one dot (one tensor-core wait per step instead of two), each column promoted by its
own weight's block scale.
The dots: one FP8 dot per 128-column block, promoted into the float32 accumulator with the pair's
activation scale times the weight block's (one FMA per element, as DeepSeek's FP8 GEMMs promote).
h leaves _up8 as e4m3 + an exponent per 128-slice (the reference's act_quant of h). Both GEMM
kernels are persistent: one program per SM walks the group's (tile, column block) items, read on
the device (no host sync, no early-exiting programs of other groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.moe import ExpertSet

from .actquant import quantise_rows_fp8, to_e4m3
from .expert_schedule import expert_counts, group_spans, schedule
from .attention import _pow2, _pow2_exponent, interpreted
from .linear import _e2m1_pairs

# on: use this path (off until timed on a GPU against the grouped GEMM); min_rows: chunks of at least
# this many tokens (staging reads every expert's weights and writes them at twice the bytes once per
# chunk, ~3.4 ms per V4-Flash layer at H100 bandwidth, which small chunks do not earn back); budget:
# staging buffer bytes (V4-Flash: 64 experts per group; the MoE sub-layer stays under the attention
# sub-layer's peak that sizes the chunk, about equal at min_rows); m: pairs per tile; warps / stages
# of the GEMM kernels; programs: persistent programs per SM; group: tiles that run their column
# blocks together (_work: x / h rows and weight blocks shared in L2). sm_90 SASS (Triton 3.6) at
# m 64, 8 warps, 4 stages: the up kernel's K step (64 pairs x 256 staged rows x 128) and the down
# kernel's (64 x 256 columns x 128, _down_cols) 180 instructions for 512 FP8 tensor-core cycles, one
# wgmma wait, no spills. 128-pair tiles and 4 warps spill in the up kernel; 32-pair tiles leave wgmma.
TILE = {"on": False, "min_rows": 4096, "budget": 1 << 30, "m": 64, "warps": 8, "stages": 4, "programs": 1,
        "group": 8}
SPAN = 14  # binades an MX group may lie below its block's largest and stage exactly (2^-9: e4m3's least)
_SPAN = tl.constexpr(SPAN)  # the same, as the kernels see it


@triton.jit
def _mx_block(w_tab, s_tab, e, rn, kb, K):
    """Rows rn [128], columns [kb * 128, +128) of expert e's MXFP4 weight [N, K] as stored: the packed
    bytes [128, 64] and the MX bytes [128, 4] (int32)."""
    w = tl.multiple_of(tl.load(w_tab + e).to(tl.pointer_type(tl.uint8)), 16)
    s = tl.multiple_of(tl.load(s_tab + e).to(tl.pointer_type(tl.uint8)), 16)
    b = tl.load(w + rn[:, None] * (K // 2) + (kb * 64 + tl.arange(0, 64))[None, :])
    return b, tl.load(s + rn[:, None] * (K // 32) + (kb * 4 + tl.arange(0, 4))[None, :]).to(tl.int32)


@triton.jit
def _store_staged(q_ptr, row, K, kb, b, sc, ref):
    """A block from _mx_block as e4m3 bytes e2m1 x 2^(s - ref + 6) at q's rows ``row``, columns of block kb."""
    # 2^(s - ref + 20): the 2^6 of the staged form and the 2^14 that _e2m1_pairs leaves out (an
    # all-zero group further below ref may get any positive factor: its values stay 0)
    f = (tl.maximum(sc - ref + 147, 1) << 23).to(tl.float32, bitcast=True)
    lo, hi = _e2m1_pairs(b)
    v = tl.reshape(tl.reshape(tl.interleave(lo, hi), [128, 4, 32]) * f[:, :, None], [128, 128])
    tl.store(q_ptr + row[:, None] * K + (kb * 128 + tl.arange(0, 128))[None, :],
             v.to(tl.float8e4nv).to(tl.uint8, bitcast=True))


@triton.jit
def _stage(w_tab, s_tab, v_tab, t_tab, cnt_ptr, q_ptr, r_ptr, e0, N, K, PAIR: tl.constexpr):
    """Expert e0 + program_id(0), the 128 x 128 block (pid1, pid2) of an MXFP4 weight [N, K] (tables w / s:
    data / MX-byte addresses per expert) -> e4m3 bytes in q [G, N, K] and the block's exponent byte in
    r [G, N / 128, K / 128] (uint8). PAIR: with the same block of a second weight (tables v / t: w3 beside
    w1), rows interleaved, q [G, 2N, K] (row 2i: the first's row i, 2i + 1: the second's), and both
    blocks' exponents, r [G, N / 128, K / 128, 2]. Experts with no pairs in the chunk (cnt 0) are skipped."""
    el = tl.program_id(0).to(tl.int64)
    e = e0 + el
    if tl.load(cnt_ptr + e) > 0:
        nb, kb = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        rn = nb * 128 + tl.arange(0, 128)
        b, sc = _mx_block(w_tab, s_tab, e, rn, kb, K)
        ref = tl.max(tl.max(sc, 1), 0)
        at = (el * (N // 128) + nb) * (K // 128) + kb
        if PAIR:
            b3, sc3 = _mx_block(v_tab, t_tab, e, rn, kb, K)
            ref3 = tl.max(tl.max(sc3, 1), 0)
            _store_staged(q_ptr, (el * N + rn) * 2, K, kb, b, sc, ref)
            _store_staged(q_ptr, (el * N + rn) * 2 + 1, K, kb, b3, sc3, ref3)
            tl.store(r_ptr + at * 2, ref.to(tl.uint8))
            tl.store(r_ptr + at * 2 + 1, ref3.to(tl.uint8))
        else:
            _store_staged(q_ptr, el * N + rn, K, kb, b, sc, ref)
            tl.store(r_ptr + at, ref.to(tl.uint8))


@triton.jit
def _check(w_tab, s_tab, flag_ptr, N, K):
    """_stage's blocks without the staging: flag (int32) is set when a 128 x 128 block of expert
    program_id(0)'s weight holds a group with a non-zero value more than SPAN binades below the
    block's largest MX byte, or a largest byte of 0 (_inexact, on the device)."""
    e = tl.program_id(0).to(tl.int64)
    nb, kb = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    b, sc = _mx_block(w_tab, s_tab, e, nb * 128 + tl.arange(0, 128), kb, K)
    used = tl.max(tl.reshape(b & 0x77, [128, 4, 16]), 2) > 0
    ref = tl.max(tl.max(sc, 1), 0)
    low = used & ((sc < ref - _SPAN) | (ref < 1))
    tl.atomic_max(flag_ptr, tl.max(tl.max(low.to(tl.int32), 1), 0))


@triton.jit
def _dot8(a, w, IEEE: tl.constexpr):
    """a [M, 128] e4m3 . w [N, 128]^T e4m3 -> [M, N] float32 (IEEE float32 in the CPU interpreter)."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        out = tl.dot(a, tl.trans(w))
    return out


@triton.jit
def _step(a_ptr, rows, rm, e_ptr, K, kb, w_ptr, wr, sw, IEEE: tl.constexpr):
    """One 128-column step of a staged GEMM: rows ``rows`` (mask rm) of e4m3 a [., K] with their
    exponent bytes e [., K / 128], times the staged rows wr of w [., K], promoted by both scales (sw:
    the weight block's, one number or [1, N] per column) -> [M, N] float32 (x 2^6, the staged form's)."""
    k = kb * 128 + tl.arange(0, 128)
    a = tl.load(a_ptr + rows[:, None] * K + k[None, :], mask=rm[:, None], other=0.0)
    sa = _pow2(tl.load(e_ptr + rows * (K // 128) + kb, mask=rm, other=0).to(tl.int32))
    w = tl.load(w_ptr + wr[:, None] * K + k[None, :])
    return _dot8(a, w, IEEE) * (sa[:, None] * sw)


@triton.jit
def _work(span_ptr, w, NB, GROUP: tl.constexpr):
    """Work item w of the group -> (tile, column block of NB): GROUP tiles at a time run every column
    block, tile-fastest, so the programs in flight share those tiles' rows of x / h and their experts'
    staged column blocks in L2 (as the FP8 GEMM's grouped tile order; GROUP 1: one tile's blocks in a
    row, a large GROUP: every tile of the group of experts for one column block)."""
    t0 = tl.load(span_ptr)
    nt = tl.load(span_ptr + 1) - t0
    first = (w // (GROUP * NB)) * GROUP
    rows = tl.minimum(nt - first, GROUP)
    return t0 + first + (w % (GROUP * NB)) % rows, (w % (GROUP * NB)) // rows


@triton.jit
def _n_work(span_ptr, N, COLS: tl.constexpr):
    """The group's work items: its tiles x the COLS-column blocks of an output of N columns."""
    return (tl.load(span_ptr + 1) - tl.load(span_ptr)) * (N // COLS)


@triton.jit(do_not_specialize=["grp"])
def _up8(xq_ptr, xe_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, span_ptr, grp, q_ptr, r_ptr, hq_ptr, he_ptr,
         e0, I, D, limit, K_SEL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """h = swiglu(w1 x, w3 x) for the group's tiles of sorted pairs, as e4m3 bytes hq [P, I] and one
    exponent byte per 128-slice he [P, I / 128]; x is e4m3 xq [S, D] with exponents xe [S, D / 128];
    w1 and w3 staged as a pair (q [G, 2I, D] rows interleaved, r [G, I / 128, D / 128, 2]): one dot of
    BLOCK_M pairs x 256 staged rows per 128-column step gives g and u side by side, promoted by w1's
    block scale on the even columns and w3's on the odd (each thread's columns are fixed, so that is
    still one FMA per element: sm_90, 180 instructions a step). The group's tiles:
    span[grp] to span[grp + 1] (an index, so one compiled kernel serves every group)."""
    for w in range(tl.program_id(0), _n_work(span_ptr + grp, I, 128), tl.num_programs(0)):
        t, nb = _work(span_ptr + grp, w, I // 128, GROUP)
        e = tl.load(tile_e_ptr + t).to(tl.int64)
        r = tl.load(tile_lo_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)
        rm = r < tl.load(tile_hi_ptr + t)
        tok = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64) // K_SEL
        nb = nb.to(tl.int64)
        wr = ((e - e0) * I + nb * 128) * 2 + tl.arange(0, 256)
        wb = ((e - e0) * (I // 128) + nb) * (D // 128)  # the pair's staged exponents, this column block
        odd = (tl.arange(0, 256) % 2)[None, :]
        acc = tl.zeros([BLOCK_M, 256], tl.float32)
        for kb in range(0, D // 128):
            s1 = _pow2(tl.load(r_ptr + (wb + kb) * 2).to(tl.int32))
            sw = tl.where(odd == 1, _pow2(tl.load(r_ptr + (wb + kb) * 2 + 1).to(tl.int32)), s1)
            acc += _step(xq_ptr, tok, rm, xe_ptr, D, kb, q_ptr, wr, sw, IEEE)
        g, u = tl.split(tl.reshape(acc, [BLOCK_M, 128, 2]))
        g = tl.minimum(g * 0.015625, limit)  # the staged form's 2^-6
        u = tl.minimum(tl.maximum(u * 0.015625, -limit), limit)
        h = g * tl.sigmoid(g) * u
        ex = _pow2_exponent(tl.max(tl.abs(h), 1), 448.0)
        rn = nb * 128 + tl.arange(0, 128)
        tl.store(hq_ptr + r[:, None] * I + rn[None, :], to_e4m3(h, ex, IEEE), mask=rm[:, None])
        tl.store(he_ptr + r * (I // 128) + nb, ex.to(tl.uint8), mask=rm)


@triton.jit(do_not_specialize=["grp"])
def _down8(hq_ptr, he_ptr, order_ptr, wts_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, span_ptr, grp, q2_ptr, r2_ptr,
           y_ptr, e0, I, D, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           GROUP: tl.constexpr):
    """y[pair] = weight(pair) x w2 h for the group's tiles (w2 staged: q [G, D, I], r [G, D / 128, I / 128];
    BLOCK_N 128 or 256 output columns, each promoted by its 128-row block's scale), stored at the
    pair's (token, slot) row of y [P, D] (float32)."""
    for w in range(tl.program_id(0), _n_work(span_ptr + grp, D, BLOCK_N), tl.num_programs(0)):
        t, nb = _work(span_ptr + grp, w, D // BLOCK_N, GROUP)
        e = tl.load(tile_e_ptr + t).to(tl.int64)
        r = tl.load(tile_lo_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)
        rm = r < tl.load(tile_hi_ptr + t)
        rn = nb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        wr = (e - e0) * D + rn
        wb = ((e - e0) * (D // 128) + nb * (BLOCK_N // 128)) * (I // 128)  # the first 128-row block's exponents
        hi = (tl.arange(0, BLOCK_N) >= 128)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, I // 128):
            sw = _pow2(tl.load(r2_ptr + wb + kb).to(tl.int32))
            if BLOCK_N == 256:
                sw = tl.where(hi, _pow2(tl.load(r2_ptr + wb + I // 128 + kb).to(tl.int32)), sw)
            acc += _step(hq_ptr, r, rm, he_ptr, I, kb, q2_ptr, wr, sw, IEEE)
        pair = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64)
        wt = tl.load(wts_ptr + pair, mask=rm, other=0.0) * 0.015625
        tl.store(y_ptr + pair[:, None] * D + rn[None, :], acc * wt[:, None], mask=rm[:, None])


def stageable(experts: ExpertSet) -> bool:
    """Whether the set's weights stage exactly (cached in experts.tables): MXFP4, every dimension a
    multiple of 128, and in every 128 x 128 block of each weight each MX group holding a non-zero value
    lies at most SPAN binades below the block's largest MX byte, which is at least 1 (DeepSeek's own
    block-FP8 form of the MXFP4 experts; reported bit-exact on the published checkpoints)."""
    t = experts.tables
    if "staged_ok" not in t:
        ws = experts.w1 + experts.w3 + experts.w2
        ok = getattr(experts, "local", None) is None and all(
            w.fmt == "mxfp4" and w.dense is None and w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0
            and w.data.is_contiguous() and w.scale.is_contiguous() and w.data.data_ptr() % 16 == 0
            and w.scale.data_ptr() % 16 == 0 for w in ws)
        if ok and (ws[0].data.is_cuda or interpreted()):  # three launches (_stage's blocks), one read back
            from .prefill_experts import _tables  # (it imports this module)

            tab, E, (I, D) = _tables(experts, ws[0].data.device), len(experts), experts.w1[0].shape
            flag = torch.zeros(1, dtype=torch.int32, device=ws[0].data.device)
            for name, (N, K) in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
                _check[(E, N // 128, K // 128)](tab[name], tab["s" + name], flag, N, K, num_warps=4)
            ok = not bool(flag.item())
        elif ok:  # the torch reference (weights on the CPU)
            ok = not any(bool(_inexact(w)) for w in ws)
        t["staged_ok"] = ok
    return t["staged_ok"]


def _down_cols(D: int) -> int:
    """Output columns per down-kernel tile: 256 when D allows (a K step of 64 x 256 x 128 for 180 sm_90
    instructions, against 131 for 64 x 128 x 128: issue-bound), else 128."""
    return 256 if D % 256 == 0 else 128


def _inexact(w) -> torch.Tensor:
    """Whether any 128 x 128 block of weight w has a group with a non-zero value more than SPAN binades
    below the block's largest MX byte, or a largest byte of 0 (a 0-d bool tensor, on w's device)."""
    N, K = w.shape
    s = w.scale.view(torch.uint8).reshape(N // 128, 128, K // 128, 4).int()
    used = (w.data.view(torch.uint8).reshape(N // 128, 128, K // 128, 4, 16) & 0x77).amax(-1) > 0
    ref = s.amax((1, 3), keepdim=True)
    return (used & ((s < ref - SPAN) | (ref < 1))).any()


def staged_supported(x: torch.Tensor, experts: ExpertSet, act_quant: bool) -> bool:
    """This path for a chunk: TILE on, faithful mode, at least TILE["min_rows"] tokens, a stageable set."""
    return TILE["on"] and act_quant and x.shape[0] >= TILE["min_rows"] and stageable(experts)


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
    ids = ids.long()
    counts = expert_counts(ids, E)
    order, tile_e, lo, hi = schedule(ids, E, t["m"], counts)
    spans = group_spans(counts, t["m"], G)
    xq, xe = quantise_rows_fp8(x.contiguous())
    P = S * k
    hq = torch.empty((P, I), device=x.device, dtype=torch.float8_e4m3fn)
    he = torch.empty((P, I // 128), device=x.device, dtype=torch.uint8)
    y = torch.empty((P, D), device=x.device, dtype=torch.float32)
    q = torch.empty(2 * G * I * D, device=x.device, dtype=torch.float8_e4m3fn)  # w1 + w3 paired, or w2
    rb = torch.empty(2 * G * (I // 128) * (D // 128), device=x.device, dtype=torch.uint8)
    wts = weights.float().contiguous().reshape(-1)
    ieee, progs, dn = interpreted(), _programs(x.device), _down_cols(D)
    q8 = q.view(torch.uint8)
    for j, e0 in enumerate(range(0, E, G)):
        n = min(G, E - e0)
        _stage[(n, I // 128, D // 128)](tables["w1"], tables["sw1"], tables["w3"], tables["sw3"], counts, q8, rb, e0,
                                        I, D, PAIR=True, num_warps=4)
        _up8[(progs,)](xq.view(torch.float8_e4m3fn), xe, order, tile_e, lo, hi, spans, j, q, rb, hq, he, e0, I,
                       D, float(limit), K_SEL=k, IEEE=ieee, BLOCK_M=t["m"], GROUP=t["group"],
                       num_warps=t["warps"], num_stages=t["stages"])
        _stage[(n, D // 128, I // 128)](tables["w2"], tables["sw2"], tables["w2"], tables["sw2"], counts, q8, rb, e0,
                                        D, I, PAIR=False, num_warps=4)
        _down8[(progs,)](hq, he, order, wts, tile_e, lo, hi, spans, j, q, rb, y, e0, I, D, IEEE=ieee,
                         BLOCK_M=t["m"], BLOCK_N=dn, GROUP=t["group"], num_warps=t["warps"],
                         num_stages=t["stages"])
    return y.view(S, k, D).sum(1).to(x.dtype)
