"""Shared-KV multi-query attention with a per-head sink logit."""

from __future__ import annotations

import torch

from .entries import read_entries


def sparse_mqa_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Attention of every head over one shared key=value set.

    q: [S, H, D] queries; kv: [T, D] entries (keys AND values); bias: [S, T] additive mask
    (0 = visible, -inf = hidden); sink: [H] logit that joins the softmax denominator only.
    Returns [S, H, D] float32 (q may be bf16: faithful mode's queries). Computed in float32.
    """
    logits = torch.einsum("shd,td->sht", q.float(), kv.float()) * scale + bias.float().unsqueeze(1)
    S, H, _ = logits.shape
    sinks = sink.float().view(1, H, 1).expand(S, H, 1)
    full = torch.cat([logits, sinks], -1)
    full = full - full.amax(-1, keepdim=True)
    p = torch.softmax(full, -1)[..., :-1]
    return torch.einsum("sht,td->shd", p, kv.float())


def ring_valid(pos: torch.Tensor, W: int) -> torch.Tensor:
    """Ring slots j = 0..W-1 after the token at pos [1] is written: slot j holds position
    pos - ((pos - j) mod W), empty (False) when that is negative. -> bool [W]."""
    j = torch.arange(W, device=pos.device)
    return pos - torch.remainder(pos - j, W) >= 0


def decode_attention(q: torch.Tensor, ring: dict, pos: torch.Tensor, entries: dict | None, rows, ok,
                     sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one decode token over its window ring and compressed entries, read in their
    storage formats (kernels/entries.py).

    q: [H, D]; ring: the slot's W ring rows, the token itself already written; pos: [1] int64;
    entries: the entry store, rows: [T] int64 rows of it and ok: [T] bool which of them are seen
    (None: window only); sink: [H]. -> [H, D] float32 (before the inverse RoPE).
    """
    W = next(iter(ring.values())).shape[0]
    keys, valid = read_entries(ring, slice(None)), ring_valid(pos, W)
    if entries is not None:
        keys = torch.cat([keys, read_entries(entries, rows)], 0)
        valid = torch.cat([valid, ok], 0)
    bias = torch.zeros(1, valid.shape[0], device=q.device).masked_fill(~valid[None], float("-inf"))
    return sparse_mqa_attention(q.float()[None], keys, bias, sink, scale)[0]
