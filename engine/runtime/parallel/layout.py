"""How one model is split over R ranks for batch-1 latency, and which slice of each tensor a rank holds.

The split (README "Several GPUs" says why):
- routed experts: by expert id, contiguous ranges (expert parallel); a rank holds and reads only its
  own, the router's ids of other ranks' experts map to -1 (kernels ExpertSet.local);
- attention: by output group (heads go with their group): wq_b rows and attn_sink of the group's
  heads, wo_a rows of the group, wo_b columns of the group -> a partial attention output;
- shared expert: by its intermediate dimension (w1/w3 rows, w2 columns) -> a partial MoE output;
- head: by vocabulary rows, the logits gathered after it;
- everything else (embedding, norms, mHC, wq_a, wkv, compressors, indexer, routers) replicated:
  each rank computes the shared KV cache and the mHC streams itself.
Per sub-layer one all-reduce sums the partials (attention; routed + shared MoE).

FP8 linears keep their 128x128 block scales: a slice of rows (columns) starts on a whole block, or
lies inside one block, so the slice's local blocks are whole global blocks (``block_parts``).
Faithful mode quantises a linear's input per 128-slice on each rank: where a split of wo_b's or the
shared w2's input dimension falls inside a 128-slice (only models whose whole dimension is at most
128, never V4-Flash or V4-Pro), the ranks pick their own scales for their parts and the result
differs slightly from one device's (the tests compare such tiny models by their greedy tokens).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsv4.engine.model.config import DSV4Config
from dsv4.kernels.formats import FP8_BLOCK


class LayoutError(ValueError):
    """The model cannot be split over this many ranks (the message says why and what can)."""


def even_parts(n: int, ranks: int) -> list[tuple[int, int]]:
    """[start, stop) of n items over ranks, contiguous, the first n % ranks parts one larger."""
    q, r = divmod(n, ranks)
    out, a = [], 0
    for i in range(ranks):
        b = a + q + (i < r)
        out.append((a, b))
        a = b
    return out


def block_parts(n: int, ranks: int, block: int = FP8_BLOCK) -> list[tuple[int, int]]:
    """[start, stop) of n rows over ranks such that every part starts on a whole ``block`` or the
    whole dimension is one block: parts of whole blocks when n > block, else even_parts."""
    if n <= block:
        return even_parts(n, ranks)
    return [(a * block, min(n, b * block)) for a, b in even_parts(math.ceil(n / block), ranks)]


@dataclass(frozen=True)
class RankShare:
    """What rank ``rank`` of ``ranks`` holds: [start, stop) ranges of output groups, heads (the
    groups' heads), routed experts, shared-expert intermediate rows and vocabulary rows;
    vocab_parts: every rank's vocabulary range (for gathering the logits)."""

    rank: int
    ranks: int
    groups: tuple[int, int]
    heads: tuple[int, int]
    experts: tuple[int, int]
    shared: tuple[int, int]
    vocab: tuple[int, int]
    vocab_parts: tuple[tuple[int, int], ...]

    @property
    def whole(self) -> bool:
        return self.ranks == 1


def plan_shares(cfg: DSV4Config, ranks: int) -> list[RankShare]:
    """Every rank's share of ``cfg``; LayoutError when some part cannot be split that many ways."""
    if ranks < 1:
        raise LayoutError(f"ranks must be >= 1, got {ranks}")
    G, H, E = cfg.o_groups, cfg.num_attention_heads, cfg.n_routed_experts
    I = cfg.moe_intermediate_size * cfg.n_shared_experts
    hpg = H // G
    for what, n in (("output groups (o_groups)", G), ("routed experts", E), ("shared-expert rows", I)):
        if n < ranks:
            raise LayoutError(f"the model has {n} {what}: it cannot be split over {ranks} ranks "
                              f"(use at most {n})")
    groups = even_parts(G, ranks)
    experts = even_parts(E, ranks)
    shared = block_parts(I, ranks)
    if any(a == b for a, b in shared):
        raise LayoutError(f"the shared expert's {I} rows in {FP8_BLOCK}-row blocks cannot be split over {ranks} "
                          f"ranks (use at most {math.ceil(I / FP8_BLOCK)})")
    vocab = tuple(even_parts(cfg.vocab_size, ranks))
    rows_per_group = hpg * cfg.head_dim
    for a, _ in groups:  # wq_b rows of a group's heads start on an FP8 block (or wq_b is one block)
        if (a * rows_per_group) % FP8_BLOCK and H * cfg.head_dim > FP8_BLOCK:
            raise LayoutError(f"wq_b's rows of {hpg} heads x {cfg.head_dim} do not split on {FP8_BLOCK}-row blocks "
                              f"over {ranks} ranks (a group boundary falls inside a block)")
        if (a * cfg.o_lora_rank) % FP8_BLOCK and G * cfg.o_lora_rank > FP8_BLOCK:
            raise LayoutError(f"wo_a/wo_b's {cfg.o_lora_rank} rows per group do not split on {FP8_BLOCK}-row "
                              f"blocks over {ranks} ranks")
    return [RankShare(r, ranks, groups[r], (groups[r][0] * hpg, groups[r][1] * hpg), experts[r], shared[r],
                      vocab[r], vocab) for r in range(ranks)]


def local_config(cfg: DSV4Config, share: RankShare) -> DSV4Config:
    """The config the model math runs with on this rank: its heads and output groups (attention reads
    only these two; everything else keeps the whole model's values)."""
    if share.whole:
        return cfg
    return cfg.replace(num_attention_heads=share.heads[1] - share.heads[0],
                       o_groups=share.groups[1] - share.groups[0])


# A whole linear or tensor: None. A slice: (dim, start, stop) of the LOGICAL tensor (weight rows/columns
# before packing). SKIP: another rank's tensor, not read at all.
SKIP = "skip"
_ROWS_BY_HEAD = re.compile(r"\.attn\.(wq_b\.weight|attn_sink)$")
_WO_A, _WO_B = re.compile(r"\.attn\.wo_a\.weight$"), re.compile(r"\.attn\.wo_b\.weight$")
_SHARED = re.compile(r"\.ffn\.shared_experts\.(w[123])\.weight$")
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.weight$")


def pick(share: RankShare, cfg: DSV4Config, name: str):
    """This rank's part of the logical tensor ``name`` (a weight's ``X.weight``; its scales follow it,
    engine/checkpoint/loader.read_slices): None (whole), SKIP, or (dim, start, stop)."""
    if share.whole:
        return None
    m = _EXPERT.search(name)
    if m:
        e0, e1 = share.experts
        return None if e0 <= int(m.group(1)) < e1 else SKIP
    if _ROWS_BY_HEAD.search(name):
        h0, h1 = share.heads
        D = 1 if name.endswith("attn_sink") else cfg.head_dim
        return (0, h0 * D, h1 * D)
    g0, g1 = share.groups
    if _WO_A.search(name):
        return (0, g0 * cfg.o_lora_rank, g1 * cfg.o_lora_rank)
    if _WO_B.search(name):
        return (1, g0 * cfg.o_lora_rank, g1 * cfg.o_lora_rank)
    m = _SHARED.search(name)
    if m:
        return (1 if m.group(1) == "w2" else 0, *share.shared)
    if name == "head.weight":
        return (0, *share.vocab)
    return None
