"""Triton GEMM for the prefill's dense projections: y = x W^T for many rows, W read in its stored
format on the tensor cores (the decode GEMVs, kernels/triton/linear.py, keep the few-row case).

Formats: FP8 e4m3 with 128x128 block scales (ue8m0 or float32) and dense BF16.
Faithful mode before an FP8 weight (act_quant): the activations pass through e4m3 per 1 x 128 slice
with a ue8m0 scale in one pass (actquant.quantise_rows_fp8: e4m3 bytes + exponent bytes), and
``_gemm_fp8`` multiplies them with the FP8 weight on the FP8 tensor cores, one dot per 128-column
block (exact products; Hopper adds a block's products at reduced precision), scaled by the row's
and the weight block's scales into the float32 accumulator, as DeepSeek's own FP8 GEMMs promote.
Otherwise (exact mode, BF16 weights) ``_gemm``: each program owns a [BLOCK_M, BLOCK_N] output tile
and steps K by BLOCK_K (which divides 128, so one step lies in one scale block); an FP8 tile is
widened to bf16 in registers (exact), multiplied on the tensor cores (wgmma on Hopper) and scaled
per 128-column block before it joins the float32 accumulator; bf16 rows multiply directly, float32
rows are split into three bf16 parts (hi + mid + lo, ~24 bits) so the product keeps float32
accuracy against the reference's float32 matmul. IEEE float32 dots in Triton's CPU interpreter.
Grouped projections (wo_a): in faithful mode with FP8 weights (each group's K and rows whole
128-blocks) every group in one quantisation pass and one ``_gemm_fp8`` launch (the group on the
grid's second axis); otherwise one GEMM per group on the group's slice of x and of W.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.linear import QWeight

from . import linear as gemv
from .actquant import quantise_rows_fp8
from .attention import _pow2, interpreted
from .linear import MAX_ROWS

# H200, bench/tune_prefill.py --only gemm (faithful, 3328 rows): 64 x 256 tiles, 8 warps reach 74-107
# TFLOP/s on the Flash projections against 59-74 for the first choice, 128 x 128 (2026-12-01).
TILE = {"m": 64, "n": 256, "k": 64, "warps": 8, "stages": 3}
# The FP8 x FP8 GEMM (faithful activations before an FP8 weight): K steps of one 128-scale block;
# "group": output tiles of that many M-blocks run N-block by N-block (each W tile stays in L2 for them).
# "grouped": a grouped projection's groups (wo_a: 8) in one launch (False: one launch per group, for A/B runs;
# H100, an 8k prefill of 4 Flash layers: 131.3 -> 128.6 ms, bench/results/h100_compare_router_grouped.txt).
# "one_block": a tile of at most 128 columns (one weight block) promotes with one FMA per element, the
# row's scale times the block's (sm_90, Triton 3.6: the K loop 490 -> 184 instructions with the column
# masks dropped when K is a multiple of 128); False: the weight scale per column as before, for A/B runs.
# "tma": q's and W's tiles through TMA descriptors (sm_90, Triton 3.6, 128 x 128: the K loop 184 -> 183
# instructions, 255 -> 230 registers, the load units free; untimed: off, bench/tune_prefill.py --only gemm
# times every tile shape both ways).
TILE_FP8 = {"m": 128, "n": 128, "warps": 8, "stages": 4, "group": 8, "grouped": True, "one_block": True,
            "tma": False}


@triton.jit
def dot_rows(x, w, IEEE: tl.constexpr, SPLIT: tl.constexpr):
    """x [M, K] . w [N, K]^T -> [M, N] float32, w exact in bf16 (FP8 / FP4 / BF16 weights): IEEE float32
    dots, or x as one bf16 part (SPLIT False: bf16 rows) or three (float32 accuracy) on the tensor cores."""
    if IEEE:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    wb = tl.trans(w.to(tl.bfloat16))
    hi = x.to(tl.bfloat16)
    out = tl.dot(hi, wb)
    if SPLIT:
        r = x.to(tl.float32) - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        out += tl.dot(mid, wb) + tl.dot((r - mid.to(tl.float32)).to(tl.bfloat16), wb)
    return out


@triton.jit
def dot_rows_t(x, w, IEEE: tl.constexpr, SPLIT: tl.constexpr):
    """dot_rows transposed: w [N, K] . x [M, K]^T -> [N, M] float32. On the tensor cores the widened
    weight is the register operand (no trip through shared memory) and x the shared-memory one."""
    if IEEE:
        return tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
    wb = w.to(tl.bfloat16)
    hi = x.to(tl.bfloat16)
    out = tl.dot(wb, tl.trans(hi))
    if SPLIT:
        r = x.to(tl.float32) - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        out += tl.dot(wb, tl.trans(mid)) + tl.dot(wb, tl.trans((r - mid.to(tl.float32)).to(tl.bfloat16)))
    return out


@triton.jit
def _gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sxm, SB_K, FP8: tl.constexpr, SCALE_U8: tl.constexpr,
          SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] (row stride sxm) . W [N, K]^T, W FP8 (+ scales [ceil(N/128), SB_K]) or bf16."""
    pid_m, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm, nm = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * sxm + (k0 + rk)[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0)
        if FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
        part = dot_rows(x, w, IEEE, SPLIT)
        if FP8:
            s = tl.load(s_ptr + (rn // 128) * SB_K + k0 // 128, mask=nm, other=0)
            if SCALE_U8:
                s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            acc += part * s[None, :]
        else:
            acc += part
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _gemm_fp8(q_ptr, e_ptr, w_ptr, s_ptr, y_ptr, qd, wd, M, N, K, SB_K, sqm, sem, sym, SCALE_U8: tl.constexpr,
              IEEE: tl.constexpr, EVEN_K: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr):
    """y [M, N] = (q x 2^(e-127)) [M, K] . W [N, K]^T with q e4m3 [M, K] (row stride sqm), e the rows'
    ue8m0 bytes per 128-slice [M, ceil(K/128)] (row stride sem), W FP8 e4m3 [N, K] with scales
    [ceil(N/128), SB_K], y row stride sym: one FP8 tensor-core dot per 128-column block (float32 out),
    scaled by both blocks' scales into the float32 accumulator (as DeepSeek's FP8 GEMMs promote each
    128-block's sum). EVEN_K: K a multiple of 128 (no column masks). ONE_BLOCK (BLOCK_N divides 128):
    the tile lies in one 128-row weight block, so its weight scale is one number per K block and the
    promotion one FMA per element (the row's scale times the block's, then the dot's sum).
    The grid's second axis is the group of a grouped projection: group g reads q's / e's columns
    from g * K / g * K / 128, W's rows and scale rows from g * N, and writes y's columns from g * N
    (one group: the plain GEMM). IEEE: float32 dots (the CPU interpreter). TMA: q's and W's tiles come
    through the tensor descriptors qd ([M, groups * K], block [BLOCK_M, 128]) and wd ([groups * N, K],
    block [BLOCK_N, 128]), which zero-fill past their shapes (the copy engine, no address arithmetic
    or masks in the K loop); else through pointer loads."""
    pid = tl.program_id(0)
    g32 = tl.program_id(1)
    grp = g32.to(tl.int64)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    span = GROUP * n_n
    first = (pid // span) * GROUP
    rows = tl.minimum(n_m - first, GROUP)
    pid_m = (first + (pid % span) % rows).to(tl.int64)
    pid_n = ((pid % span) // rows).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    mm, nm = rm < M, rn < N
    nkb = tl.cdiv(K, 128)
    q_ptr += grp * K
    e_ptr += grp * nkb
    w_ptr += grp * N * K
    s_ptr += grp * (N // 128) * SB_K
    y_ptr += grp * N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, nkb):
        k = kb * 128 + rk
        if TMA:
            a = qd.load([(pid_m * BLOCK_M).to(tl.int32), g32 * K + kb * 128])
            w = wd.load([(g32 * N + pid_n * BLOCK_N).to(tl.int32), kb * 128])
        elif EVEN_K:
            a = tl.load(q_ptr + rm[:, None] * sqm + k[None, :], mask=mm[:, None], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=nm[:, None], other=0.0)
        else:
            km = k < K
            a = tl.load(q_ptr + rm[:, None] * sqm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        if IEEE:
            part = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(w))
        sa = _pow2(tl.load(e_ptr + rm * sem + kb, mask=mm, other=0).to(tl.int32))
        if ONE_BLOCK:
            sw = tl.load(s_ptr + (pid_n * BLOCK_N // 128) * SB_K + kb)
            if SCALE_U8:
                sw = _pow2(sw.to(tl.int32))
            acc += part * (sa * sw)[:, None]
        else:
            sw = tl.load(s_ptr + (rn // 128) * SB_K + kb, mask=nm, other=0)
            if SCALE_U8:
                sw = _pow2(sw.to(tl.int32))
            acc += part * sa[:, None] * sw[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def _fp8_scales(w: QWeight) -> tuple[torch.Tensor, bool]:
    """An FP8 weight's block scales as the kernel reads them: (uint8 ue8m0 bytes or float32, is_u8)."""
    u8 = w.scale.dtype in (torch.float8_e8m0fnu, torch.uint8)
    return (w.scale.view(torch.uint8) if u8 else w.scale.float()).contiguous(), u8


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether 2-d byte tensors can be read through TMA descriptors: 16-byte aligned base and row stride,
    contiguous rows, coordinates within int32."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0
               and t.numel() < 2 ** 31 for t in ts)


def _descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor over the 2-d tensor t, blocks of [rows, 128]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, 128])


def gemm_fp8(x2: torch.Tensor, w: QWeight, out: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """Faithful mode's FP8 linear for many rows: x2 [M, K] quantised per 1 x 128 slice to e4m3
    (actquant.quantise_rows_fp8), times the FP8 weight on the FP8 tensor cores -> [M, N] in x's dtype.
    groups G > 1 (a grouped projection, one launch): x2 [M, G * Kg] holds the groups' inputs side by
    side and W [G * R, Kg] their weights (Kg and R multiples of 128); y [M, G * R]."""
    M, K = x2.shape
    N = w.shape[0]
    Kg, R = K // groups, N // groups
    if groups > 1 and (Kg * groups != K or R * groups != N or Kg % 128 or R % 128):
        raise ValueError(f"gemm_fp8: {groups} groups need K ({K}) and N ({N}) split into whole 128-blocks")
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype) if out is None else out
    q, e = quantise_rows_fp8(x2)
    scale, u8 = _fp8_scales(w)
    t = TILE_FP8
    grid = (triton.cdiv(M, t["m"]) * triton.cdiv(R, t["n"]), groups)
    q8, w8 = q.view(torch.float8_e4m3fn), w.data.contiguous().view(torch.float8_e4m3fn)
    tma = t["tma"] and _tma_ok(q8, w8)
    qd, wd = (_descriptor(q8, t["m"]), _descriptor(w8, t["n"])) if tma else (q8, w8)
    _gemm_fp8[grid](q8, e, w8, scale, y, qd, wd,
                    M, R, Kg, scale.shape[1], q.stride(0), e.stride(0), y.stride(0), SCALE_U8=u8, TMA=tma,
                    IEEE=interpreted(), EVEN_K=Kg % 128 == 0, ONE_BLOCK=t["one_block"] and 128 % t["n"] == 0,
                    BLOCK_M=t["m"], BLOCK_N=t["n"], GROUP=t["group"], num_warps=t["warps"], num_stages=t["stages"])
    return y


def _gemm_format(w: QWeight) -> bool:
    return w.dense is None and not w.data.requires_grad and (
        w.fmt == "fp8" or (w.fmt == "dense" and w.data.dtype == torch.bfloat16))


def gemm_supported(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    """More than MAX_ROWS rows of float32 / bf16 x; an FP8 or BF16 weight; no autograd."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows > MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16) and not x.requires_grad and _gemm_format(w)


def gemm(x2: torch.Tensor, w: QWeight, out: torch.Tensor | None = None, act_quant: bool = False) -> torch.Tensor:
    """x2 [M, K] (unit column stride) . W^T -> [M, N] in x's dtype (into ``out`` if given);
    act_quant: faithful mode's e4m3 activations before an FP8 weight (kernels/reference/linear.py)."""
    if act_quant and w.fmt == "fp8":
        return gemm_fp8(x2, w, out)
    M, K = x2.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype) if out is None else out
    fp8 = w.fmt == "fp8"
    data = w.data.contiguous().view(torch.uint8) if fp8 else w.data.contiguous()
    scale, u8 = _fp8_scales(w) if fp8 else (data, False)
    ieee = interpreted()
    t = TILE
    grid = (triton.cdiv(M, t["m"]), triton.cdiv(N, t["n"]))
    _gemm[grid](x2, data, scale, y, M, N, K, x2.stride(0), scale.shape[1] if fp8 else 0, FP8=fp8, SCALE_U8=u8,
                SPLIT=x2.dtype == torch.float32, IEEE=ieee, BLOCK_M=t["m"], BLOCK_N=t["n"], BLOCK_K=t["k"],
                num_warps=t["warps"], num_stages=t["stages"])
    return y


def gemm_linear(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """kernels.linear for many rows: x [..., K] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    y = gemm(x.reshape(-1, x.shape[-1]).contiguous(), w, act_quant=act_quant)
    return y.reshape(*lead, w.shape[0])


def grouped_gemm_supported(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    """og [S, G, Kg] with S > MAX_ROWS; each group's R output rows a whole number of 128-row scale blocks."""
    G = og.shape[1]
    R = w.shape[0] // G
    return (og.shape[0] > MAX_ROWS and og.dtype in (torch.float32, torch.bfloat16) and not og.requires_grad
            and _gemm_format(w) and R % 128 == 0)


def grouped_gemm(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """kernels.grouped_linear for many rows: og [S, G, Kg], W [G*R, Kg] (group g: rows g*R..) -> [S, G*R].
    Faithful mode with an FP8 weight and Kg a multiple of 128: every group in one quantisation pass and
    one FP8 GEMM launch (gemm_fp8's groups); otherwise one GEMM per group."""
    S, G, Kg = og.shape
    R = w.shape[0] // G
    og = og.contiguous()
    if act_quant and w.fmt == "fp8" and Kg % 128 == 0 and TILE_FP8["grouped"]:
        return gemm_fp8(og.view(S, G * Kg), w, groups=G)
    y = torch.empty((S, G * R), device=og.device, dtype=og.dtype)
    for g in range(G):
        rows = slice(g * R, (g + 1) * R)
        wg = QWeight(w.fmt, w.data[rows], w.scale[g * R // 128:(g + 1) * R // 128] if w.fmt == "fp8" else None)
        y[:, rows] = gemm(og[:, g, :], wg, act_quant=act_quant)
    return y


def linear_triton(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """kernels.linear on CUDA: the GEMM for many rows, the decode GEMVs for a few."""
    if gemm_supported(x, w):
        return gemm_linear(x, w, act_quant)
    return gemv.linear_triton(x, w, act_quant)


def linear_supported(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    return gemm_supported(x, w) or gemv.linear_supported(x, w)


def grouped_linear_triton(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    if grouped_gemm_supported(og, w):
        return grouped_gemm(og, w, act_quant)
    return gemv.grouped_linear_triton(og, w, act_quant)


def grouped_linear_supported(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> bool:
    return grouped_gemm_supported(og, w) or gemv.grouped_linear_supported(og, w)
