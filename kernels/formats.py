"""Named constants of the stored formats, and the precision mode, defined once for every layer.

Weights (spec/DSV4.md section 4):
- FP8 e4m3 linears carry one ue8m0 scale per ``FP8_BLOCK`` x ``FP8_BLOCK`` block of the weight;
- MXFP4 experts: e2m1 codes, one ue8m0 scale per ``MXFP4_GROUP`` input values;
- NVFP4 (dsv4 convert): e2m1 codes, one e4m3 scale per ``NVFP4_GROUP`` input values and a float32
  per-tensor scale.
Cache entries (faithful mode):
- KV: the non-RoPE channels FP8 e4m3 with one ue8m0 scale per ``KV_FP8_GROUP`` channels, the RoPE
  channels bf16;
- indexer keys: Hadamard-rotated, e2m1 with one ue8m0 scale per ``INDEXER_FP4_GROUP`` channels.
"""

from __future__ import annotations

from enum import Enum

FP8_BLOCK = 128
MXFP4_GROUP = 32
NVFP4_GROUP = 16
KV_FP8_GROUP = 64
INDEXER_FP4_GROUP = 32


class PrecisionError(ValueError):
    """An unknown precision name (a user error: the message names the choices)."""


class Precision(str, Enum):
    """How the KV cache and the indexer are stored and computed.

    EXACT: no quantisation simulation (float32 entries; equals transformers' DeepseekV4).
    FAITHFUL: FP8 KV / FP4 indexer entries, as the model was trained, and DeepSeek's inference
    numerics: e4m3 (1 x 128, ue8m0) inputs to the FP8 / FP4 linears, bf16 attention queries (the
    default for real use). Which linears quantise follows how a weight is stored (FP8 / FP4 yes,
    BF16 no), as in the published checkpoint.
    A ``str`` enum: ``Precision.FAITHFUL == "faithful"``, and it prints as its value."""

    EXACT = "exact"
    FAITHFUL = "faithful"

    @classmethod
    def parse(cls, value: "Precision | str") -> "Precision":
        """The one validation point: a Precision, or its name (case-insensitive) -> Precision."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise PrecisionError(f"unknown precision {value!r}: use exact or faithful") from None

    def __str__(self) -> str:
        return self.value

    @property
    def faithful(self) -> bool:
        return self is Precision.FAITHFUL
