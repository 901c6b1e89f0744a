"""Triton kernels for kernels.indexer_select_decode: one decode token's Lightning Indexer over the
cache, keys read in their stored format, the top-k chosen on the GPU with no sort of all entries.

Two launches:
- ``_order_scores``, one program per BLOCK_T entries: gathers the entries' keys at their pool rows
  (FP4 e2m1 codes widened in registers with their ue8m0 scales, or float32), scores them against all
  indexer heads with one tensor-core dot ([heads, Di] x [Di, BLOCK_T]; FP4 values are exact in bf16,
  so the faithful dots are exact products summed in float32), folds the heads (ReLU, weight, sum)
  and writes each entry's score as an order-preserving int32 (hidden entries: the code of -inf).
- ``_select``, one program: an exact radix select of the k-th largest code (four 8-bit passes over
  the int32 codes, each a histogram of the codes that still match), then one pass in entry order
  that takes every code above it and, of the codes equal to it, the lowest entries, and a bitonic
  sort of the k chosen (score descending, entry ascending: the order of the reference's stable
  sort). Writes the chosen entries' pool rows and whether each is visible.

Reads n x (Di/2 + Di/32) bytes of keys and 4 x n x 4 bytes of codes: at 64k tokens of context (16k
CSA entries) about 1.2 MB, where the torch path widened every key to float32 (8 MB) and sorted all
scores. Contract as kernels/reference/indexer.indexer_select_decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.entries import store_kind

from . import pdl
from .attention import _pow2, _precision, interpreted

SCORE = {"entries": 64, "warps": 8}  # entries per scoring program, its warps (4 warps: 255 registers and spills)
SELECT = {"block": 2048, "warps": 16}  # codes per step of the select program, its warps
_NEG_INF_CODE = -(0x7F800000) - 1  # the order code of -inf: below every finite score


@triton.jit
def _e2m1(code):
    """4-bit e2m1 codes (int32 0..15, bit 3 the sign) -> float32 (0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
    m = code & 7
    e = m >> 1
    v = tl.where(e == 0, (m & 1).to(tl.float32) * 0.5, (2 + (m & 1)).to(tl.float32) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _order_scores(q_ptr, w_ptr, codes_ptr, scales_ptr, f32_ptr, rows_ptr, ok_ptr, out_ptr, n, H, DI,
                  FP4: tl.constexpr, BF16: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
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
    tl.store(out_ptr + j, tl.where(seen, code, -(0x7F800000) - 1), mask=jm)


@triton.jit
def _select(code_ptr, rows_ptr, scratch_ptr, out_rows_ptr, out_ok_ptr, n, k, BLOCK: tl.constexpr,
            K_PAD: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)  # the high bits of the k-th largest (unsigned) code found so far
    need = tl.zeros([], tl.int32) + k  # how many of the codes matching prefix still to take
    for p in tl.static_range(4):
        hist = tl.zeros([256], tl.int32)
        for b in range(0, n, BLOCK):
            j = b + offs
            jm = j < n
            u = (tl.load(code_ptr + j, mask=jm, other=0) ^ -2147483648).to(tl.int64) & 0xFFFFFFFF
            match = jm
            if p > 0:
                match = match & ((u >> (32 - 8 * p)) == prefix)
            lane_digit = tl.where(match, (u >> (24 - 8 * p)) & 255, 0).to(tl.int32)
            # the non-matching lanes were counted in bin 0: take them out again
            hist += tl.histogram(lane_digit, 256) - tl.where(bins == 0, BLOCK - tl.sum(match.to(tl.int32), 0), 0)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # codes with digit >= bin
        digit = tl.max(tl.where(at_least >= need, bins, -1), 0)
        need -= tl.sum(tl.where(bins > digit, hist, 0), 0)
        prefix = prefix * 256 + digit
    # take the codes above the k-th largest, and of those equal to it the lowest ``need`` entries
    taken = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for b in range(0, n, BLOCK):
        j = b + offs
        jm = j < n
        c = tl.load(code_ptr + j, mask=jm, other=0)
        u = (c ^ -2147483648).to(tl.int64) & 0xFFFFFFFF
        eq = jm & (u == prefix)
        tie_rank = ties + tl.cumsum(eq.to(tl.int32), 0) - 1
        sel = (jm & (u > prefix)) | (eq & (tie_rank < need))
        slot = taken + tl.cumsum(sel.to(tl.int32), 0) - 1
        key = c.to(tl.int64) * 4294967296 + (4294967295 - j.to(tl.int64))  # score desc, entry asc
        tl.store(scratch_ptr + slot, key, mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
        ties += tl.sum(eq.to(tl.int32), 0)
    tl.debug_barrier()  # the scratch writes of every warp visible to the loads below
    i = tl.arange(0, K_PAD)
    im = i < k
    key = tl.sort(tl.load(scratch_ptr + i, mask=im, other=-9223372036854775808), descending=True)
    entry = 4294967295 - (key & 4294967295)
    seen = (key >> 32) != -(0x7F800000) - 1
    tl.store(out_rows_ptr + i, tl.load(rows_ptr + entry, mask=im, other=0), mask=im)
    tl.store(out_ok_ptr + i, seen, mask=im)


def indexer_select_decode_supported(q: torch.Tensor, weights: torch.Tensor, store: dict, rows: torch.Tensor,
                                    ok: torch.Tensor, k: int) -> bool:
    """One query [H, Di] over more than k entries of an FP4 (whole 32-groups) or float32 key store;
    fewer than 2^31 entries; no autograd."""
    kind, n = store_kind(store), rows.shape[0]
    return (q.dim() == 2 and kind in ("fp4", "f32") and 0 < k < n < 2 ** 31 and not q.requires_grad
            and not (kind == "fp4" and q.shape[1] % 32))


def indexer_select_decode_triton(q: torch.Tensor, weights: torch.Tensor, store: dict, rows: torch.Tensor,
                                 ok: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.indexer_select_decode for CUDA tensors: two launches, nothing read to the host."""
    H, DI = q.shape
    n = rows.shape[0]
    fp4 = store_kind(store) == "fp4"
    dev = q.device
    bf16 = fp4 and not interpreted()  # faithful queries and keys are FP4 values, exact in bf16
    q = q.to(torch.bfloat16 if bf16 else torch.float32).contiguous()
    keys = store["fp4"] if fp4 else store["f32"]
    scales = store["scales"] if fp4 else keys
    codes = torch.empty(n, device=dev, dtype=torch.int32)
    _order_scores[(triton.cdiv(n, SCORE["entries"]),)](
        q, weights.float().contiguous(), keys, scales, keys, rows, ok, codes, n, H, DI, FP4=fp4, BF16=bf16,
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(DI)), BLOCK_T=SCORE["entries"],
        PRECISION=_precision(), num_warps=SCORE["warps"], **pdl.launch(dev))
    K_PAD = max(16, triton.next_power_of_2(k))
    scratch = torch.empty(K_PAD, device=dev, dtype=torch.int64)
    out_rows = torch.empty(k, device=dev, dtype=torch.int64)
    out_ok = torch.empty(k, device=dev, dtype=torch.bool)
    _select[(1,)](codes, rows, scratch, out_rows, out_ok, n, k, BLOCK=SELECT["block"], K_PAD=K_PAD,
                  num_warps=SELECT["warps"], **pdl.launch(dev))
    return out_rows, out_ok
