"""The one encoder from a float tensor to each stored format, and the transcoder between stored formats.

Formats (spec section 4, engine/checkpoint/formats.py):
- ``fp8``: float8_e4m3fn [out, in] + ue8m0 ``.scale`` [ceil(out/FP8_BLOCK), ceil(in/FP8_BLOCK)];
- ``mxfp4``: packed e2m1 [out, in/2] + ue8m0 ``.scale`` [out, in/MXFP4_GROUP];
- ``nvfp4``: packed e2m1 [out, in/2] + e4m3 ``.scale`` [out, in/NVFP4_GROUP] + float32 ``.scale_2`` [];
- ``bf16`` / ``f32``: the tensor in that dtype; ``int``: int32 (the hash-routing table).

Used by the checkpoint writer (published.to_published), ``dsv4 convert`` (convert.py, through
``transcode``) and quantisation-aware training (train/trainer.stored_roundtrip, through
``stored_values``), so the three agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels import quant

from .formats import SCALE, SCALE_2, SCALE_INV, linear_base

FORMATS = ("fp8", "mxfp4", "nvfp4", "bf16", "f32", "int")
QUANTISED = ("fp8", "mxfp4", "nvfp4")


def encode(name: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """A float tensor -> its stored tensors in ``fmt`` (name -> tensor).

    ``name`` is the logical name (``X.weight`` for a linear, whose scales become ``X.scale`` and,
    for NVFP4, ``X.scale_2``). Quantised formats take a 2-D [out, in] ``w``."""
    if fmt in QUANTISED:
        base = linear_base(name)
        if base is None or w.dim() != 2:
            raise ValueError(f"{name}: {fmt} stores linear weights [out, in] named X.weight, got shape {list(w.shape)}")
        if fmt == "fp8":
            q, s = quant.quant_fp8_block(w)
            return {name: q, base + SCALE: s}
        if fmt == "mxfp4":
            q, s = quant.quant_mxfp4(w)
            return {name: q, base + SCALE: s}
        q, s, g = quant.quant_nvfp4(w)
        return {name: q, base + SCALE: s, base + SCALE_2: g}
    if fmt == "bf16":
        return {name: w.to(torch.bfloat16)}
    if fmt == "f32":
        return {name: w.float()}
    if fmt == "int":
        return {name: w.to(torch.int32)}
    raise ValueError(f"{name}: unknown stored format {fmt!r} (one of {', '.join(FORMATS)})")


def decode(name: str, stored: dict) -> torch.Tensor:
    """Stored tensors of ``name`` (the weight and its companions) -> float32 logical values."""
    from dsv4.engine.model.weights import qweight_from

    if stored_format(name, stored) in QUANTISED:
        return qweight_from(stored, linear_base(name)).dequant(torch.float32)
    return stored[name].float()


def stored_values(name: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 values ``fmt`` holds for ``w``: decode(encode(w)). For training's fake quantisation."""
    if fmt in ("f32", "int"):
        return w.float()
    return decode(name, encode(name, w, fmt))


def stored_format(name: str, stored: dict) -> str:
    """The format the stored tensors of ``name`` are in, read from their dtypes."""
    t = stored[name]
    if t.dtype == torch.float8_e4m3fn:
        return "fp8"
    if t.dtype in (torch.float4_e2m1fn_x2, torch.int8, torch.uint8) and linear_base(name) is not None and t.dim() == 2:
        scale = stored.get(linear_base(name) + SCALE)
        return "nvfp4" if scale is not None and scale.dtype == torch.float8_e4m3fn else "mxfp4"
    if t.dtype == torch.bfloat16:
        return "bf16"
    if not t.dtype.is_floating_point:
        return "int"
    return "f32"


@dataclass(frozen=True)
class Transcoded:
    """What ``transcode`` produced: the stored tensors, whether every value is kept exactly
    (``lossless``), and for MXFP4 -> NVFP4 how many 16-value blocks had to be re-rounded."""

    tensors: dict
    source_format: str
    lossless: bool
    rerounded_blocks: int = 0


def transcode(name: str, stored: dict, fmt: str) -> Transcoded:
    """Stored tensors of ``name`` (in whatever format they are) -> the same values in ``fmt``.

    Same format: the stored bits are kept (an FP8 ``.weight_scale_inv`` is renamed ``.scale``; packed
    FP4 bytes are viewed as float4_e2m1fn_x2). MXFP4 -> NVFP4: the e2m1 codes are kept and the power
    of two moves into the e4m3 block scale (quant.mxfp4_to_nvfp4), lossless except the counted
    re-rounded blocks. Anything else: decoded to float32 and encoded (``encode``)."""
    src = stored_format(name, stored)
    t = stored[name]
    base = linear_base(name)
    if src == fmt or fmt in ("f32", "int"):
        if src in QUANTISED:
            out = {name: t if src == "fp8" else t.view(torch.uint8).view(torch.float4_e2m1fn_x2)}
            scale = stored.get(base + SCALE)
            if scale is None:  # older FP8 dumps: float32 block scales under .weight_scale_inv
                scale = stored[base + SCALE_INV]
            if src == "mxfp4" and scale.dtype == torch.uint8:
                scale = scale.view(torch.float8_e8m0fnu)
            out[base + SCALE] = scale
            if src == "nvfp4":
                out[base + SCALE_2] = stored[base + SCALE_2]
            return Transcoded(out, src, True)
        return Transcoded({name: t}, src, True)
    if src == "mxfp4" and fmt == "nvfp4":
        q, s, g, n = quant.mxfp4_to_nvfp4(t, stored[base + SCALE])
        return Transcoded({name: q, base + SCALE: s, base + SCALE_2: g}, src, n == 0, n)
    return Transcoded(encode(name, decode(name, stored), fmt), src, False)
