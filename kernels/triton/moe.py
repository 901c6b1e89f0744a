"""Triton kernels for the routed experts of one decode token, with the expert ids read on the device.

Two launches per call, no host read of the ids (so a decode step can be captured in a CUDA graph):
  1. up: for each selected expert j and block of intermediate rows, h[j] = swiglu(w1[e] x, w3[e] x)
     with the clamp (e = ids[j]); both weights are streamed by the same program;
  2. down: for each j and block of output rows, part[j] = weights[j] * (w2[e] h[j]); the last
     program of each row block adds the k partials in j order (float32) and writes x's dtype.
Expert weights stay where they were loaded: the kernels find them through per-layer tables of
device addresses (int64, one entry per expert, 16-byte aligned), built once.
Formats (kernels/reference/linear.py): FP8 with 128x128 block scales (ue8m0 or float32), MXFP4, NVFP4 and
dense BF16/F32; all experts of a set share one format. MXFP4 goes through the integer units
(kernels/triton/fp4dot.py: e2m1 by byte-permute lookups, dp4a against the activation split into three
int8 parts, float32-accurate), with one more small launch before each of the two to split x and h
(faithful mode quantises x and h to e4m3 inside that split; a size that is no whole number of
128-slices quantises them through the torch reference first).
(tl.dot_scaled, the tensor cores with a bf16 upcast, measured slower: 85 / 33 us against 22 / 10.5 us
per layer on an H200; bench/results/h200_tune_experts.json, the dot_scaled run in git history.)
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.moe import ExpertSet
from . import pdl
from .attention import interpreted
from .fp4dot import mx_int_dots, quant3
from .linear import _block_step, _fp4_step, _split_buffers, _store_split

# Tile shapes by weight format and by how many experts one call reads (6 routed, or the 1 shared):
# rows per program for the up (w1 + w3) and down (w2) kernels, FP4 values per row per step, warps.
# bench/tune_kernels.py times the alternatives on a GPU.
CONFIG = {  # bench/results/h200_tune_experts.json
    "mx": {"many": {"up_rows": 32, "down_rows": 32, "up_block_k": 1024, "down_block_k": 1024, "warps": 4},
           "one": {"up_rows": 8, "down_rows": 8, "up_block_k": 512, "down_block_k": 512, "warps": 4}},
    "fp4": {"many": {"up_rows": 16, "down_rows": 16, "up_block_k": 512, "down_block_k": 256, "warps": 4},
            "one": {"up_rows": 4, "down_rows": 8, "up_block_k": 256, "down_block_k": 256, "warps": 4}},
    "other": {"many": {"up_rows": 16, "down_rows": 16, "warps": 4},
              "one": {"up_rows": 2, "down_rows": 2, "warps": 2}},
}

# FMT codes: 0 fp8 + ue8m0 block scale, 1 fp8 + float32 block scale, 2 dense f32, 3 dense bf16,
# 4 mxfp4, 5 nvfp4


@triton.jit
def _weight_ptrs(tab_ptr, stab_ptr, e, FMT: tl.constexpr):
    """Device addresses of expert e's data and scale, typed for FMT."""
    wa = tl.load(tab_ptr + e)
    sa = tl.load(stab_ptr + e)
    if FMT == 2:
        w = wa.to(tl.pointer_type(tl.float32))
    elif FMT == 3:
        w = wa.to(tl.pointer_type(tl.bfloat16))
    else:
        w = wa.to(tl.pointer_type(tl.uint8))
    if FMT == 1:
        s = sa.to(tl.pointer_type(tl.float32))
    else:
        s = sa.to(tl.pointer_type(tl.uint8))
    return tl.multiple_of(w, 16), tl.multiple_of(s, 16)


@triton.jit
def _row_dots(x_ptr, w, s, gs, rn, nmask, K: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              QX: tl.constexpr = False):
    """sum_k W[rn, k] * x[k] over all K for one expert weight W [N, K] -> [BLOCK_N] float32; QX: x's
    128-slices through e4m3 first (faithful mode; FP8 / FP4 weights, BLOCK_K a multiple of 128)."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if FMT >= 4:
        for k0 in range(0, K // 2, BLOCK_K // 2):
            acc += _fp4_step(x_ptr, w, s, rn, nmask, k0, K, FMT == 5, BLOCK_N, BLOCK_K // 2, QX)
        acc = acc * 16384.0
        if FMT == 5:
            acc = acc * gs
    else:
        for k0 in range(0, K, BLOCK_K):
            acc += _block_step(x_ptr, w, s, rn, nmask, k0, K, (K + 127) // 128, FMT, BLOCK_N, BLOCK_K, QX)
    return acc


@triton.jit
def _experts_up(x_ptr, xq_ptr, xs_ptr, ids_ptr, w1_tab, s1_tab, w3_tab, s3_tab, gs1_ptr, gs3_ptr, h_ptr, I,
                K: tl.constexpr, limit, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                MODE: tl.constexpr, QX: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    pid_n, j = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    e = tl.load(ids_ptr + j).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = rn < I
    nmask = valid & ((rn * 0 + e) >= 0)  # id -1: another rank's expert, no weight byte is loaded and h[j] = 0
    e = tl.maximum(e, 0)
    w1, s1 = _weight_ptrs(w1_tab, s1_tab, e, FMT)
    w3, s3 = _weight_ptrs(w3_tab, s3_tab, e, FMT)
    if MODE >= 2:  # MXFP4 through dp4a (2: inline PTX, 3: the same in Triton ops); K % BLOCK_K == 0
        g = mx_int_dots(xq_ptr, xs_ptr, w1, s1, rn, nmask, K, BLOCK_N, BLOCK_K, MODE == 2)
        u = mx_int_dots(xq_ptr, xs_ptr, w3, s3, rn, nmask, K, BLOCK_N, BLOCK_K, MODE == 2)
    else:
        g = _row_dots(x_ptr, w1, s1, tl.load(gs1_ptr + e), rn, nmask, K, FMT, BLOCK_N, BLOCK_K, QX)
        u = _row_dots(x_ptr, w3, s3, tl.load(gs3_ptr + e), rn, nmask, K, FMT, BLOCK_N, BLOCK_K, QX)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(h_ptr + j * I + rn, g * tl.sigmoid(g) * u, mask=valid)


@triton.jit
def _experts_down(h_ptr, hq_ptr, hs_ptr, ids_ptr, wts_ptr, w2_tab, s2_tab, gs2_ptr, out_ptr, part_ptr, cnt_ptr, N,
                  I: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  MODE: tl.constexpr, K_SEL: tl.constexpr, QX: tl.constexpr, PDL: tl.constexpr):
    """out [N] (x's dtype) = sum_j weights[j] * (w2[ids[j]] h[j]); grid (row blocks, K_SEL). The last
    program of a row block to finish adds the K_SEL partials in j order (deterministic)."""
    pdl.wait(PDL)
    pid_n, j = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    e = tl.load(ids_ptr + j).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = rn < N
    nmask = valid & ((rn * 0 + e) >= 0)  # id -1: another rank's expert, a zero partial and no weight byte loaded
    e = tl.maximum(e, 0)
    w2, s2 = _weight_ptrs(w2_tab, s2_tab, e, FMT)
    if MODE >= 2:
        y = mx_int_dots(hq_ptr + j * 3 * I, hs_ptr + j * (I // 32), w2, s2, rn, nmask, I, BLOCK_N, BLOCK_K, MODE == 2)
    else:
        y = _row_dots(h_ptr + j * I, w2, s2, tl.load(gs2_ptr + e), rn, nmask, I, FMT, BLOCK_N, BLOCK_K, QX)
    _store_split(y * tl.load(wts_ptr + j), out_ptr, part_ptr, cnt_ptr, pid_n, j, 0, 1, N, rn, valid, K_SEL, BLOCK_N)


def _fmt_code(ws) -> int:
    w = ws[0]
    if w.fmt == "fp8":
        return 1 if w.scale.dtype == torch.float32 else 0
    if w.fmt == "dense":
        return {torch.float32: 2, torch.bfloat16: 3}.get(w.data.dtype, -1)
    return 4 if w.fmt == "mxfp4" else 5


def _tables(ws, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data addresses [E], scale addresses [E], global scales [E] float32) of one weight list."""
    data = torch.tensor([w.data.data_ptr() for w in ws], dtype=torch.int64, device=device)
    scale = torch.tensor([(w.scale if w.scale is not None else w.data).data_ptr() for w in ws],
                         dtype=torch.int64, device=device)
    gs = torch.stack([w.global_scale.float().reshape(()) if w.global_scale is not None
                      else torch.ones((), device=device) for w in ws]).to(device)
    return data, scale, gs


def _mx_block_k(K: int, want: int) -> int:
    """The largest power of two <= want (and >= 32, one scale group) dividing K; 0 if none."""
    b = want
    while b >= 32 and K % b:
        b //= 2
    return b if b >= 32 else 0


def _mx_mode(fmt: int, I: int, d: int, device: torch.device) -> int:
    """MODE for MXFP4 experts whose sizes are whole 32-groups: 2 (dp4a through inline PTX) on a GPU,
    3 (the same integer arithmetic in Triton ops) in Triton's CPU interpreter; else 0 (float decode)."""
    if fmt != 4 or I % 32 or d % 32:
        return 0
    return 3 if interpreted() else 2


def _usable(experts: ExpertSet) -> bool:
    ws = experts.w1 + experts.w3 + experts.w2
    fmts = {(w.fmt, w.data.dtype, None if w.scale is None else w.scale.dtype) for w in ws}
    aligned = all(t.data_ptr() % 16 == 0 for w in ws for t in (w.data, w.scale) if t is not None)
    return len(fmts) == 1 and _fmt_code(ws) >= 0 and aligned and all(
        w.dense is None and w.data.is_contiguous() for w in ws)


def routed_experts_supported(x: torch.Tensor, ids, weights, experts: ExpertSet, limit: float,
                             act_quant: bool = False) -> bool:
    """One token; experts all in one stored format, contiguous and 16-byte aligned (checked once per
    ExpertSet and kept in its tables); no autograd."""
    t = experts.tables
    if "usable" not in t:
        t["usable"] = _usable(experts)
    return x.shape[0] == 1 and not x.requires_grad and t["usable"]


def routed_experts_triton(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSet,
                          limit: float, act_quant: bool = False) -> torch.Tensor:
    """kernels.routed_experts for one CUDA token (S == 1): two launches (four for MXFP4, with the
    activation splits), ids stay on the device. An id of -1 after ``experts.local`` (another rank's
    expert) contributes 0 and its programs load no weight. act_quant (faithful mode): x and h go
    through e4m3 per 128-slice inside the kernels (or inside the MXFP4 activation splits)."""
    t = experts.tables
    if "w1" not in t:
        for name in ("w1", "w3", "w2"):
            t[name] = _tables(getattr(experts, name), x.device)
        t["fmt"] = _fmt_code(experts.w1)
    fmt, k = t["fmt"], ids.shape[1]
    I, d = experts.w1[0].shape
    xs = x.reshape(-1).contiguous()
    ids1 = ids.reshape(-1)
    if experts.local is not None:  # router ids -> this rank's experts, -1 for other ranks' (on the device)
        if "local" not in t:
            t["local"] = experts.local.to(x.device)
        ids1 = t["local"][ids1]
    ids1 = ids1.contiguous()
    h = torch.empty((k, I), device=x.device, dtype=torch.float32)
    mode = _mx_mode(fmt, I, d, x.device)
    cfg = CONFIG["mx" if mode else "fp4" if fmt >= 4 else "other"]["many" if k >= 4 else "one"]
    fp4 = fmt >= 4  # an FP8 / dense step stays inside one 128-wide scale block
    up_k = _mx_block_k(d, cfg["up_block_k"]) if mode else cfg["up_block_k"] if fp4 else 128
    down_k = _mx_block_k(I, cfg["down_block_k"]) if mode else cfg["down_block_k"] if fp4 else 128
    opts = {"num_warps": cfg["warps"], "num_stages": cfg.get("stages", 3)}
    qx = act_quant and fmt not in (2, 3)
    xq, xsc = quant3(xs.view(1, d), qx) if mode else (xs, xs)
    _experts_up[(triton.cdiv(I, cfg["up_rows"]), k)](
        xs, xq, xsc, ids1, t["w1"][0], t["w1"][1], t["w3"][0], t["w3"][1], t["w1"][2], t["w3"][2], h, I, d,
        float(limit), FMT=fmt, BLOCK_N=cfg["up_rows"], BLOCK_K=up_k, MODE=mode, QX=qx, **opts, **pdl.launch(x.device))
    hq, hsc = quant3(h, qx) if mode else (h, h)
    out = torch.empty((1, d), device=x.device, dtype=x.dtype)
    part, cnt = _split_buffers(k, 1, d, cfg["down_rows"], x.device)
    _experts_down[(triton.cdiv(d, cfg["down_rows"]), k)](
        h, hq, hsc, ids1, weights.reshape(-1).float().contiguous(), t["w2"][0], t["w2"][1], t["w2"][2], out, part,
        cnt, d, I, FMT=fmt, BLOCK_N=cfg["down_rows"], BLOCK_K=down_k, MODE=mode, K_SEL=k, QX=qx, **opts,
        **pdl.launch(x.device))
    return out
