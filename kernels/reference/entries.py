"""Cache entries in their storage formats, as plain tensors (no cache objects).

A store is a dict of row-major tensors, one row per entry:
- KV (faithful): "fp8" float8_e4m3fn [rows, D-r], "scales" uint8 [rows, (D-r)/64] (ue8m0, one per 64
  FP8 channels), "bf16" bfloat16 [rows, r] (the RoPE channels);
- indexer keys (faithful): "fp4" uint8 [rows, Di/2] (two e2m1 codes per byte, low nibble first),
  "scales" uint8 [rows, Di/32];
- exact: "f32" float32 [rows, D].
``store_entry`` quantises and writes one entry; ``read_entries`` dequantises rows to float32.
"""

from __future__ import annotations

import torch

from dsv4.kernels import quant
from dsv4.kernels.formats import INDEXER_FP4_GROUP, KV_FP8_GROUP

FP8_GROUP = KV_FP8_GROUP
FP4_GROUP = INDEXER_FP4_GROUP


def store_kind(store: dict) -> str:
    return "kv" if "fp8" in store else "fp4" if "fp4" in store else "f32"


def read_entries(store: dict, rows: torch.Tensor | slice) -> torch.Tensor:
    """Entries at ``rows`` (index tensor [k] or slice) as float32 [k, D]."""
    kind = store_kind(store)
    if kind == "kv":
        a = quant.fp8_dequantize(store["fp8"][rows], store["scales"][rows], FP8_GROUP)
        return torch.cat([a, store["bf16"][rows].float()], -1)
    if kind == "fp4":
        return quant.fp4_dequantize(quant.unpack_fp4(store["fp4"][rows]), store["scales"][rows], FP4_GROUP)
    return store["f32"][rows].clone()


def write_entries(store: dict, rows: torch.Tensor | slice, x: torch.Tensor) -> None:
    """Quantise x [k, D] into the store's format at ``rows`` (exact for an already-quantised value)."""
    kind = store_kind(store)
    if kind == "kv":
        nope = store["fp8"].shape[1]
        q, e = quant.fp8_quantize(x[:, :nope], FP8_GROUP)
        store["fp8"][rows] = q
        store["scales"][rows] = e
        store["bf16"][rows] = x[:, nope:].to(torch.bfloat16)
    elif kind == "fp4":
        codes, e = quant.fp4_quantize(x, FP4_GROUP)
        store["fp4"][rows] = quant.pack_fp4(codes)
        store["scales"][rows] = e
    else:
        store["f32"][rows] = x.float()


def store_entry(x: torch.Tensor, store: dict, row: torch.Tensor) -> None:
    """Write entries x [k, D] (float) at rows [k] (device int64) of ``store``, quantising them (a
    decode step stores one; a prefill chunk its compressed entries and window rows)."""
    write_entries(store, row, x)


def entry_rows(pos: torch.Tensor, block_row: torch.Tensor, ratio: int, per_block: int, capacity: int):
    """Cache rows of a slot's compressed entries, for one decode step at device position pos [1].

    block_row: the slot's block table row [blocks] int (-1: not allocated); block b holds pool rows
    b * per_block .. (b + 1) * per_block - 1. -> (row [1] int64: the row of entry pos // ratio, the
    one being written; rows [capacity] int64: the rows of entries 0..capacity-1; ok [capacity]
    bool: entry j's window has closed, (j + 1) * ratio <= pos + 1). Entries of unallocated blocks
    map to row 0 (masked)."""
    e = torch.cat([pos.reshape(1) // ratio, torch.arange(capacity, device=pos.device)])
    rows = block_row.long()[e // per_block].clamp(min=0) * per_block + e % per_block
    ok = (e[1:] + 1) * ratio <= pos.reshape(1) + 1
    return rows[:1], rows[1:], ok
