"""Triton kernel for kernels.chunk_attention: a prefill chunk's attention, flash-attention style.

One program per (query, block of heads): the heads of one query share every key (shared-KV MQA), so
the M side of the tensor-core dots is the heads (64 at V4-Flash) and the keys stream through in
tiles of BLOCK_T with an online softmax (running max, sum and [heads, D] accumulator in registers;
nothing of size queries x keys exists). Keys, per query t:
- the window: the ring rows before the chunk and the chunk's own keys t-W+1..t (float / bf16 rows);
- HCA (select is None): compressed entries 0..(t+1)//m - 1, read from the cache store in its format
  (FP8 e4m3 + ue8m0 per 64 channels + BF16 RoPE channels, or float32) at rows[e], dequantised in
  registers;
- CSA: the indexer's top-k entry indices select[t, :] (-1 = none), read the same way.
The sink joins the denominator at the end; the output is float32. Dots run on bf16 operands for
bf16 queries (faithful mode rounds its queries to bf16; FP8 entries and BF16 RoPE channels are
exact in bf16; the probabilities are rounded to bf16 for P.V, as flash attention does), else at
float32 accuracy (3xTF32; IEEE in the CPU interpreter). Index arithmetic is int64 (rows and
positions pass 2^31 in long contexts).

H200, 3328-query chunk at 8k context, bf16 queries (bench/tune_prefill.py, 2026-12-01): 64 heads x
64 keys per tile, 8 warps, one stage: CSA (top-512) 4.3 ms = 65 TFLOP/s, HCA 1.35 ms, SWA 0.79 ms;
the first choice (32 heads x 32 keys, two stages) took 16.4 / 2.8 / 0.89 ms.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.entries import store_kind

from .attention import KIND, _pow2, _precision, interpreted
from .elementwise import apply_rope_triton

# Heads per program (the M side of the dots; fewer for float32 queries, whose [heads, D] tile and
# accumulator must both stay in registers at D = 512), keys per tile, warps, pipeline stages.
# float32 queries (3xTF32 dots) at D = 512 asked for 250 KB of shared memory with 32-key tiles and
# the default software pipelining (H200, limit 227 KB): they take 16-key tiles, one stage.
# The bf16 tile (64 heads x 64 keys, one stage) spills 1.3 KB a thread on sm_90 (Triton 3.6; 16-key
# tiles at two stages spill nothing) yet is the fastest measured: H100 2026-12-07, CSA 4.94 ms against
# 6.1-7.2 ms for 16 / 32 keys (bench/results/h100_tune_prefill_attention.json).
# rope_out: the inverse RoPE of the output in the kernel's epilogue (else a pass of its own over the
# [S, H, D] float32 output: 1.7 GB read and written for a 6400-query chunk at V4-Flash dimensions; the
# epilogue took an 8k prefill of 4 Flash layers from 133.9 to 130.2 ms on an H100).
# dense_entries: an FP8 entry store's n entries are widened once per call into [n, D] rows of the dots'
# dtype (bf16 for bf16 queries), indexed by entry id (``dense_entries``: n x D x 2 bytes, 268 MB for the
# 262k CSA entries of a 1M-token context), so the key loops load rows instead of widening FP8 tiles per
# query and head block (sm_90, Triton 3.6, the bf16 CSA loop: 2453 -> 1605 instructions per 64-key
# tile, the stack 1280 -> 912 bytes); the same keys bit for bit, so the same output. Off until timed.
TILE = {"heads_f32": 16, "heads_bf16": 64, "keys": 64, "keys_f32": 16, "stages_f32": 1, "stages_bf16": 1,
        "warps": 8, "rope_out": True, "dense_entries": False}


@triton.jit
def _entry_tile(ea_ptr, eb_ptr, es_ptr, rows, tmask, d, D: tl.constexpr, NOPE: tl.constexpr, KIND: tl.constexpr):
    """Entries at store rows [BLOCK_T] (int64) as float32 [BLOCK_T, BLOCK_D]; 0 where not tmask. The FP8
    part's ue8m0 scales (one per 64 channels) are read once per row and group, then spread over the
    group (sm_90, Triton 3.6: the CSA loop 2862 -> 2453 instructions a tile against a load per channel)."""
    dm = d < D
    r = rows[:, None]
    if KIND == 0:  # d is tl.arange(0, BLOCK_D), BLOCK_D >= 64: the 64-channel groups tile it
        BLOCK_T: tl.constexpr = rows.shape[0]
        BLOCK_D: tl.constexpr = d.shape[0]
        tl.static_assert(BLOCK_D % 64 == 0)
        nope = d < NOPE
        m8 = tmask[:, None] & nope[None, :]
        f8 = tl.load(ea_ptr + r * NOPE + d[None, :], mask=m8, other=0)
        g = tl.arange(0, BLOCK_D // 64)
        sg = tl.load(es_ptr + r * (NOPE // 64) + g[None, :], mask=tmask[:, None] & (g < NOPE // 64)[None, :], other=127)
        sc = tl.reshape(tl.broadcast_to(_pow2(sg.to(tl.int32))[:, :, None], [BLOCK_T, BLOCK_D // 64, 64]),
                        [BLOCK_T, BLOCK_D])
        k8 = f8.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc
        rm = tmask[:, None] & ((d >= NOPE) & dm)[None, :]
        kb = tl.load(eb_ptr + r * (D - NOPE) + (d[None, :] - NOPE), mask=rm, other=0.0).to(tl.float32)
        out = tl.where(nope[None, :], k8, kb)
    else:
        out = tl.load(ea_ptr + r * D + d[None, :], mask=tmask[:, None] & dm[None, :], other=0.0)
    return out


@triton.jit
def _fold(q, k, valid, m, l, acc, scale, BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile k [BLOCK_T, BLOCK_D] (bf16 with BF16, else float32; valid [BLOCK_T]) into the
    online softmax of q [BLOCK_H, BLOCK_D]: -> (m, l [BLOCK_H], acc [BLOCK_H, BLOCK_D])."""
    if BF16:
        kb = k.to(tl.bfloat16)
        s = tl.dot(q, tl.trans(kb))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - safe[:, None])
    alpha = tl.exp(m - safe)
    l = l * alpha + tl.sum(p, 1)
    # P.V accumulates into the rescaled accumulator inside the dot (no [heads, D] product of its own)
    if BF16:
        acc = tl.dot(p.to(tl.bfloat16), kb, acc * alpha[:, None])
    else:
        acc = tl.dot(p, k, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _chunk_attention(q_ptr, qpos_ptr, wk_ptr, wpos_ptr, ea_ptr, eb_ptr, es_ptr, rows_ptr, sel_ptr, sink_ptr, out_ptr,
                     cos_ptr, sin_ptr, H, WR, n, K, scale,
                     W: tl.constexpr, RATIO: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, KIND: tl.constexpr,
                     HAS_ENTRIES: tl.constexpr, HAS_SELECT: tl.constexpr, DENSE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr,
                     RD: tl.constexpr):
    """Grid (queries, head blocks). wk: [WR + S, D] window keys (the ring's WR rows, then the chunk's),
    wpos: their positions (-1: empty); rows: [n] store rows of entries 0..n-1; sel: [S, K] entry ids.
    DENSE: ea holds entry e's D channels at row e (``dense_entries``; KIND is then the plain-rows kind).
    RD > 0: the output's last RD channels rotate back by the query's angle (cos / sin [S, RD/2]) before
    the store: channel pairs (2j, 2j+1) are adjacent in the accumulator, so no data moves between threads."""
    i, hb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    H64 = H.to(tl.int64)
    q = tl.load(q_ptr + (i * H64 + h[:, None]) * D + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    if BF16:
        q = q.to(tl.bfloat16)
    else:
        q = q.to(tl.float32)
    t = tl.load(qpos_ptr + i).to(tl.int64)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # the window: ring rows 0..WR-1 (all before the chunk, so seen only by queries i <= W-2), then
    # chunk rows max(0, i-W+1)..i (at offset WR)
    for j0 in range(0, tl.where(i <= W - 2, WR, 0), BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        kp = tl.load(wpos_ptr + j, mask=j < WR, other=-1).to(tl.int64)
        ok = (j < WR) & (kp >= 0) & (kp <= t) & (kp > t - W)
        k = tl.load(wk_ptr + j[:, None].to(tl.int64) * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
        m, l, acc = _fold(q, k, ok, m, l, acc, scale, BF16, PRECISION)
    lo = tl.maximum(i - W + 1, 0)
    for j0 in range(lo, i + 1, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        ok = j <= i
        k = tl.load(wk_ptr + (WR + j[:, None]) * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
        m, l, acc = _fold(q, k, ok, m, l, acc, scale, BF16, PRECISION)
    if HAS_ENTRIES:
        if HAS_SELECT:
            for c0 in range(0, K, BLOCK_T):
                c = c0 + tl.arange(0, BLOCK_T)
                e = tl.load(sel_ptr + i * K + c, mask=c < K, other=-1).to(tl.int64)
                ok = e >= 0
                if DENSE:
                    r = tl.maximum(e, 0)
                else:
                    r = tl.load(rows_ptr + tl.maximum(e, 0), mask=ok, other=0).to(tl.int64)
                k = _entry_tile(ea_ptr, eb_ptr, es_ptr, r, ok, d, D, NOPE, KIND)
                m, l, acc = _fold(q, k, ok, m, l, acc, scale, BF16, PRECISION)
        else:
            seen = tl.minimum((t + 1) // RATIO, n)
            for e0 in range(0, seen, BLOCK_T):
                e = e0 + tl.arange(0, BLOCK_T).to(tl.int64)
                ok = e < seen
                if DENSE:
                    r = e
                else:
                    r = tl.load(rows_ptr + e, mask=ok, other=0).to(tl.int64)
                k = _entry_tile(ea_ptr, eb_ptr, es_ptr, r, ok, d, D, NOPE, KIND)
                m, l, acc = _fold(q, k, ok, m, l, acc, scale, BF16, PRECISION)
    sink = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32)
    top = tl.maximum(m, sink)
    a = tl.exp(m - top)
    o = acc * a[:, None] / (l * a + tl.exp(sink - top))[:, None]
    if RD > 0:  # the inverse RoPE: (x, y) -> (x c + y s, y c - x s) on the rope pairs, identity elsewhere
        ev, od = tl.split(tl.reshape(o, [BLOCK_H, BLOCK_D // 2, 2]))
        j = tl.arange(0, BLOCK_D // 2) - (D - RD) // 2
        rj = (j >= 0) & (j < RD // 2)
        c = tl.load(cos_ptr + i * (RD // 2) + j, mask=rj, other=1.0)[None, :]
        sn = tl.load(sin_ptr + i * (RD // 2) + j, mask=rj, other=0.0)[None, :]
        o = tl.reshape(tl.join(ev * c + od * sn, od * c - ev * sn), [BLOCK_H, BLOCK_D])
    tl.store(out_ptr + (i * H64 + h[:, None]) * D + d[None, :], o, mask=hm[:, None] & dm[None, :])


@triton.jit
def _dense_entries(ea_ptr, eb_ptr, es_ptr, rows_ptr, out_ptr, n, D: tl.constexpr, NOPE: tl.constexpr,
                   KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [n, D] (out's dtype) = entries 0..n-1 read at store rows[e] in their format, widened as the
    attention kernel widens them (float32, then out's dtype: the same keys its dots would see)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = e < n
    d = tl.arange(0, BLOCK_D)
    r = tl.load(rows_ptr + e, mask=ok, other=0).to(tl.int64)
    k = _entry_tile(ea_ptr, eb_ptr, es_ptr, r, ok, d, D, NOPE, KIND)
    tl.store(out_ptr + e[:, None] * D + d[None, :], k.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (d < D)[None, :])


def dense_entries(ea, eb, es, rows: torch.Tensor, D: int, nope: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The entries at store rows ``rows`` [n] (int64) of a store of ``kind`` (its parts ea / eb / es as
    the attention kernel takes them) as dense [n, D] rows of ``dtype``, row e = entry e."""
    n = rows.shape[0]
    out = torch.empty((n, D), device=rows.device, dtype=dtype)
    BLOCK_T = 16
    _dense_entries[(triton.cdiv(n, BLOCK_T),)](ea, eb, es, rows, out, n, D=D, NOPE=nope, KIND=KIND[kind],
                                               BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(D))
    return out


def chunk_attention_supported(q, positions, ring, ring_pos, kv, window, entries, rows, ratio, select, sink,
                              scale, out_rope=None) -> bool:
    """KV entry stores (FP8 or float32), float32 / bf16 queries, no autograd."""
    return not q.requires_grad and q.dtype in (torch.float32, torch.bfloat16) and (
        entries is None or store_kind(entries) in ("kv", "f32"))


def chunk_attention_triton(q: torch.Tensor, positions: torch.Tensor, ring: torch.Tensor, ring_pos: torch.Tensor,
                           kv: torch.Tensor, window: int, entries: dict | None, rows, ratio: int, select, sink,
                           scale: float, out_rope=None) -> torch.Tensor:
    """kernels.chunk_attention (contract: kernels/reference/chunk_attention.py) in one launch, the
    inverse RoPE of ``out_rope`` in its epilogue (TILE["rope_out"]; else one more pass after it)."""
    S, H, D = q.shape
    bf16 = q.dtype == torch.bfloat16 and not interpreted()
    wdt = torch.bfloat16 if bf16 else torch.float32
    wk = torch.cat([ring.to(wdt), kv.to(wdt)], 0).contiguous()
    wpos = ring_pos.to(torch.int64).contiguous()
    if entries is None:
        ea = eb = es = wk
        kind, nope, n = "f32", D, 0
        rows = wpos
    else:
        kind, n = store_kind(entries), rows.shape[0]
        if kind == "kv":
            ea, eb, es = entries["fp8"].view(torch.uint8), entries["bf16"], entries["scales"]
            nope = entries["fp8"].shape[1]
        else:
            ea = eb = es = entries["f32"]
            nope = D
        rows = rows.to(torch.int64).contiguous()
    dense = kind == "kv" and n > 0 and TILE["dense_entries"]
    if dense:  # entry e at row e of plain [n, D] rows of the dots' dtype (KIND "f32": rows loaded as they are)
        ea = eb = es = dense_entries(ea, eb, es, rows, D, nope, kind, wdt)
        kind, nope = "f32", D
    sel = select.to(torch.int64).contiguous() if select is not None else wpos
    K = select.shape[1] if select is not None else 0
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    BLOCK_H = max(16, min(TILE["heads_bf16" if bf16 else "heads_f32"], triton.next_power_of_2(H)))
    fused = out_rope is not None and TILE["rope_out"]
    cos, sin = (c.float().contiguous() for c in out_rope) if fused else (out, out)
    _chunk_attention[(S, triton.cdiv(H, BLOCK_H))](
        q.contiguous(), positions.to(torch.int64).contiguous(), wk, wpos, ea, eb, es, rows, sel,
        sink.float().contiguous(), out, cos, sin, H, ring.shape[0], n, K, float(scale),
        W=window, RATIO=max(ratio, 1), D=D, NOPE=nope, KIND=KIND[kind], HAS_ENTRIES=n > 0,
        HAS_SELECT=select is not None, DENSE=dense, BLOCK_H=BLOCK_H, BLOCK_T=TILE["keys" if bf16 else "keys_f32"],
        BLOCK_D=triton.next_power_of_2(D), BF16=bf16, PRECISION=_precision(), num_warps=TILE["warps"],
        num_stages=TILE["stages_bf16" if bf16 else "stages_f32"], RD=2 * cos.shape[-1] if fused else 0)
    if out_rope is not None and not fused:
        out = apply_rope_triton(out, *out_rope, inverse=True)
    return out
