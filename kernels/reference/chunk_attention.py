"""Attention of a prefill chunk over its window and the compressed entries, in bounded memory.

The chunk's queries are visited ``q_tile`` at a time and their keys ``k_tile`` at a time with an
online softmax (running max m, denominator l and weighted values acc per query and head), so no
tensor is larger than [q_tile, H, max(k_tile, D)]: nothing grows with context x context or
context x entries x heads. The sink joins the denominator at the end. Same values as
``sparse_mqa_attention`` over the concatenated keys with the visibility mask (up to float32
summation order).
"""

from __future__ import annotations

import torch

from .entries import read_entries
from .rope import apply_rope

Q_TILE = 64
K_TILE = 512


def _update(state, logits: torch.Tensor, values: torch.Tensor) -> None:
    """Fold one key tile into the running (m [Q, H], l [Q, H], acc [Q, H, D]) of a query tile.

    logits: [Q, H, T] float32 (-inf = hidden); values: [T, D] shared by all queries, or [Q, T, D]."""
    m, l, acc = state
    m_new = torch.maximum(m, logits.amax(-1))
    safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    p = torch.exp(logits - safe[..., None])  # [Q, H, T], 0 where hidden
    alpha = torch.exp(m - safe)  # 0 while m is -inf
    l.mul_(alpha).add_(p.sum(-1))
    pv = torch.einsum("qht,td->qhd", p, values) if values.dim() == 2 else torch.einsum("qht,qtd->qhd", p, values)
    acc.mul_(alpha[..., None]).add_(pv)
    m.copy_(m_new)


def _window_keys(t, ring, ring_pos, kv, positions, i0, i1, W):
    """The window keys a query tile [i0, i1) may see: the ring and the chunk's keys [max(0, i0-W+1), i1).
    -> (keys [T, D] float32, mask [Q, T] bool)."""
    j0 = max(0, i0 - W + 1)
    keys = torch.cat([ring.float(), kv[j0:i1].float()], 0)
    kpos = torch.cat([ring_pos, positions[j0:i1]], 0)
    mask = (kpos[None, :] >= 0) & (kpos[None, :] <= t) & (kpos[None, :] > t - W)
    return keys, mask


def chunk_attention(q: torch.Tensor, positions: torch.Tensor, ring: torch.Tensor, ring_pos: torch.Tensor,
                    kv: torch.Tensor, window: int, entries: dict | None, rows: torch.Tensor | None, ratio: int,
                    select: torch.Tensor | None, sink: torch.Tensor, scale: float,
                    out_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sink attention of a chunk's queries over window + compressed entries, key tile by key tile.

    q: [S, H, D] at positions [S] int64 (consecutive); ring: [W', D] the window keys before the chunk at
    ring_pos [W'] int64 (-1: empty slot); kv: [S, D] the chunk's own keys (at ``positions``); window: W,
    key k visible to query t iff t-W < pos(k) <= t. entries: the compressed-entry store (its storage
    format, kernels/reference/entries.py) or None (SWA layer); rows: [n] int64 its rows of entries
    0..n-1; ratio: m, entry e visible to t iff (e+1)*m <= t+1. select: None (HCA: every visible entry)
    or [S, K] int64 entry indices per query, -1 = none (CSA: the indexer's top-k, all visible).
    sink: [H] logits joining the denominator only; scale: the score scale. out_rope: None, or the
    queries' (cos, sin) [S, rd/2]: the output's last rd channels are then rotated back by each query's
    angle (apply_rope inverse: the step before wo_a), so the GPU kernel does it in its epilogue.
    -> [S, H, D] float32 (q may be bf16: faithful mode's queries). Computed in float32 throughout;
    the GPU kernel, given bf16 queries, rounds the probabilities to bf16 for P.V (flash-attention
    style), a difference of about 2^-9 relative per weight that the GPU tests bound.
    """
    S, H, D = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    n = 0 if entries is None else rows.shape[0]
    for i0 in range(0, S, Q_TILE):
        i1 = min(S, i0 + Q_TILE)
        qt = q[i0:i1].float()
        t = positions[i0:i1, None]
        state = (torch.full((i1 - i0, H), float("-inf"), device=q.device), torch.zeros(i1 - i0, H, device=q.device),
                 torch.zeros(i1 - i0, H, D, device=q.device))
        keys, mask = _window_keys(t, ring, ring_pos, kv, positions, i0, i1, window)
        for k0 in range(0, keys.shape[0], K_TILE):
            kt = keys[k0:k0 + K_TILE]
            lg = torch.einsum("qhd,td->qht", qt, kt) * scale
            _update(state, lg.masked_fill(~mask[:, None, k0:k0 + K_TILE], float("-inf")), kt)
        if n and select is None:
            for e0 in range(0, n, K_TILE):  # n: the entries visible to the chunk's last query
                e = torch.arange(e0, min(n, e0 + K_TILE), device=q.device)
                kt = read_entries(entries, rows[e])
                lg = torch.einsum("qhd,td->qht", qt, kt) * scale
                _update(state, lg.masked_fill(~((e[None, :] + 1) * ratio <= t + 1)[:, None, :], float("-inf")), kt)
        elif n:
            sel = select[i0:i1]
            for c0 in range(0, sel.shape[1], K_TILE // 4):
                idx = sel[:, c0:c0 + K_TILE // 4]  # [Q, k]
                kt = read_entries(entries, rows[idx.clamp(min=0).reshape(-1)]).view(*idx.shape, D)
                lg = torch.einsum("qhd,qkd->qhk", qt, kt) * scale
                _update(state, lg.masked_fill((idx < 0)[:, None, :], float("-inf")), kt)
        m, l, acc = state
        sk = sink.float()[None, :]
        top = torch.maximum(m, sk)
        a = torch.exp(m - top)
        out[i0:i1] = acc * a[..., None] / (l * a + torch.exp(sk - top))[..., None]
    return out if out_rope is None else apply_rope(out, *out_rope, inverse=True)
