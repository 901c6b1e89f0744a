"""Per-layer cache schema and the memory accounting derived from it.

A BLOCK is 128 original tokens (lcm of the ratios 4 and 128). Per attention layer:
- every layer: a window ring of ``sliding_window`` entries;
- CSA (ratio 4): 32 compressed entries + 32 indexer keys per block; state: a tail of up to 3
  pending tokens' (C, Z) rows at width 2*head_dim (main) and 2*index_head_dim (indexer), and the
  previous window's series a (4 rows of C and Z at head_dim / index_head_dim);
- HCA (ratio 128): 1 entry per block; state: a tail of up to 127 tokens' (C, Z) at head_dim;
- SWA: the window only.

Entry formats (bytes per entry, D = head_dim, r = rope dim, Di = index_head_dim):
- faithful KV entry: FP8 e4m3 (D - r) + BF16 RoPE 2r + one ue8m0 scale byte per 64 FP8 channels.
  D=512, r=64: 448 + 128 + 7 = 583 bytes.
- faithful indexer key: FP4 e2m1 Di/2 + one ue8m0 scale byte per 32: Di=128: 64 + 4 = 68 bytes.
- exact: float32, 4*D and 4*Di bytes.
Tails and series-a rows are float32 in both modes.

Closed form, faithful, per request of T tokens (T a multiple of 128, nb = T/128 blocks):
  CSA layer: nb*32*(583 + 68) + W*583 + tails 4*(3*2*(2D) + 4*2*D + 3*2*(2Di) + 4*2*Di)
  HCA layer: nb*583 + W*583 + 4*(127*2*D)
  SWA layer: W*583
With D=512, Di=128, W=128: CSA = 20832*nb + 74624 + 51200, HCA = 583*nb + 74624 + 520192,
SWA = 74624. V4-Flash (21 CSA, 20 HCA, 2 SWA) at T = 1,048,576 (nb = 8192):
  21*(20832*8192 + 125824) + 20*(583*8192 + 594816) + 2*74624 = 3,693,977,216 bytes
(8.8% of V3.2's 656 B x 61 layers x T; the paper claims about 7% for Flash, 10% for Pro).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4.kernels.formats import INDEXER_FP4_GROUP as FP4_GROUP, KV_FP8_GROUP as FP8_GROUP, Precision

BLOCK_TOKENS = 128
V32_BYTES_PER_TOKEN_LAYER = 656  # DeepSeek-V3.2 MLA cache: 512 FP8 + 16 scale + 128 BF16 RoPE
V32_LAYERS = 61


class CacheError(RuntimeError):
    """Cache budget exhausted, bad slot, or context limit reached."""


@dataclass(frozen=True)
class EntryFormat:
    """Byte layout of one stored vector of ``dim`` channels."""

    dim: int
    rope_dim: int
    kind: str  # "kv" (FP8 + BF16 RoPE + scales), "fp4" (indexer keys) or "f32" (exact)

    @property
    def fp8_bytes(self) -> int:
        return self.dim - self.rope_dim if self.kind == "kv" else 0

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.rope_dim if self.kind == "kv" else 0

    @property
    def scale_bytes(self) -> int:
        if self.kind == "kv":
            return (self.dim - self.rope_dim) // FP8_GROUP
        if self.kind == "fp4":
            return self.dim // FP4_GROUP
        return 0

    @property
    def fp4_bytes(self) -> int:
        return self.dim // 2 if self.kind == "fp4" else 0

    @property
    def f32_bytes(self) -> int:
        return 4 * self.dim if self.kind == "f32" else 0

    @property
    def nbytes(self) -> int:
        return self.fp8_bytes + self.bf16_bytes + self.scale_bytes + self.fp4_bytes + self.f32_bytes


@dataclass(frozen=True)
class LayerSchema:
    index: int
    attn: str  # "swa" | "csa" | "hca"
    ratio: int
    window: int
    kv: EntryFormat
    idx: EntryFormat | None  # indexer key format (CSA only)

    @property
    def entries_per_block(self) -> int:
        return BLOCK_TOKENS // self.ratio if self.ratio else 0

    @property
    def overlap(self) -> bool:
        return self.attn == "csa"

    @property
    def tail_rows(self) -> int:
        return self.ratio - 1 if self.ratio else 0

    @property
    def tail_width(self) -> int:
        return (2 if self.overlap else 1) * self.kv.dim

    def state_bytes(self) -> int:
        """float32 bytes of compressor tails and series-a rows (main + indexer)."""
        if not self.ratio:
            return 0
        n = self.tail_rows * 2 * self.tail_width
        if self.overlap:
            n += self.ratio * 2 * self.kv.dim
            n += self.tail_rows * 2 * 2 * self.idx.dim + self.ratio * 2 * self.idx.dim
        return 4 * n


@dataclass(frozen=True)
class CacheSchema:
    layers: tuple[LayerSchema, ...]
    mode: Precision  # the one source of the entry formats: FP8/FP4 entries iff FAITHFUL

    @classmethod
    def from_config(cls, cfg, mode: Precision | str = Precision.FAITHFUL, include_mtp: bool = False) -> "CacheSchema":
        """Derive the schema from a DSV4Config (duck-typed: only shape fields are read)."""
        mode = Precision.parse(mode)
        D, r, Di = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
        if mode is Precision.FAITHFUL:
            if (D - r) % FP8_GROUP:
                raise CacheError(f"faithful mode needs head_dim - rope dim ({D - r}) divisible by {FP8_GROUP}")
            if Di % FP4_GROUP:
                raise CacheError(f"faithful mode needs index_head_dim ({Di}) divisible by {FP4_GROUP}")
            kv, idx = EntryFormat(D, r, "kv"), EntryFormat(Di, 0, "fp4")
        else:
            kv, idx = EntryFormat(D, r, "f32"), EntryFormat(Di, 0, "f32")
        ratios = list(cfg.compress_ratios) + (list(cfg.mtp_compress_ratios) if include_mtp else [])
        names = {0: "swa", 4: "csa", 128: "hca"}
        layers = tuple(
            LayerSchema(i, names[rt], rt, cfg.sliding_window, kv, idx if rt == 4 else None)
            for i, rt in enumerate(ratios)
        )
        return cls(layers, mode)

    @staticmethod
    def blocks_for(context_tokens: int) -> int:
        """Blocks (of 128 tokens) needed to hold the compressed entries of a context."""
        return math.ceil(context_tokens / BLOCK_TOKENS)

    @property
    def min_ratio(self) -> int:
        rs = [ly.ratio for ly in self.layers if ly.ratio]
        return min(rs) if rs else 0

    def block_bytes(self) -> int:
        """Pool bytes one block occupies across all layers."""
        return sum(layer_block_breakdown(ly)["total"] for ly in self.layers)

    def bytes_for_context(self, context_tokens: int) -> dict:
        """Per-request bytes by layer type and component for ``context_tokens`` tokens.

        Returns {"by_type": {attn: {component: bytes, ..., "layers": n}}, "total": bytes}.
        Compressed entries are counted by whole blocks, the window at its full size.
        """
        nb = self.blocks_for(context_tokens)
        by_type: dict[str, dict] = {}
        for ly in self.layers:
            t = by_type.setdefault(ly.attn, {"layers": 0, "fp8": 0, "bf16": 0, "scales": 0, "fp4": 0,
                                             "f32": 0, "window": 0, "state": 0, "total": 0})
            t["layers"] += 1
            b = layer_block_breakdown(ly)
            for k in ("fp8", "bf16", "scales", "fp4", "f32"):
                t[k] += nb * b[k]
            t["window"] += ly.window * ly.kv.nbytes
            t["state"] += ly.state_bytes()
        for t in by_type.values():
            t["total"] = sum(t[k] for k in ("fp8", "bf16", "scales", "fp4", "f32", "window", "state"))
        return {"by_type": by_type, "total": sum(t["total"] for t in by_type.values()),
                "context_tokens": context_tokens, "blocks": nb, "mode": self.mode}


def layer_block_breakdown(ly: LayerSchema) -> dict:
    """Bytes of compressed entries (and indexer keys) one block holds in one layer, by component."""
    e = ly.entries_per_block
    out = {"fp8": e * ly.kv.fp8_bytes, "bf16": e * ly.kv.bf16_bytes, "scales": e * ly.kv.scale_bytes,
           "fp4": 0, "f32": e * ly.kv.f32_bytes}
    if ly.idx is not None:
        out["fp4"] += e * ly.idx.fp4_bytes
        out["scales"] += e * ly.idx.scale_bytes
        out["f32"] += e * ly.idx.f32_bytes
    out["total"] = sum(out.values())
    return out


def v32_bytes(context_tokens: int) -> int:
    """DeepSeek-V3.2-style MLA cache: 656 bytes per token per layer, 61 layers."""
    return V32_BYTES_PER_TOKEN_LAYER * V32_LAYERS * context_tokens
