"""Triton kernels for the routed experts of one decode token, with the expert ids read on the device.

Two launches per call, no host read of the ids (so a decode step can be captured in a CUDA graph):
  1. up: for each selected expert j and block of intermediate rows, h[j] = swiglu(w1[e] x, w3[e] x)
     with the clamp (e = ids[j]); both weights are streamed by the same program;
  2. down: for each j and block of output rows, part[j] = weights[j] * (w2[e] h[j]).
The k partials are then summed in float32. Expert weights stay where they were loaded: the kernels
find them through per-layer tables of device addresses (int64, one entry per expert), built once.
Formats (kernels/linear.py): FP8 with 128x128 block scales (ue8m0 or float32), MXFP4, NVFP4 and
dense BF16/F32; all experts of a set share one format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe import ExpertSet, routed_experts as routed_experts_reference
from .triton_linear import _e2m1_pairs

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
    return w, s


@triton.jit
def _row_dots(x_ptr, w, s, gs, rn, nmask, K: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
              NG: tl.constexpr):
    """sum_k W[rn, k] * x[k] over all K for one expert weight W [N, K] -> [BLOCK_N] float32.

    Each step reads a [BLOCK_N, NG, GS] tile: NG scale groups of GS stored bytes per row (FP4: 16
    bytes = 32 values for MXFP4, 8 bytes for NVFP4; FP8: one 128-channel block; dense: 128), so
    every group's partial dot is a reduction along the last axis, then scaled."""
    n3 = rn[:, None, None]
    m3 = nmask[:, None, None]
    gi = tl.arange(0, NG)[None, :, None]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if FMT >= 4:
        G: tl.constexpr = 32 if FMT == 4 else 16
        GS: tl.constexpr = G // 2
        KP: tl.constexpr = K // 2
        j = tl.arange(0, GS)[None, None, :]
        for k0 in range(0, KP, NG * GS):
            p = k0 + gi * GS + j  # [1, NG, GS] byte index
            pm = p < KP
            b = tl.load(w + n3 * KP + p, mask=m3 & pm, other=0)
            xe = tl.load(x_ptr + 2 * p, mask=pm, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
            lo, hi = _e2m1_pairs(b)
            grp = tl.sum(lo * xe + hi * xo, 2)  # [BLOCK_N, NG], x 2^-14
            g2 = k0 // GS + tl.arange(0, NG)[None, :]
            sc = tl.load(s + rn[:, None] * (K // G) + g2, mask=nmask[:, None] & (g2 < K // G), other=0)
            if FMT == 5:
                sc = sc.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                sc = tl.exp2(sc.to(tl.float32) - 127.0)
            acc += tl.sum(grp * sc, 1)
        acc = acc * 16384.0
        if FMT == 5:
            acc = acc * gs
    else:
        SBK: tl.constexpr = (K + 127) // 128
        j = tl.arange(0, 128)[None, None, :]
        for k0 in range(0, K, NG * 128):
            kk = k0 + gi * 128 + j  # [1, NG, 128]
            km = kk < K
            xv = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
            wv = tl.load(w + n3 * K + kk, mask=m3 & km, other=0)
            if FMT >= 2:
                acc += tl.sum(tl.sum(wv.to(tl.float32) * xv, 2), 1)
            else:
                grp = tl.sum(wv.to(tl.float8e4nv, bitcast=True).to(tl.float32) * xv, 2)  # [BLOCK_N, NG]
                b2 = k0 // 128 + tl.arange(0, NG)[None, :]
                sc = tl.load(s + (rn[:, None] // 128) * SBK + b2, mask=nmask[:, None] & (b2 < SBK), other=0)
                if FMT == 0:
                    sc = tl.exp2(sc.to(tl.float32) - 127.0)
                acc += tl.sum(grp * sc, 1)
    return acc


@triton.jit
def _experts_up(x_ptr, ids_ptr, w1_tab, s1_tab, w3_tab, s3_tab, gs1_ptr, gs3_ptr, h_ptr, I, K: tl.constexpr, limit,
                FMT: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    pid_n, j = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + j).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < I
    w1, s1 = _weight_ptrs(w1_tab, s1_tab, e, FMT)
    w3, s3 = _weight_ptrs(w3_tab, s3_tab, e, FMT)
    g = _row_dots(x_ptr, w1, s1, tl.load(gs1_ptr + e), rn, nmask, K, FMT, BLOCK_N, NG)
    u = _row_dots(x_ptr, w3, s3, tl.load(gs3_ptr + e), rn, nmask, K, FMT, BLOCK_N, NG)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(h_ptr + j * I + rn, g * tl.sigmoid(g) * u, mask=nmask)


@triton.jit
def _experts_down(h_ptr, ids_ptr, wts_ptr, w2_tab, s2_tab, gs2_ptr, out_ptr, N, I: tl.constexpr,
                  FMT: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    pid_n, j = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + j).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    w2, s2 = _weight_ptrs(w2_tab, s2_tab, e, FMT)
    y = _row_dots(h_ptr + j * I, w2, s2, tl.load(gs2_ptr + e), rn, nmask, I, FMT, BLOCK_N, NG)
    tl.store(out_ptr + j * N + rn, y * tl.load(wts_ptr + j), mask=nmask)


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


def _usable(experts: ExpertSet) -> bool:
    ws = experts.w1 + experts.w3 + experts.w2
    fmts = {(w.fmt, w.data.dtype, None if w.scale is None else w.scale.dtype) for w in ws}
    return len(fmts) == 1 and _fmt_code(ws) >= 0 and all(w.dense is None and w.data.is_contiguous() for w in ws)


def routed_experts_triton(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSet,
                          limit: float) -> torch.Tensor:
    """kernels.routed_experts for one CUDA token (S == 1): two launches, ids stay on the device."""
    t = experts.tables
    if "usable" not in t:
        t["usable"] = _usable(experts)
    if x.shape[0] != 1 or x.requires_grad or not t["usable"]:
        return routed_experts_reference(x, ids, weights, experts, limit)
    if "w1" not in t:
        for name in ("w1", "w3", "w2"):
            t[name] = _tables(getattr(experts, name), x.device)
        t["fmt"] = _fmt_code(experts.w1)
    fmt, k = t["fmt"], ids.shape[1]
    I, d = experts.w1[0].shape
    xs = x.reshape(-1).contiguous()
    ids1 = ids.reshape(-1).contiguous()
    h = torch.empty((k, I), device=x.device, dtype=torch.float32)
    ng = {4: 16, 5: 32}.get(fmt, 2)  # scale groups per step: 256 bytes of each weight row (dense: 256 values)
    bn_up, bn_down = (16, 16) if k >= 4 else (4, 8)  # a few hundred programs either way
    _experts_up[(triton.cdiv(I, bn_up), k)](
        xs, ids1, t["w1"][0], t["w1"][1], t["w3"][0], t["w3"][1], t["w1"][2], t["w3"][2], h, I, d, float(limit),
        FMT=fmt, BLOCK_N=bn_up, NG=ng, num_warps=4)
    part = torch.empty((k, d), device=x.device, dtype=torch.float32)
    _experts_down[(triton.cdiv(d, bn_down), k)](
        h, ids1, weights.reshape(-1).float().contiguous(), t["w2"][0], t["w2"][1], t["w2"][2], part, d, I,
        FMT=fmt, BLOCK_N=bn_down, NG=ng, num_warps=4)
    return part.sum(0, keepdim=True).to(x.dtype)
