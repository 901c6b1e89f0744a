"""Which stored format each published tensor has, and the shapes/dtypes that format implies.

Published layout (spec section 4): FP8 e4m3 linears with FP8_BLOCK x FP8_BLOCK (128x128) ue8m0
block scales for the
attention projections (wq_a, wq_b, wkv, wo_a, wo_b, indexer wq_b), the shared experts and the MTP
e_proj/h_proj; MXFP4 routed experts; BF16 embed/head/router gate/compressor and indexer small
linears; F32 norms, hc_*, ape, attn_sink and gate bias; int32 tid2eid.
"""

from __future__ import annotations

import math
import re

import torch

from dsv4.kernels.formats import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP

# A linear ``X`` is stored as ``X.weight`` plus companions (spec section 4): ``X.scale`` (ue8m0 FP8 block
# scales, MXFP4 ue8m0 or NVFP4 e4m3 group scales), ``X.weight_scale_inv`` (older FP8 dumps: float32
# block scales under this name instead of ``.scale``), ``X.scale_2`` (NVFP4's float32 tensor scale).
WEIGHT, SCALE, SCALE_INV, SCALE_2 = ".weight", ".scale", ".weight_scale_inv", ".scale_2"
COMPANIONS = (SCALE, SCALE_INV, SCALE_2)

FP8_LINEAR = re.compile(
    r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|e_proj|h_proj)\.weight$")
EXPERT = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
BF16_2D = re.compile(r"(embed|head|gate|compressor\.wkv|compressor\.wgate|weights_proj)\.weight$")


def published_format(name: str) -> str:
    """'fp8' | 'mxfp4' | 'bf16' | 'f32' | 'int' for a published tensor name (weights only)."""
    if name.endswith("tid2eid"):
        return "int"
    if EXPERT.search(name):
        return "mxfp4"
    if FP8_LINEAR.search(name):
        return "fp8"
    if BF16_2D.search(name):
        return "bf16"
    return "f32"


def linear_base(name: str) -> str | None:
    """``X`` for a weight name ``X.weight``, else None."""
    return name[: -len(WEIGHT)] if name.endswith(WEIGHT) else None


def stored_names(name: str) -> list[str]:
    """Every stored name a logical tensor may occupy: ``X.weight`` and its companions, else itself."""
    base = linear_base(name)
    return [name] if base is None else [name] + [base + c for c in COMPANIONS]


def is_companion(name: str, names) -> bool:
    """True when ``name`` is a scale stored beside a ``.weight`` present in ``names``."""
    for c in COMPANIONS:
        if name.endswith(c):
            return name[: -len(c)] + WEIGHT in names
    return False


def stored_entries(name: str, shape: tuple, fmt: str) -> dict:
    """Stored tensors (name -> (shape, allowed dtypes)) for a logical weight of ``shape`` in ``fmt``."""
    if fmt == "fp8":
        out, inn = shape
        return {name: (shape, (torch.float8_e4m3fn,)),
                _scale_name(name): ((math.ceil(out / FP8_BLOCK), math.ceil(inn / FP8_BLOCK)),
                                    (torch.float8_e8m0fnu, torch.float32))}
    if fmt in ("mxfp4", "nvfp4"):
        out, inn = shape
        packed = (torch.float4_e2m1fn_x2, torch.int8, torch.uint8)
        if fmt == "mxfp4":
            return {name: ((out, inn // 2), packed),
                    _scale_name(name): ((out, inn // MXFP4_GROUP), (torch.float8_e8m0fnu, torch.uint8))}
        return {name: ((out, inn // 2), packed), _scale_name(name): ((out, inn // NVFP4_GROUP), (torch.float8_e4m3fn,)),
                linear_base(name) + SCALE_2: ((), (torch.float32,))}
    if fmt == "int":
        return {name: (shape, (torch.int32, torch.int64))}
    return {name: (shape, (torch.bfloat16, torch.float32, torch.float16))}


def _scale_name(name: str) -> str:
    base = linear_base(name)
    return (name if base is None else base) + SCALE
