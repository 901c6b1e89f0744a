"""Triton kernels for kernels.indexer_select_decode: one decode token's Lightning Indexer over the
cache, keys read in their stored format, the top-k chosen on the GPU with no sort of all entries.

Seven launches, each program waiting for the launch before (no host sync, CUDA-graph safe):
- ``_order_scores``, one program per BLOCK_T entries: gathers the entries' keys at their pool rows
  (FP4 e2m1 codes widened in registers with their ue8m0 scales, or float32), scores them against all
  indexer heads with one tensor-core dot ([heads, Di] x [Di, BLOCK_T]; FP4 values are exact in bf16,
  so the faithful dots are exact products summed in float32), folds the heads (ReLU, weight, sum)
  and writes each entry's score as an order-preserving int32 (hidden entries: the code of -inf).
- ``_radix_pass`` x 4, many programs each: an exact radix select of the k-th largest code, a byte
  per level, each level a histogram of the byte over the codes matching the levels before, summed
  into a global histogram by atomics; every program derives the bytes so far from those. (Levels
  of 11 + 11 + 10 bits took 12.6 us per pass on the H100 at 16k entries: 2048-bin histograms.)
- ``_compact``, many programs: every code above the k-th largest, and of the codes equal to it the
  lowest entries (ties before a program counted from the last level's per-program histograms),
  written as (code, entry) keys to slots taken from an atomic counter.
- ``_order_chosen``, one program: a bitonic sort of the k keys (score descending, entry ascending:
  the order of the reference's stable sort); writes their pool rows and whether each is visible.
The first design, one program doing the whole select in steps of 2048 codes, took 84 us at 16k
entries on the H100 and grew with n; here the passes spread over n / SELECT["entries"] programs
(the whole op: 31 us at 16400 entries, 118 us at 262144 on the H200).

Reads n x (Di/2 + Di/32) bytes of keys and 5 x n x 4 bytes of codes: at 64k tokens of context (16k
CSA entries) about 1.4 MB, where the torch path widened every key to float32 (8 MB) and sorted all
scores. Contract as kernels/reference/indexer.indexer_select_decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.entries import store_kind

from . import pdl
from .attention import _pow2, _precision, interpreted

# Tiles from bench/tune_kernels.py --only indexer (H200, bench/results/h200_tune_indexer.json; the
# whole op in a CUDA graph, 16400 / 262144 entries): 128 entries on 4 warps per scoring program 31.2 /
# 118 us against 32.3 / 157 us for 64 on 8; the select's settings move the total by under 3 us.
SCORE = {"entries": 128, "warps": 4}  # entries per scoring program, its warps
SELECT = {"entries": 1024, "warps": 4, "sort_warps": 8}  # codes per radix-pass program, its warps; the sort's
MAX_K = 4096  # the most entries chosen (V4: 512 for Flash, 1024 for Pro): one program sorts them
# work [WORK] int32: the four radix levels' histograms (256 bins each), then the slot counter
COUNTER = tl.constexpr(4 * 256)  # index of the slot counter in work
WORK = COUNTER.value + 1
WORK_PAD = tl.constexpr(triton.next_power_of_2(WORK))  # the zeroing's block
NEG_INF_CODE = tl.constexpr(-0x7F800000 - 1)  # the order code of -inf (hidden entries): below all


@triton.jit
def _e2m1(code):
    """4-bit e2m1 codes (int32 0..15, bit 3 the sign) -> float32 (0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
    m = code & 7
    e = m >> 1
    v = tl.where(e == 0, (m & 1).to(tl.float32) * 0.5, (2 + (m & 1)).to(tl.float32) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _order_scores(q_ptr, w_ptr, codes_ptr, scales_ptr, f32_ptr, rows_ptr, ok_ptr, out_ptr, work_ptr, n, H, DI,
                  WORK: tl.constexpr, FP4: tl.constexpr, BF16: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    if tl.program_id(0) == 0:  # the select's histograms and slot counter start at zero
        w = tl.arange(0, WORK_PAD)
        tl.store(work_ptr + w, tl.zeros_like(w), mask=w < WORK)
    j = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    jm = j < n
    row = tl.load(rows_ptr + j, mask=jm, other=0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm, dm = h < H, d < DI
    q = tl.load(q_ptr + h[:, None] * DI + d[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    km = jm[:, None] & dm[None, :]
    if FP4:
        byte = tl.load(codes_ptr + row[:, None] * (DI // 2) + (d // 2)[None, :], mask=km, other=0).to(tl.int32)
        code = tl.where((d % 2 == 0)[None, :], byte & 15, byte >> 4)
        e = tl.load(scales_ptr + row[:, None] * (DI // 32) + (d // 32)[None, :], mask=km, other=0).to(tl.int32)
        k = _e2m1(code) * _pow2(e)
    else:
        k = tl.load(f32_ptr + row[:, None] * DI + d[None, :], mask=km, other=0.0)
    if BF16:  # FP4 values: exact in bf16, their products exact, summed in float32
        s = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))  # [BLOCK_H, BLOCK_T]
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
    wh = tl.load(w_ptr + h, mask=hm, other=0.0).to(tl.float32)
    score = tl.sum(tl.maximum(s, 0.0) * wh[:, None], 0) + 0.0  # + 0.0: -0.0 ties with 0.0
    bits = score.to(tl.int32, bitcast=True)
    code = tl.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the score
    seen = tl.load(ok_ptr + j, mask=jm, other=0) != 0
    tl.store(out_ptr + j, tl.where(seen, code, NEG_INF_CODE), mask=jm)


@triton.jit
def _unsigned(code):
    """Order codes (int32) -> the same order as unsigned values in an int64 (0 .. 2^32 - 1)."""
    return (code ^ -2147483648).to(tl.int64) & 0xFFFFFFFF


@triton.jit
def _digit(hist_ptr, need, NB: tl.constexpr):
    """From a histogram [NB] of the digit at one radix level (of the codes matching the digits
    above): the digit of the need-th largest code, and how many of the codes with that digit are
    still needed."""
    bins = tl.arange(0, NB)
    hist = tl.load(hist_ptr + bins)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # codes with digit >= bin
    digit = tl.max(tl.where(at_least >= need, bins, -1), 0)
    return digit, need - tl.sum(tl.where(bins > digit, hist, 0), 0)


@triton.jit
def _threshold(work_ptr, k, LEVELS: tl.constexpr):
    """The top LEVELS bytes of the k-th largest code as an unsigned prefix, and how many codes equal
    to it on those bytes are needed, from the histograms of the levels before (256 bins each)."""
    prefix = tl.zeros([], tl.int64)
    need = tl.zeros([], tl.int32) + k
    for level in tl.static_range(LEVELS):
        d, need = _digit(work_ptr + 256 * level, need, 256)
        prefix = prefix * 256 + d
    return prefix, need


@triton.jit
def _radix_pass(code_ptr, work_ptr, local_ptr, n, k, LEVEL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Histogram of byte LEVEL (0: bits 31-24 ... 3: bits 7-0 of the unsigned code) over this
    program's BLOCK codes that match the bytes found by the levels before, added into the level's
    global histogram (work); the last level also keeps each program's own (local) for the ties."""
    pdl.wait(PDL)
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    u = _unsigned(tl.load(code_ptr + j, mask=j < n, other=0))
    prefix, need = _threshold(work_ptr, k, LEVEL)
    SHIFT: tl.constexpr = 24 - 8 * LEVEL
    match = j < n
    if LEVEL > 0:
        match = match & ((u >> (SHIFT + 8)) == prefix)
    digit = tl.where(match, (u >> SHIFT) & 255, 0).to(tl.int32)
    bins = tl.arange(0, 256)
    # the lanes that do not match were counted in bin 0: take them out again
    hist = tl.histogram(digit, 256) - tl.where(bins == 0, BLOCK - tl.sum(match.to(tl.int32), 0), 0)
    tl.atomic_add(work_ptr + LEVEL * 256 + bins, hist, mask=hist != 0, sem="relaxed")
    if LEVEL == 3:
        tl.store(local_ptr + pid * 256 + bins, hist)


@triton.jit
def _compact(code_ptr, work_ptr, local_ptr, scratch_ptr, n, k, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Write the keys (code, entry) of this program's chosen entries to scratch slots from a global
    counter: every code above the k-th largest, and of the codes equal to it the lowest entries
    (the ties in the programs before are counted from their local histograms)."""
    pdl.wait(PDL)
    pid = tl.program_id(0)
    thr, need = _threshold(work_ptr, k, 4)
    d = (thr & 255).to(tl.int32)
    before = tl.zeros([], tl.int32)
    for b in range(0, pid, 1024):  # ties in the programs before this one
        i = b + tl.arange(0, 1024)
        before += tl.sum(tl.load(local_ptr + i.to(tl.int64) * 256 + d, mask=i < pid, other=0), 0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    jm = j < n
    c = tl.load(code_ptr + j, mask=jm, other=0)
    u = _unsigned(c)
    eq = jm & (u == thr)
    sel = (jm & (u > thr)) | (eq & (before + tl.cumsum(eq.to(tl.int32), 0) - 1 < need))
    count = tl.sum(sel.to(tl.int32), 0)
    base = tl.atomic_add(work_ptr + COUNTER, count, sem="relaxed")
    slot = base + tl.cumsum(sel.to(tl.int32), 0) - 1
    key = c.to(tl.int64) * 4294967296 + (4294967295 - j)  # score descending, then entry ascending
    tl.store(scratch_ptr + slot, key, mask=sel)


@triton.jit
def _order_chosen(scratch_ptr, rows_ptr, out_rows_ptr, out_ok_ptr, k, K_PAD: tl.constexpr, PDL: tl.constexpr):
    """Sort the k chosen keys (score descending, entry ascending: the reference's stable order) and
    write their pool rows and visibility."""
    pdl.wait(PDL)
    i = tl.arange(0, K_PAD)
    im = i < k
    key = tl.sort(tl.load(scratch_ptr + i, mask=im, other=-9223372036854775808), descending=True)
    entry = 4294967295 - (key & 4294967295)
    seen = (key >> 32) != NEG_INF_CODE
    tl.store(out_rows_ptr + i, tl.load(rows_ptr + entry, mask=im, other=0), mask=im)
    tl.store(out_ok_ptr + i, seen, mask=im)


def indexer_select_decode_supported(q: torch.Tensor, weights: torch.Tensor, store: dict, rows: torch.Tensor,
                                    ok: torch.Tensor, k: int) -> bool:
    """One query [H, Di] over more than k entries of an FP4 (whole 32-groups) or float32 key store;
    fewer than 2^31 entries; k up to MAX_K (one program sorts the chosen); no autograd."""
    kind, n = store_kind(store), rows.shape[0]
    return (q.dim() == 2 and kind in ("fp4", "f32") and 0 < k < n < 2 ** 31 and k <= MAX_K and not q.requires_grad
            and not (kind == "fp4" and q.shape[1] % 32))


def indexer_select_decode_triton(q: torch.Tensor, weights: torch.Tensor, store: dict, rows: torch.Tensor,
                                 ok: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.indexer_select_decode for CUDA tensors: seven launches, nothing read to the host."""
    H, DI = q.shape
    n = rows.shape[0]
    fp4 = store_kind(store) == "fp4"
    dev = q.device
    bf16 = fp4 and not interpreted()  # faithful queries and keys are FP4 values, exact in bf16
    q = q.to(torch.bfloat16 if bf16 else torch.float32).contiguous()
    keys = store["fp4"] if fp4 else store["f32"]
    scales = store["scales"] if fp4 else keys
    codes = torch.empty(n, device=dev, dtype=torch.int32)
    work = torch.empty(WORK, device=dev, dtype=torch.int32)
    _order_scores[(triton.cdiv(n, SCORE["entries"]),)](
        q, weights.float().contiguous(), keys, scales, keys, rows, ok, codes, work, n, H, DI, WORK=WORK, FP4=fp4,
        BF16=bf16, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(DI)),
        BLOCK_T=SCORE["entries"], PRECISION=_precision(), num_warps=SCORE["warps"], **pdl.launch(dev))
    return select_top_codes(codes, rows, k, work)


def select_top_codes(codes: torch.Tensor, rows: torch.Tensor, k: int, work: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The select: the k largest of codes [n] int32 (order codes; the code of -inf marks a hidden
    entry), ties to the lowest entries, in the reference's order -> (rows at them [k] int64, visible
    [k] bool). Four radix levels (each a histogram over all codes, of the codes matching the levels
    before), the chosen keys compacted, then sorted. work [WORK] int32 must hold zeros (the levels'
    histograms, 4 x 256 bins, and the slot counter, which ends at k)."""
    n, dev = codes.shape[0], codes.device
    blocks = triton.cdiv(n, SELECT["entries"])
    local = torch.empty((blocks, 256), device=dev, dtype=torch.int32)
    K_PAD = max(16, triton.next_power_of_2(k))
    scratch = torch.empty(K_PAD, device=dev, dtype=torch.int64)
    for level in range(4):
        _radix_pass[(blocks,)](codes, work, local, n, k, LEVEL=level, BLOCK=SELECT["entries"],
                               num_warps=SELECT["warps"], **pdl.launch(dev))
    _compact[(blocks,)](codes, work, local, scratch, n, k, BLOCK=SELECT["entries"], num_warps=SELECT["warps"],
                        **pdl.launch(dev))
    out_rows = torch.empty(k, device=dev, dtype=torch.int64)
    out_ok = torch.empty(k, device=dev, dtype=torch.bool)
    _order_chosen[(1,)](scratch, rows, out_rows, out_ok, k, K_PAD=K_PAD, num_warps=SELECT["sort_warps"],
                        **pdl.launch(dev))
    return out_rows, out_ok
