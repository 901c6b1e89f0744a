"""Triton grouped GEMM for the routed experts of a prefill chunk (kernels.routed_experts, S > 1).

The chunk's (token, slot) pairs are sorted by expert id on the device and cut into tiles of
BLOCK_M pairs of one expert (a fixed upper bound of tiles, unused ones exit at once: no host sync,
no per-token or per-expert Python loop). Up: each program gathers its tile's token rows, reads
w1 / w3 of the tile's expert in the stored FP4 format (MXFP4: e2m1 + ue8m0 per 32; NVFP4: e2m1 +
e4m3 per 16 + a float32 tensor scale), widens them to bf16 in registers (exact), multiplies on the
tensor cores, applies the clamped SwiGLU and writes h [pairs, I]. Down: h . w2^T per tile, times
the pair's routing weight, into y [pairs, d] at the pair's (token, slot) place; the k results of a
token are then summed in slot order. The dots run as W . x^T (TILE "swap"): the widened weight tile
is the tensor cores' register operand, so it makes no trip through shared memory. Faithful mode
(act_quant): x (one pass before, actquant.quantise_rows) and h (in _up's epilogue) pass through
e4m3 per 1 x 128 slice and travel as bf16 (exact), so one bf16 dot per step;
exact mode splits float32 rows into three bf16 parts (float32 accuracy). IEEE dots in the CPU
interpreter.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.moe import ExpertSet

from . import moe as gemv_moe, staged_experts as staged
from .expert_schedule import schedule
from .actquant import fake_quant_rows, quantise_rows
from .attention import interpreted
from .linear import MAX_ROWS, _e2m1_pairs
from .prefill_linear import dot_rows, dot_rows_t

# H200, bench/tune_prefill.py --only experts (MXFP4, 256 experts, top-6, 3328 tokens, faithful): the dots
# swapped (W . x^T), 128 pairs x 128 rows, K steps of 32, 8 warps, 4 stages: 8.1 ms = 125 TFLOP/s,
# against 12.4 ms for the unswapped 64 x 256 chosen before (2026-12-01, h200_tune_prefill_experts.json).
# asm: widen FP4 with the inline-PTX WIDEN_* instead of float32 Triton ops (main loop of _up 205 SASS
# lines against 368 on sm_90, no shared-memory trip for the widened tile, asynchronous wgmma kept; its
# PTX run by tests/test_widen_ptx.py over every byte and scale byte). H100, 2026-12-07,
# TUNE_FEW=1 bench/tune_prefill.py --only experts at 6400 tokens: 15.3 ms (126 TFLOP/s) for the float32
# widening at 128 x 128, 13.4 ms (144) with asm, 12.0 ms (161) with asm at 64-pair tiles (126 registers:
# two programs per SM), the same bits as the float32 widening (max_rel_diff 0.0).
# words: block scales read as 32-bit words where K allows (the pipeline copies them ahead, but on Triton
# 3.6 the widened tile then takes a trip through shared memory), else as bytes in the step.
TILE = {"m": 64, "n": 128, "k": 32, "warps": 8, "stages": 4, "swap": True, "asm": True, "words": False}
FMT = {"mxfp4": 4, "nvfp4": 5}


# One packed e2m1 byte ($2, as a u32) -> its two values as bf16 ($0 low nibble, $1 high). v = b | b << 12
# puts the high nibble at the top lane's bits 0-3; each lane's magnitude bits go to bf16 bits 6-8
# and its sign to bit 15, which reads as 2^-126 x e2m1 (the subnormal 0.5 included). A bf16x2
# multiply by $3 = (m, m), m = 2^126 x the block scale (MXFP4 with every scale byte <= 128:
# m = 2^(s-1), exact), gives the weights; or two (by 2^126, then by $3 = the scale) where m would
# not fit bf16. One byte per call (pack 1) keeps the op free to take the tensor cores' operand
# layout, so no widened tile is reshuffled through shared memory.
_WIDEN = """{{
.reg .b32 v, a, b;
mul.lo.u32 v, $2, 4097;
shl.b32 a, v, 6;
and.b32 a, a, 0x01C001C0;
shl.b32 b, v, 12;
lop3.b32 a, b, 0x80008000, a, 0xEA;
{pre}mul.rn.bf16x2 a, a, $3;
mov.b32 {{$0, $1}}, a;
}}"""
WIDEN_ONE_MUL = tl.constexpr(_WIDEN.format(pre=""))
WIDEN_TWO_MUL = tl.constexpr(_WIDEN.format(pre="mov.b32 b, 0x7E807E80;\nmul.rn.bf16x2 a, a, b;\n"))


@triton.jit
def _scales(s_ptr, rn, nm, k0, K, BLOCK_K: tl.constexpr, FMT: tl.constexpr, WORDS: tl.constexpr):
    """The raw block scales (uint8 values as int32: ue8m0 or e4m3 bits) of rows rn, columns
    k0..k0+BLOCK_K of an FP4 weight [N, K], as [BLOCK_N, BLOCK_K / group]. WORDS (K / group a
    multiple of 4): read as the aligned 32-bit words that hold them, wide enough for the software
    pipeline's asynchronous copies (byte loads stay synchronous, their latency in every step)."""
    G: tl.constexpr = 32 if FMT == 4 else 16
    NG: tl.constexpr = BLOCK_K // G
    if not WORDS:
        rg = k0 // G + tl.arange(0, NG)
        out = tl.load(s_ptr + rn[:, None] * (K // G) + rg[None, :], mask=nm[:, None] & (rg < K // G)[None, :],
                      other=0).to(tl.int32)
    elif NG >= 4:
        rw = k0 // G // 4 + tl.arange(0, NG // 4)
        wd = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (K // G // 4) + rw[None, :],
                     mask=nm[:, None] & (rw < K // G // 4)[None, :], other=0)
        out = tl.reshape(tl.join(tl.join(wd & 255, (wd >> 16) & 255), tl.join((wd >> 8) & 255, (wd >> 24) & 255)),
                         [wd.shape[0], NG])
    else:
        wd = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * (K // G // 4) + (k0 // G // 4),
                     mask=nm[:, None], other=0)
        sh = ((k0 // G) % 4) * 8 + tl.arange(0, NG) * 8
        out = (wd >> sh[None, :]) & 255
    return out


@triton.jit
def _fp4_tile(w_ptr, sc, rn, nm, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr,
              ASM: tl.constexpr, ONE_MUL: tl.constexpr):
    """Rows rn, columns k0..k0+BLOCK_K of an FP4 expert weight [N, K] with its raw block scales sc (int32)
    (_scales), the block scales applied (NVFP4's tensor scale is not: the caller applies it after
    the dot), as bf16 [BLOCK_N, BLOCK_K] (exact: at most 5 significant bits). ASM: from packed bf16x2
    integer ops and one or two multiplies per two values (WIDEN_*); else from float32 Triton ops (the
    CPU interpreter, where inline assembly cannot run)."""
    rp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    pm = nm[:, None] & (rp < K // 2)[None, :]
    b = tl.load(w_ptr + rn[:, None] * (K // 2) + rp[None, :], mask=pm, other=0)
    G: tl.constexpr = 32 if FMT == 4 else 16
    if ASM:
        if FMT == 4:
            si = sc.to(tl.int32)
            if ONE_MUL:  # 2^126 x 2^(s-127): bf16 exponent field s + 126 <= 254
                m = (si + 126) << 7
            else:  # 2^(s-127); s = 0 is the subnormal 2^-127
                m = (si << 7) + (si == 0).to(tl.int32) * 64
        else:
            m = sc.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.bfloat16).to(tl.int16, bitcast=True)
            m = m.to(tl.int32) & 0xFFFF
        m = m * 65537  # the bf16 multiplier in both halves of a word
        mb = tl.reshape(tl.broadcast_to(m[:, :, None], [BLOCK_N, BLOCK_K // G, G // 2]), [BLOCK_N, BLOCK_K // 2])
        lo, hi = tl.inline_asm_elementwise(WIDEN_ONE_MUL if ONE_MUL else WIDEN_TWO_MUL, "=h,=h,r,r",
                                           [b.to(tl.int32), mb], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        return tl.interleave(lo, hi)
    lo, hi = _e2m1_pairs(b)
    v = tl.interleave(lo, hi) * 16384.0  # [BLOCK_N, BLOCK_K], e2m1 values (_e2m1_pairs gives them x 2^-14)
    if FMT == 4:
        s = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        s = sc.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return tl.reshape(tl.reshape(v, [BLOCK_N, BLOCK_K // G, G]) * s[:, :, None], [BLOCK_N, BLOCK_K]).to(tl.bfloat16)


@triton.jit
def _ptrs(tab_ptr, stab_ptr, e):
    """Device addresses of expert e's packed FP4 data and its block scales (uint8)."""
    w = tl.load(tab_ptr + e).to(tl.pointer_type(tl.uint8))
    s = tl.load(stab_ptr + e).to(tl.pointer_type(tl.uint8))
    return tl.multiple_of(w, 16), tl.multiple_of(s, 16)


@triton.jit
def _acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """A float32 accumulator for a tile: [BLOCK_N, BLOCK_M] when the dots run swapped, else [BLOCK_M, BLOCK_N]."""
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    return acc


@triton.jit
def _dot(x, w, IEEE: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr):
    """x [M, K] . w [N, K]^T as [M, N], or swapped as w . x^T [N, M] (dot_rows / dot_rows_t)."""
    if SWAP:
        out = dot_rows_t(x, w, IEEE, SPLIT)
    else:
        out = dot_rows(x, w, IEEE, SPLIT)
    return out


@triton.jit
def _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    r = tl.load(tile_lo_ptr + t).to(tl.int64) + tl.arange(0, BLOCK_M)
    return e, r, r < tl.load(tile_hi_ptr + t)


@triton.jit
def _up(x_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, w1_tab, s1_tab, g1_ptr, w3_tab, s3_tab,
        g3_ptr, h_ptr, I, D, limit, K_SEL: tl.constexpr, FMT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
        QX: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr, ONE_MUL: tl.constexpr, WORDS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[r] = swiglu(w1[e] x_tok(r), w3[e] x_tok(r)) for the tile's sorted pairs r. QX: x arrives
    quantised (bf16 rows, actquant.quantise_rows) and h leaves quantised too, each 128-slice of a
    row through e4m3 (bf16 values; BLOCK_N a multiple of 128). SWAP: the dots run as W . x^T (the
    widened weight tile is the tensor cores' register operand), transposed back for the epilogue."""
    e, r, rm = _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M)
    if e >= 0:
        pair = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64)
        tok = pair // K_SEL
        rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = rn < I
        w1, s1 = _ptrs(w1_tab, s1_tab, e)
        w3, s3 = _ptrs(w3_tab, s3_tab, e)
        g = _acc(BLOCK_M, BLOCK_N, SWAP)
        u = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, D, BLOCK_K):
            c1 = _scales(s1, rn, nm, k0, D, BLOCK_K, FMT, WORDS)
            c3 = _scales(s3, rn, nm, k0, D, BLOCK_K, FMT, WORDS)
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=rm[:, None] & (kk < D)[None, :], other=0.0)
            g += _dot(x, _fp4_tile(w1, c1, rn, nm, k0, D, BLOCK_N, BLOCK_K, FMT, ASM, ONE_MUL), IEEE, SPLIT, SWAP)
            u += _dot(x, _fp4_tile(w3, c3, rn, nm, k0, D, BLOCK_N, BLOCK_K, FMT, ASM, ONE_MUL), IEEE, SPLIT, SWAP)
        if SWAP:
            g = tl.trans(g)
            u = tl.trans(u)
        if FMT == 5:
            g = g * tl.load(g1_ptr + e)
            u = u * tl.load(g3_ptr + e)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        h = g * tl.sigmoid(g) * u
        if QX:
            h = tl.reshape(fake_quant_rows(tl.reshape(h, [BLOCK_M * BLOCK_N // 128, 128])), [BLOCK_M, BLOCK_N])
        tl.store(h_ptr + r[:, None] * I + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


@triton.jit
def _down(h_ptr, order_ptr, wts_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, w2_tab, s2_tab, g2_ptr, y_ptr, I, D,
          FMT: tl.constexpr, IEEE: tl.constexpr, QX: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr,
          ONE_MUL: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """y[pair(r)] = weight(r) * (w2[e] h[r]) for the tile's sorted pairs r, stored in (token, slot)
    order (h float32, or bf16 values already quantised by _up: one bf16 dot per step)."""
    e, r, rm = _tile_rows(tile_e_ptr, tile_lo_ptr, tile_hi_ptr, BLOCK_M)
    if e >= 0:
        rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = rn < D
        w2, s2 = _ptrs(w2_tab, s2_tab, e)
        acc = _acc(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, I, BLOCK_K):
            c2 = _scales(s2, rn, nm, k0, I, BLOCK_K, FMT, WORDS)
            kk = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(h_ptr + r[:, None] * I + kk[None, :], mask=rm[:, None] & (kk < I)[None, :], other=0.0)
            acc += _dot(h, _fp4_tile(w2, c2, rn, nm, k0, I, BLOCK_N, BLOCK_K, FMT, ASM, ONE_MUL), IEEE, not QX,
                        SWAP)
        if SWAP:
            acc = tl.trans(acc)
        if FMT == 5:
            acc = acc * tl.load(g2_ptr + e)
        pair = tl.load(order_ptr + r, mask=rm, other=0).to(tl.int64)
        wt = tl.load(wts_ptr + pair, mask=rm, other=0.0)
        tl.store(y_ptr + pair[:, None] * D + rn[None, :], acc * wt[:, None], mask=rm[:, None] & nm[None, :])


def _tables(experts: ExpertSet, device) -> dict:
    """Per-expert device addresses of data / scales and the NVFP4 tensor scales, made once."""
    t = experts.tables
    if "prefill" not in t:
        out = {}
        for name in ("w1", "w3", "w2"):
            ws = getattr(experts, name)
            out[name] = torch.tensor([w.data.data_ptr() for w in ws], dtype=torch.int64, device=device)
            out["s" + name] = torch.tensor([w.scale.data_ptr() for w in ws], dtype=torch.int64, device=device)
            gs = [w.global_scale.float() if w.global_scale is not None else torch.ones((), device=device) for w in ws]
            out["g" + name] = torch.stack([g.reshape(()).to(device) for g in gs])
        # MXFP4 with every scale byte <= 128 (scales <= 2): one bf16 multiply per two widened values
        out["one_mul"] = experts.w1[0].fmt == "mxfp4" and torch.stack(
            [w.scale.view(torch.uint8).max() for w in experts.w1 + experts.w3 + experts.w2]).max().item() <= 128
        t["prefill"] = out
    return t["prefill"]


def grouped_experts_supported(x, ids, weights, experts: ExpertSet, limit: float, act_quant: bool = False) -> bool:
    """More than MAX_ROWS tokens; every expert MXFP4 or NVFP4 (the stored formats), contiguous, with
    K a multiple of 32; no per-rank expert map; no autograd."""
    t = experts.tables
    if "prefill_ok" not in t:
        ws = experts.w1 + experts.w3 + experts.w2
        t["prefill_ok"] = (len({w.fmt for w in ws}) == 1 and ws[0].fmt in FMT and all(
            w.dense is None and w.data.is_contiguous() and w.scale.is_contiguous()
            and w.data.data_ptr() % 16 == 0 and w.scale.data_ptr() % 16 == 0 for w in ws)
            and experts.w1[0].shape[1] % 32 == 0 and experts.w2[0].shape[1] % 32 == 0
            and getattr(experts, "local", None) is None)
    return x.shape[0] > MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16) and not x.requires_grad \
        and t["prefill_ok"]


def grouped_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSet,
                    limit: float, act_quant: bool = False) -> torch.Tensor:
    """kernels.routed_experts for a chunk (contract: kernels/reference/moe.routed_experts)."""
    tab = _tables(experts, x.device)
    if staged.staged_supported(x, experts, act_quant):
        return staged.staged_experts(x, ids, weights, experts, limit, tab)
    S, D = x.shape
    k = ids.shape[1]
    I = experts.w1[0].shape[0]
    t = TILE
    order, tile_e, lo, hi = schedule(ids.long(), len(experts), t["m"])
    fmt = FMT[experts.w1[0].fmt]
    group = 32 if fmt == 4 else 16
    ieee = interpreted()
    qx = act_quant and I % 128 == 0 and t["n"] % 128 == 0
    xc = quantise_rows(x.contiguous()) if act_quant else x.contiguous()
    h = torch.empty((S * k, I), device=x.device, dtype=torch.bfloat16 if qx else torch.float32)
    _up[(tile_e.numel(), triton.cdiv(I, t["n"]))](
        xc, order, tile_e, lo, hi, tab["w1"], tab["sw1"], tab["gw1"], tab["w3"], tab["sw3"], tab["gw3"], h, I, D,
        float(limit), K_SEL=k, FMT=fmt, IEEE=ieee, SPLIT=xc.dtype == torch.float32, QX=qx, SWAP=t["swap"],
        ASM=t["asm"] and not ieee, ONE_MUL=tab["one_mul"], WORDS=t["words"] and D // group % 4 == 0,
        BLOCK_M=t["m"], BLOCK_N=t["n"], BLOCK_K=t["k"], num_warps=t["warps"], num_stages=t["stages"])
    if act_quant and not qx:  # an intermediate size that is no whole number of 128-slices per tile
        h = quantise_rows(h)
    y = torch.empty((S * k, D), device=x.device, dtype=torch.float32)
    _down[(tile_e.numel(), triton.cdiv(D, t["n"]))](
        h, order, weights.float().contiguous().reshape(-1), tile_e, lo, hi, tab["w2"], tab["sw2"], tab["gw2"], y,
        I, D, FMT=fmt, IEEE=ieee, QX=h.dtype == torch.bfloat16, SWAP=t["swap"], ASM=t["asm"] and not ieee,
        ONE_MUL=tab["one_mul"], WORDS=t["words"] and I // group % 4 == 0, BLOCK_M=t["m"], BLOCK_N=t["n"],
        BLOCK_K=t["k"], num_warps=t["warps"], num_stages=t["stages"])
    return y.view(S, k, D).sum(1).to(x.dtype)


def routed_experts_triton(x, ids, weights, experts: ExpertSet, limit: float, act_quant: bool = False) -> torch.Tensor:
    """kernels.routed_experts on CUDA: the grouped GEMM for a chunk, the decode kernels for one token."""
    if grouped_experts_supported(x, ids, weights, experts, limit):
        return grouped_experts(x, ids, weights, experts, limit, act_quant)
    return gemv_moe.routed_experts_triton(x, ids, weights, experts, limit, act_quant)


def routed_experts_supported(x, ids, weights, experts: ExpertSet, limit: float, act_quant: bool = False) -> bool:
    return grouped_experts_supported(x, ids, weights, experts, limit) or \
        gemv_moe.routed_experts_supported(x, ids, weights, experts, limit)
