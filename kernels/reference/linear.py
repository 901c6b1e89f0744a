"""Linear layers over weights kept in their stored formats (dense, FP8 block, MXFP4, NVFP4).

The reference path dequantises the weight and multiplies in float32. Activations stay in full
precision (exact mode) or, with ``act_quant`` (faithful mode), pass through e4m3 per 1 x 128 slice
before an FP8 / FP4 weight, as DeepSeek's inference does. GPU kernels may replace ``linear``
through the dispatch table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels import quant

FORMATS = ("dense", "fp8", "mxfp4", "nvfp4")


@dataclass
class QWeight:
    """A weight [out, in] in one stored format.

    dense: data float [out, in].  fp8: data float8_e4m3fn [out, in] + scale [ceil(out/128), ceil(in/128)]
    (ue8m0 or float32).  mxfp4: data packed [out, in/2] + scale ue8m0 [out, in/32].
    nvfp4: data packed [out, in/2] + scale float8_e4m3fn [out, in/16] + global_scale float32 [].
    ``dense`` optionally holds the float32 dequantisation, made once (engine/weights.cache_dense) so
    small models on CPU do not decode FP8/FP4 on every call; it is the same values, not a new format.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out, inn = self.data.shape
        return (out, inn * 2) if self.fmt in ("mxfp4", "nvfp4") else (out, inn)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.global_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def dequant(self, dtype=torch.float32) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(dtype)
        if self.fmt == "dense":
            w = self.data
        elif self.fmt == "fp8":
            w = quant.dequant_fp8_block(self.data, self.scale)
        elif self.fmt == "mxfp4":
            w = quant.dequant_mxfp4(self.data, self.scale)
        elif self.fmt == "nvfp4":
            w = quant.dequant_nvfp4(self.data, self.scale, self.global_scale)
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}")
        return w.to(dtype)

    def to(self, device) -> "QWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QWeight(self.fmt, mv(self.data), mv(self.scale), mv(self.global_scale))


def quantised_input(x: torch.Tensor, w: QWeight, act_quant: bool) -> torch.Tensor:
    """x as the linear multiplies it: with act_quant (faithful mode) and a weight stored in FP8 or
    FP4, each 1 x 128 slice of x's last axis through e4m3 with a ue8m0 scale
    (quant.act_quant_dequant); else x itself (dense weights, exact mode)."""
    return quant.act_quant_dequant(x) if act_quant and w.fmt != "dense" else x


def linear_reference(x: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """x: [..., in] -> [..., out], in x's dtype (float32 accumulate on CPU); act_quant: see
    ``quantised_input``."""
    x = quantised_input(x, w, act_quant)
    return (x @ w.dequant(x.dtype).t()).to(x.dtype)


def grouped_linear_reference(og: torch.Tensor, w: QWeight, act_quant: bool = False) -> torch.Tensor:
    """Grouped projection (V4's wo_a): og [S, G, Kg]; w [G*R, Kg], rows g*R..(g+1)*R-1 read group g.
    -> [S, G*R] in og's dtype. act_quant: each group's slice quantised on its own (``quantised_input``)."""
    S, G, Kg = og.shape
    og = quantised_input(og, w, act_quant)
    wa = w.dequant(og.dtype).view(G, -1, Kg)
    return torch.einsum("sgi,gri->sgr", og, wa).reshape(S, -1)
