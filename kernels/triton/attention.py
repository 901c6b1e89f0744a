"""Triton kernels for the attention of one decode token over the cache in its storage formats.

store_entry: quantise one entry and write its row in one launch (FP8 e4m3 + ue8m0 scale per 64
  channels + BF16 RoPE channels; FP4 e2m1 + ue8m0 per 32, packed; or float32). Scales are built from
  the bits of amax / qmax (the smallest power of two >= it), so rounding matches kernels/quant.py.
decode_attention: flash-decoding over the window ring and the compressed entries. Grid (head blocks,
  key blocks, output channel blocks); each program dequantises its keys on the fly, scores them
  against all heads of its block with tensor-core dots at about float32 accuracy (dequantised FP8 /
  BF16 keys are exact in bf16, so only the float32 side is split into three bf16 parts; faithful
  mode's bf16 queries need one part: sm_90, 4648 -> 2160 instructions a program, the same bits),
  and writes its max / sum / weighted values; a second launch merges the key blocks with the sink.
Contracts as kernels/entries.py and kernels/attention.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.entries import store_kind

from . import pdl

KIND = {"kv": 0, "fp4": 1, "f32": 2}
PRECISION = "tf32x3"  # float32 entries: tensor-core dots at about float32 accuracy (three TF32 products)
# decode_attention tiles: heads and keys per program, channels per score chunk, output channels per
# program. H200, 64 heads x 512, both launches: 23.2 / 19.1 / 18.0 us for 512 / 256 / 16 entries
# (bench/tune_kernels.py --only attention, bench/results/h200_tune_attention.json), where 32-channel
# chunks and 64 output channels per program, the chunk loop not unrolled, took 30.2 / 22.5 / 17.8 us
# (and on the H100 29 / 18 us for 512 / 16 entries; the design before that, 16 heads x all 512
# channels per program with register spills, 46 / 24 us).
# merge: output channels per program of the second launch (H100, bench/tune_kernels.py --only merge:
# both launches 22.4 / 17.4 us at 512 / 16 entries with 256, 23.0 / 17.6 with 512 = one program per
# head as before, 27.2 / 17.8 with 128; bench/results/h100_tune_merge.json).
ATTENTION = {"heads": 64, "keys": 16, "chunk": 64, "values": 256, "warps": 4, "merge": 256}


@triton.jit
def _pow2_exponent(amax, QMAX: tl.constexpr):
    """ue8m0 byte (int32) of the smallest power of two >= max(amax, 2^-100) / QMAX, exactly."""
    r = tl.maximum(amax, 7.888609052210118e-31) / QMAX
    bits = r.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 255) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.minimum(tl.maximum(e, 0), 254)


@triton.jit
def _pow2(e):
    """2^(e - 127) as float32 for an int32 exponent byte e in 1..254 (0 gives 0, not 2^-127: the
    amax floor of _pow2_exponent keeps scales far above it)."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_at(g, e):
    """g [R, C] float32 divided by 2^(e - 127) per row (e [R] int32 ue8m0 bytes), clamped and
    rounded to e4m3: the stored FP8 values of a 1 x C slice per row (float32, exact in e4m3)."""
    return _round_e4m3(tl.minimum(tl.maximum(g * _pow2(254 - e)[:, None], -448.0), 448.0))


@triton.jit
def _round_e4m3(v):
    """v (|v| <= 448) rounded to the nearest FP8 e4m3 value, ties to even, in float32 arithmetic
    (so the cast that follows is exact whatever rounding the conversion itself would do)."""
    ex = ((v.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    ex = tl.maximum(ex, -6)  # below 2^-6 the grid is the subnormal one, step 2^-9
    step = ((ex - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = v / step
    return ((y + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: float32 addition rounds to even


@triton.jit
def _bf16_bits(v):
    """float32 -> bfloat16 bits (int16), round to nearest even."""
    b = v.to(tl.uint32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _e2m1_code(v):
    """Round v (already scaled into [-6, 6]) to an e2m1 code: nearest, ties to the even mantissa."""
    a = tl.minimum(tl.abs(v), 6.0)
    i = ((a > 0.25).to(tl.int32) + (a > 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a > 1.75).to(tl.int32)
         + (a > 2.5).to(tl.int32) + (a > 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    i += ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(tl.int32)
    return i + 8 * ((v < 0) & (i > 0)).to(tl.int32)


@triton.jit
def _store_entry(x_ptr, row_ptr, a_ptr, b_ptr, s_ptr, D: tl.constexpr, NOPE: tl.constexpr,
                 KIND: tl.constexpr, BLOCK: tl.constexpr, NGP: tl.constexpr, PDL: tl.constexpr):
    """Entry i = program 0..k-1: x[i] [D] -> store row row_ptr[i]. NGP: the number of scale groups
    rounded up to a power of two."""
    pdl.wait(PDL)
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(row_ptr + i).to(tl.int64)
    x_ptr += i * D
    if KIND == 0:  # kv: a = fp8 [., NOPE] (as uint8), b = bf16 [., D-NOPE], s = scales [., NOPE/64]
        NG: tl.constexpr = NOPE // 64
        gi = tl.arange(0, NGP)
        g = gi[:, None] * 64 + tl.arange(0, 64)[None, :]
        gm = (gi < NG)[:, None]
        v = tl.load(x_ptr + g, mask=gm, other=0.0).to(tl.float32)
        e = _pow2_exponent(tl.max(tl.abs(v), 1), 448.0)
        q = _e4m3_at(v, e)
        tl.store(a_ptr + row * NOPE + g, q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=gm)
        tl.store(s_ptr + row * NG + gi, e.to(tl.uint8), mask=gi < NG)
        r = tl.arange(0, BLOCK)
        rm = r < D - NOPE
        tl.store(b_ptr + row * (D - NOPE) + r, _bf16_bits(tl.load(x_ptr + NOPE + r, mask=rm, other=0.0).to(tl.float32)),
                 mask=rm)
    elif KIND == 1:  # fp4: a = packed codes [., D/2], s = scales [., D/32]
        NG: tl.constexpr = D // 32
        gi = tl.arange(0, NGP)
        p = gi[:, None] * 16 + tl.arange(0, 16)[None, :]  # pair index
        gm = (gi < NG)[:, None]
        ve = tl.load(x_ptr + 2 * p, mask=gm, other=0.0).to(tl.float32)
        vo = tl.load(x_ptr + 2 * p + 1, mask=gm, other=0.0).to(tl.float32)
        e = _pow2_exponent(tl.maximum(tl.max(tl.abs(ve), 1), tl.max(tl.abs(vo), 1)), 6.0)
        inv = _pow2(254 - e)[:, None]
        code = _e2m1_code(ve * inv) | (_e2m1_code(vo * inv) << 4)
        tl.store(a_ptr + row * (D // 2) + p, code.to(tl.uint8), mask=gm)
        tl.store(s_ptr + row * NG + gi, e.to(tl.uint8), mask=gi < NG)
    else:
        r = tl.arange(0, BLOCK)
        rm = r < D
        tl.store(a_ptr + row * D + r, tl.load(x_ptr + r, mask=rm, other=0.0).to(tl.float32), mask=rm)


def store_entry_supported(x: torch.Tensor, store: dict, row: torch.Tensor) -> bool:
    """One x row per row index (a tensor); FP8 KV stores whole 64-channel scale groups, FP4 stores
    whole 32-groups; no autograd."""
    kind, D = store_kind(store), x.shape[-1]
    return isinstance(row, torch.Tensor) and row.device == x.device and x.numel() == row.numel() * D and not (
        x.requires_grad or (kind == "kv" and store["fp8"].shape[1] % 64) or (kind == "fp4" and D % 32))


def store_entry_triton(x: torch.Tensor, store: dict, row: torch.Tensor) -> None:
    """kernels.store_entry for CUDA tensors: x [k, D] at rows [k] (a decode step's one entry, or a
    prefill chunk's entries and window rows), one launch, one program per entry."""
    kind = store_kind(store)
    D = x.shape[-1]
    xs = x.reshape(-1).contiguous()
    if kind == "kv":
        nope = store["fp8"].shape[1]
        a, b, s = store["fp8"].view(torch.uint8), store["bf16"].view(torch.int16), store["scales"]
    elif kind == "fp4":
        nope, a, b, s = D, store["fp4"], store["fp4"], store["scales"]
    else:
        nope, a, b, s = D, store["f32"], store["f32"], store["f32"]
    groups = nope // 64 if kind == "kv" else D // 32
    _store_entry[(row.numel(),)](xs, row.reshape(-1), a, b, s, D=D, NOPE=nope, KIND=KIND[kind],
                       BLOCK=triton.next_power_of_2(max(D - nope, D if kind == "f32" else 1, 16)),
                       NGP=triton.next_power_of_2(max(groups, 1)), **pdl.launch(xs.device))


@triton.jit
def _load_keys(a_ptr, b_ptr, s_ptr, ea_ptr, eb_ptr, es_ptr, in_ring, rows, tmask, d,
               D: tl.constexpr, NOPE: tl.constexpr, KIND: tl.constexpr):
    """Keys [BLOCK_T, BLOCK_D] float32: row rows[i] of the ring store (a, b, s) where in_ring, else of
    the entry store (ea, eb, es). KIND 0: fp8 + ue8m0 scales + bf16 RoPE channels; 2: float32."""
    dm = d < D
    r = rows[:, None].to(tl.int64)
    ring = in_ring[:, None]
    if KIND == 0:
        nope = d < NOPE
        m8 = tmask[:, None] & nope[None, :]
        f8 = tl.load(tl.where(ring, a_ptr, ea_ptr) + r * NOPE + d[None, :], mask=m8, other=0)
        sc = tl.load(tl.where(ring, s_ptr, es_ptr) + r * (NOPE // 64) + d[None, :] // 64, mask=m8, other=127)
        k8 = f8.to(tl.float8e4nv, bitcast=True).to(tl.float32) * _pow2(sc.to(tl.int32))
        rm = tmask[:, None] & ((d >= NOPE) & dm)[None, :]
        kb = tl.load(tl.where(ring, b_ptr, eb_ptr) + r * (D - NOPE) + (d[None, :] - NOPE), mask=rm,
                     other=0.0).to(tl.float32)
        return tl.where(nope[None, :], k8, kb)
    else:
        return tl.load(tl.where(ring, a_ptr, ea_ptr) + r * D + d[None, :], mask=tmask[:, None] & dm[None, :], other=0.0)


@triton.jit
def _dot3(a, b, EXACT_B: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] float32 @ b [K, N] at about float32 accuracy. EXACT_B: b's values are exact in bf16
    (FP8 entries and BF16 RoPE channels are), so a is split into three bf16 parts (hi + mid + lo,
    ~24 bits) and three bf16 tensor-core products are summed; else 3xTF32 on float32 operands.
    PRECISION "ieee" (Triton's CPU interpreter, whose bf16 dot is wrong) multiplies the same
    bf16-valued parts as float32."""
    if EXACT_B:
        hi = a.to(tl.bfloat16)
        r = a - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        if PRECISION == "ieee":
            return (tl.dot(hi.to(tl.float32), b, input_precision="ieee")
                    + tl.dot(mid.to(tl.float32), b, input_precision="ieee")
                    + tl.dot(lo.to(tl.float32), b, input_precision="ieee"))
        bb = b.to(tl.bfloat16)
        return tl.dot(hi, bb) + tl.dot(mid, bb) + tl.dot(lo, bb)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _score_chunk(q_ptr, h, hm, c0, ra_ptr, rb_ptr, rs_ptr, ea_ptr, eb_ptr, es_ptr, in_ring, rows, valid,
                 D: tl.constexpr, NOPE: tl.constexpr, KIND: tl.constexpr, BLOCK_C: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Scores [BLOCK_H, BLOCK_T] over channels [c0, c0 + BLOCK_C): q[h] . key. bf16 queries (faithful
    mode rounds them) against keys exact in bf16 (KIND 0): one bf16 product, the first of _dot3's three
    (whose other two parts would be zero)."""
    d = c0 + tl.arange(0, BLOCK_C)
    q = tl.load(q_ptr + h[:, None] * D + d[None, :], mask=hm[:, None] & (d[None, :] < D), other=0.0)
    k = _load_keys(ra_ptr, rb_ptr, rs_ptr, ea_ptr, eb_ptr, es_ptr, in_ring, rows, valid, d, D, NOPE, KIND)
    if KIND == 0 and q_ptr.dtype.element_ty == tl.bfloat16:
        if PRECISION == "ieee":
            return tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k).to(tl.bfloat16))
    return _dot3(q.to(tl.float32), tl.trans(k), KIND == 0, PRECISION)


@triton.jit
def _attend_split(q_ptr, pos_ptr, ra_ptr, rb_ptr, rs_ptr, ea_ptr, eb_ptr, es_ptr, rows_ptr, ok_ptr,
                  m_ptr, l_ptr, acc_ptr, H, T, scale,
                  W: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, KIND: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """One block of BLOCK_T keys against BLOCK_H heads; output channels [db * BLOCK_V, +BLOCK_V).
    Keys 0..W-1 are ring slots, W..W+T-1 the entries rows[0..T-1] (seen where ok). Scores are
    summed over channel chunks of BLOCK_C (every channel block recomputes them: cheap next to
    holding a [BLOCK_H, D] accumulator); the block's max, sum and weighted values are written."""
    pdl.wait(PDL)
    hb, sp, db = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    pos = tl.load(pos_ptr)
    t = sp * BLOCK_T + tl.arange(0, BLOCK_T)
    in_ring = t < W
    held = pos - ((pos - t) % W + W) % W  # position in ring slot t
    te = t - W
    ent = (te >= 0) & (te < T)
    valid = (in_ring & (held >= 0)) | (ent & (tl.load(ok_ptr + te, mask=ent, other=0) != 0))
    rows = tl.where(in_ring, t, tl.load(rows_ptr + te, mask=ent, other=0))
    s = tl.zeros([BLOCK_H, BLOCK_T], tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):  # unrolled: later chunks' loads issue ahead of the dots
        s += _score_chunk(q_ptr, h, hm, c0, ra_ptr, rb_ptr, rs_ptr, ea_ptr, eb_ptr, es_ptr, in_ring, rows, valid,
                          D, NOPE, KIND, BLOCK_C, PRECISION)
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
    dv = db * BLOCK_V + tl.arange(0, BLOCK_V)
    v = _load_keys(ra_ptr, rb_ptr, rs_ptr, ea_ptr, eb_ptr, es_ptr, in_ring, rows, valid, dv, D, NOPE, KIND)
    acc = _dot3(p, v, KIND == 0, PRECISION)
    o = (sp * H + h)
    if db == 0:
        tl.store(m_ptr + o, m, mask=hm)
        tl.store(l_ptr + o, tl.sum(p, 1), mask=hm)
    tl.store(acc_ptr + o[:, None] * BLOCK_D + dv[None, :], acc, mask=hm[:, None])


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, sink_ptr, out_ptr, H, NSPLIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
           MERGE_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """out[h, d] = sum_s e^(m_s - M) acc_s / (sum_s e^(m_s - M) l_s + e^(sink - M)), M = max(m_s, sink),
    for channels d of block pid1 (MERGE_D wide, of the padded BLOCK_D); the splits are visited
    BLOCK_S at a time. Grid (H, BLOCK_D / MERGE_D): each program reads MERGE_D channels of every
    split's partial (and the few scalars m, l again)."""
    pdl.wait(PDL)
    h = tl.program_id(0).to(tl.int64)
    sink = tl.load(sink_ptr + h).to(tl.float32)
    M = sink
    for s0 in range(0, NSPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        M = tl.maximum(M, tl.max(tl.load(m_ptr + s * H + h, mask=s < NSPLIT, other=float("-inf")), 0))
    d = tl.program_id(1).to(tl.int64) * MERGE_D + tl.arange(0, MERGE_D)
    den = tl.exp(sink - M)
    o = tl.zeros([MERGE_D], tl.float32)
    for s0 in range(0, NSPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = s < NSPLIT
        wgt = tl.where(sm, tl.exp(tl.load(m_ptr + s * H + h, mask=sm, other=float("-inf")) - M), 0.0)
        den += tl.sum(wgt * tl.load(l_ptr + s * H + h, mask=sm, other=0.0), 0)
        acc = tl.load(acc_ptr + (s[:, None] * H + h) * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
        o += tl.sum(acc * wgt[:, None], 0)
    tl.store(out_ptr + h * D + d, o / den, mask=d < D)


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), where they take
    IEEE float32 dots instead of the tensor-core forms (its bf16 dots are not exact)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision() -> str:
    """The float32 dots' input_precision: three TF32 products on the GPU, IEEE in the interpreter."""
    return "ieee" if interpreted() else PRECISION


def _parts(store: dict, kind: str):
    if kind == "kv":
        return store["fp8"].view(torch.uint8), store["bf16"], store["scales"], store["fp8"].shape[1]
    return store["f32"], store["f32"], store["f32"], store["f32"].shape[1]


def decode_attention_supported(q: torch.Tensor, ring: dict, pos, entries: dict | None, *args) -> bool:
    """KV rings (FP8 or float32) whose compressed entries, if any, have the ring's format; no autograd."""
    kind = store_kind(ring)
    return not (q.requires_grad or kind == "fp4" or (entries is not None and store_kind(entries) != kind))


def decode_attention_triton(q: torch.Tensor, ring: dict, pos: torch.Tensor, entries: dict | None, rows, ok,
                            sink: torch.Tensor, scale: float) -> torch.Tensor:
    """kernels.decode_attention for CUDA tensors: two launches, nothing read to the host."""
    kind = store_kind(ring)
    H, D = q.shape
    ra, rb, rs, nope = _parts(ring, kind)
    W = ra.shape[0]
    if entries is None:
        ea, eb, es, T = ra, rb, rs, 0
        rows = ok = pos
    else:
        ea, eb, es, _ = _parts(entries, kind)
        T = rows.shape[0]
    cfg = ATTENTION
    BLOCK_T, BLOCK_H = cfg["keys"], max(16, min(cfg["heads"], triton.next_power_of_2(H)))
    nsplit = triton.cdiv(W + T, BLOCK_T)
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_C, BLOCK_V = min(cfg["chunk"], BLOCK_D), min(cfg["values"], BLOCK_D)
    m = torch.empty((nsplit, H), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((nsplit, H, BLOCK_D), device=q.device, dtype=torch.float32)
    _attend_split[(triton.cdiv(H, BLOCK_H), nsplit, BLOCK_D // BLOCK_V)](
        q.contiguous(), pos, ra, rb, rs, ea, eb, es, rows, ok.to(torch.uint8) if entries is not None else ok,
        m, l, acc, H, T, float(scale), W=W, D=D, NOPE=nope, KIND=KIND[kind], BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, PRECISION=_precision(), num_warps=cfg["warps"],
        **pdl.launch(q.device))
    out = torch.empty((H, D), device=q.device, dtype=torch.float32)
    merge_d = min(cfg["merge"], BLOCK_D)
    _merge[(H, BLOCK_D // merge_d)](m, l, acc, sink, out, H, NSPLIT=nsplit, D=D, BLOCK_D=BLOCK_D, MERGE_D=merge_d,
                                    BLOCK_S=8, **pdl.launch(q.device))
    return out
