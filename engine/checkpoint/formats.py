"""Which stored format each published tensor has, and the shapes/dtypes that format implies.

Published layout (spec section 4): FP8 e4m3 linears with 128x128 ue8m0 block scales for the
attention projections (wq_a, wq_b, wkv, wo_a, wo_b, indexer wq_b), the shared experts and the MTP
e_proj/h_proj; MXFP4 routed experts; BF16 embed/head/router gate/compressor and indexer small
linears; F32 norms, hc_*, ape, attn_sink and gate bias; int32 tid2eid.
"""

from __future__ import annotations

import math
import re

import torch

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


def stored_entries(name: str, shape: tuple, fmt: str) -> dict:
    """Stored tensors (name -> (shape, allowed dtypes)) for a logical weight of ``shape`` in ``fmt``."""
    if fmt == "fp8":
        out, inn = shape
        return {name: (shape, (torch.float8_e4m3fn,)),
                _scale_name(name): ((math.ceil(out / 128), math.ceil(inn / 128)), (torch.float8_e8m0fnu, torch.float32))}
    if fmt in ("mxfp4", "nvfp4"):
        out, inn = shape
        packed = (torch.float4_e2m1fn_x2, torch.int8, torch.uint8)
        if fmt == "mxfp4":
            return {name: ((out, inn // 2), packed), _scale_name(name): ((out, inn // 32), (torch.float8_e8m0fnu, torch.uint8))}
        return {name: ((out, inn // 2), packed), _scale_name(name): ((out, inn // 16), (torch.float8_e4m3fn,)),
                _scale_name(name) + "_2": ((), (torch.float32,))}
    if fmt == "int":
        return {name: (shape, (torch.int32, torch.int64))}
    return {name: (shape, (torch.bfloat16, torch.float32, torch.float16))}


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"
