"""Random weights in every stored format, shared by the GPU kernel tests and the interpreter checks."""

import torch

from dsv4.cache import EntryFormat, EntryStore
from dsv4.kernels import quant
from dsv4.kernels.reference.linear import QWeight
from dsv4.kernels.reference.moe import ExpertSet

FORMATS = ("fp8", "fp8-f32", "mxfp4", "nvfp4", "bf16", "f32")


def weight(fmt: str, N: int, K: int, g: torch.Generator) -> QWeight:
    """A [N, K] weight ~ N(0, 1/K) in ``fmt`` (fp8-f32: FP8 with float32 block scales)."""
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if fmt == "fp8":
        return QWeight("fp8", *quant.quant_fp8_block(w))
    if fmt == "fp8-f32":
        q, s = quant.quant_fp8_block(w)
        return QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8)).float())
    if fmt == "mxfp4":
        return QWeight("mxfp4", *quant.quant_mxfp4(w))
    if fmt == "nvfp4":
        return QWeight("nvfp4", *quant.quant_nvfp4(w))
    return QWeight("dense", w.to(torch.bfloat16 if fmt == "bf16" else torch.float32))


def expert_set(fmt: str, E: int, inter: int, d: int, g: torch.Generator, device="cpu") -> ExpertSet:
    """E experts: w1, w3 [inter, d], w2 [d, inter] in ``fmt``."""
    mk = lambda N, K: weight(fmt, N, K, g).to(device)  # noqa: E731
    return ExpertSet([mk(inter, d) for _ in range(E)], [mk(inter, d) for _ in range(E)],
                     [mk(d, inter) for _ in range(E)])


def store(kind: str, rows: int, D: int, r: int, device="cpu") -> dict:
    """An empty entry store (kernels/entries.py layout) of ``rows`` entries of D channels, r of them
    RoPE: kind "kv", "fp4" or "f32"."""
    return EntryStore(rows, EntryFormat(D, r, kind), device).tensors
