"""Published tensor names -> the engine's weight objects, kept in their stored formats.

A linear ``X.weight`` is paired with ``X.scale`` (ue8m0 / e4m3, or float32 ``X.weight_scale_inv``)
and, for NVFP4, ``X.scale_2`` (float32 per-tensor scale). Its format follows the dtypes:
float8_e4m3fn weight -> "fp8"; packed FP4 weight (float4_e2m1fn_x2 / int8 / uint8) with ue8m0 scales
-> "mxfp4", with e4m3 scales -> "nvfp4"; a float weight -> "dense". Nothing is upcast here.
"""

from __future__ import annotations

import torch

from dsv4.engine.checkpoint.formats import COMPANIONS, SCALE, SCALE_2, SCALE_INV, WEIGHT, is_companion, linear_base
from dsv4.kernels import QWeight
from dsv4.kernels.formats import FP8_BLOCK

RAW_2D = ("embed.weight",)  # looked up by row, never multiplied


def qweight_from(tensors: dict, base: str) -> QWeight:
    """Build the QWeight for ``base`` (name without ``.weight``) from a name->tensor mapping."""
    w = tensors[base + WEIGHT]
    scale = tensors.get(base + SCALE)
    if scale is None:
        scale = tensors.get(base + SCALE_INV)
    if w.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise ValueError(f"{base}.weight is FP8 but has no .scale")
        return QWeight("fp8", w, scale)
    if w.dtype in (torch.float4_e2m1fn_x2, torch.int8, torch.uint8):
        if scale is None:
            raise ValueError(f"{base}.weight is packed FP4 but has no .scale")
        if scale.dtype == torch.float8_e4m3fn:
            return QWeight("nvfp4", w, scale, tensors[base + SCALE_2])
        return QWeight("mxfp4", w, scale)
    return QWeight("dense", w)


def build_weights(tensors: dict, device="cpu") -> dict:
    """name -> QWeight (linears, keyed by base name) or tensor (everything else), on ``device``."""
    out: dict = {}
    skip = set()
    for name, t in tensors.items():
        if name in skip:
            continue
        base = linear_base(name)
        if base is not None and t.dim() == 2 and name not in RAW_2D:
            out[base] = qweight_from(tensors, base).to(device)
            skip.update(base + c for c in COMPANIONS)
        elif is_companion(name, tensors):
            continue
        else:
            out[name] = t.to(device)
    return out


def fuse_rows(weights: dict, names: list[str]) -> QWeight | None:
    """One QWeight whose rows are the named linears' rows in order (so linears that read the same
    input run as one GEMV launch), each named entry of ``weights`` replaced by a view of its rows:
    no second copy is kept. None, and nothing changed, when they cannot be stacked: a name missing,
    formats, dtypes or input sizes differ, FP8 rows not whole FP8_BLOCK-row scale blocks, a float32
    dequantisation cached (weights.cache_dense), or a format other than dense / FP8."""
    ws = [weights.get(n) for n in names]
    if not all(isinstance(q, QWeight) for q in ws):
        return None
    q0 = ws[0]
    same = all(q.fmt == q0.fmt and q.data.dtype == q0.data.dtype and q.shape[1] == q0.shape[1] and q.dense is None
               and (q.scale is None) == (q0.scale is None) and (q.scale is None or q.scale.dtype == q0.scale.dtype)
               and q.global_scale is None for q in ws)
    if not same or q0.fmt not in ("dense", "fp8") or (q0.fmt == "fp8" and any(q.shape[0] % FP8_BLOCK for q in ws)):
        return None
    data = torch.cat([q.data for q in ws])
    scale = None if q0.scale is None else torch.cat([q.scale for q in ws])
    row = 0
    for n, q in zip(names, ws):
        k = q.shape[0]
        weights[n] = QWeight(q.fmt, data[row:row + k], None if scale is None else scale[row // FP8_BLOCK:(row + k) // FP8_BLOCK])
        row += k
    return QWeight(q0.fmt, data, scale)


def logical_tensors(weights: dict) -> dict:
    """The engine's weight dict -> published name -> logical tensor (linears dequantised to float32)."""
    out = {}
    for name, v in weights.items():
        if isinstance(v, QWeight):
            out[name + ".weight"] = v.dequant(torch.float32)
        else:
            out[name] = v
    return out


def cache_dense(weights: dict, limit_bytes: int) -> int:
    """Keep a float32 dequantisation next to every quantised linear when all of them together fit
    in ``limit_bytes``; returns the bytes cached (0 when over the limit: nothing is cached).

    For small models on CPU, where decoding FP8/FP4 on each call dominates a decode step. The values
    are identical to decoding on the fly, so results do not change."""
    qs = [v for v in weights.values() if isinstance(v, QWeight) and v.fmt != "dense"]
    total = sum(4 * v.shape[0] * v.shape[1] for v in qs)
    if not qs or total > limit_bytes:
        return 0
    for v in qs:
        v.dense = v.dequant(torch.float32)
    return total
