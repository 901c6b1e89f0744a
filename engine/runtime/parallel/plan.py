"""What fits where before anything loads: per rank, the weight bytes of its share (layout.py), the KV
cache at a context (replicated: every rank holds the whole shared-KV cache of its request), a fixed
reserve for activations, and the headroom left on a device of a given size.

Weights are counted from a checkpoint's safetensors headers (``checkpoint_tensors``) or, for a
preset, from the published formats (``published_tensors``). Units: bytes, tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv4.cache import CacheSchema
from dsv4.engine.checkpoint.formats import COMPANIONS, SCALE_2, published_format, stored_entries
from dsv4.engine.checkpoint.shapes import tensor_shapes
from dsv4.engine.model.config import DSV4Config
from dsv4.kernels.formats import FP8_BLOCK

from .layout import _EXPERT, SKIP, RankShare, pick, plan_shares

# Transient device memory a rank needs besides weights and cache: the decode step's buffers and CUDA
# graph, the prefill chunk's activations (engine/runtime/session.py sizes chunks to fit what is
# left), the CUDA context and NCCL's buffers.
RESERVE_BYTES = 6 << 30
_ITEM = {"F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


@dataclass(frozen=True)
class Stored:
    """One stored tensor: its name, stored shape (packed FP4: bytes per row) and safetensors dtype."""

    name: str
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM[self.dtype]


def published_tensors(cfg: DSV4Config, mtp: bool = True) -> list[Stored]:
    """Every stored tensor of ``cfg`` in the published formats (FP8 + ue8m0 block scales, MXFP4
    experts, BF16 / F32 small tensors, int32 tid2eid)."""
    out = []
    for name, (_, shape) in tensor_shapes(cfg, mtp).items():
        fmt = published_format(name)
        for sname, (sshape, _) in stored_entries(name, shape, fmt).items():
            dt = {"fp8": "F8_E4M3", "mxfp4": "U8", "int": "I32", "bf16": "BF16", "f32": "F32"}[fmt]
            if sname != name:
                dt = "F8_E8M0"
            out.append(Stored(sname, tuple(sshape), dt))
    return out


def checkpoint_tensors(path) -> list[Stored]:
    """Every stored tensor of a checkpoint folder, from its safetensors headers (nothing loaded)."""
    from dsv4.engine.checkpoint.published import open_checkpoint
    from dsv4.engine.checkpoint.shards import ShardReader

    ck = open_checkpoint(path, validate=False)
    out = []
    for shard in sorted(set(ck.weight_map.values())):
        for name, (dt, shape, _) in ShardReader(ck.path / shard).meta.items():
            out.append(Stored(name, tuple(shape), dt))
    return out


def rank_weight_bytes(tensors: list[Stored], cfg: DSV4Config, shares: list[RankShare]) -> list[int]:
    """Bytes of the stored tensors each rank reads and holds: its slices (FP8 block scales by the
    128-blocks the slice covers, other scales in proportion), whole replicated tensors, its experts."""
    names = {t.name: t for t in tensors}
    last = shares[-1]  # its slices stop at each sliced dimension's whole length
    totals = [0] * len(shares)
    owner = {e: i for i, sh in enumerate(shares) for e in range(*sh.experts)}
    for t in tensors:
        base = next((t.name[: -len(c)] for c in COMPANIONS if t.name.endswith(c) and
                     t.name[: -len(c)] + ".weight" in names), None)
        logical = base + ".weight" if base else t.name
        w = names.get(logical)
        expert = _EXPERT.search(logical)
        if expert:  # most tensors: whole, on the rank that holds the expert
            totals[owner[int(expert.group(1))]] += t.nbytes
            continue
        for i, share in enumerate(shares):
            want = pick(share, cfg, logical)
            if want == SKIP:
                continue
            if want is None or t.name.endswith(SCALE_2) or not t.shape:
                totals[i] += t.nbytes
                continue
            dim, a, b = want
            if base is not None and w is not None and w.dtype == "F8_E4M3":  # block scales
                totals[i] += t.nbytes // t.shape[dim] * (math.ceil(b / FP8_BLOCK) - a // FP8_BLOCK)
            else:  # rows or columns in proportion (packed FP4 bytes and group scales alike)
                totals[i] += t.nbytes * (b - a) // pick(last, cfg, logical)[2]
    return totals


def kv_bytes(cfg: DSV4Config, context: int, precision: str = "faithful") -> int:
    """The cache of one request of ``context`` tokens (every rank holds all of it)."""
    return CacheSchema.from_config(cfg, precision).bytes_for_context(context)["total"]


def plan(cfg: DSV4Config, tensors: list[Stored], ranks: int, context: int, precision: str = "faithful",
         device_bytes: int | None = None) -> dict:
    """Per rank: weights, KV at ``context``, reserve, total and headroom on a device of
    ``device_bytes`` (None: unknown). -> {"ranks", "context_tokens", "per_rank": [...], "fits"}."""
    kv = kv_bytes(cfg, context, precision)
    rows = []
    shares = plan_shares(cfg, ranks)
    for share, w in zip(shares, rank_weight_bytes(tensors, cfg, shares)):
        need = w + kv + RESERVE_BYTES
        rows.append({"rank": share.rank, "weight_bytes": w, "kv_bytes": kv, "reserve_bytes": RESERVE_BYTES,
                     "total_bytes": need, "device_bytes": device_bytes,
                     "headroom_bytes": None if device_bytes is None else device_bytes - need,
                     "experts": list(share.experts), "heads": list(share.heads), "vocab": list(share.vocab)})
    fits = None if device_bytes is None else all(r["headroom_bytes"] >= 0 for r in rows)
    return {"ranks": ranks, "context_tokens": context, "precision": precision, "per_rank": rows, "fits": fits}


def fewest_ranks(cfg: DSV4Config, tensors: list[Stored], context: int, device_bytes: int, available: int,
                 precision: str = "faithful") -> int | None:
    """The fewest ranks (1..available, those the layout can split) whose every device holds its
    weights, the cache at ``context`` and the reserve; None when even ``available`` do not."""
    from .layout import LayoutError

    room = device_bytes - kv_bytes(cfg, context, precision) - RESERVE_BYTES
    if room <= 0:
        return None
    first = max(1, math.ceil(sum(t.nbytes for t in tensors) / room))  # no fewer can hold the weights
    for n in range(first, available + 1):
        try:
            if plan(cfg, tensors, n, context, precision, device_bytes)["fits"]:
                return n
        except LayoutError:
            continue
    return None
