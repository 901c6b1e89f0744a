"""Lightning Indexer scoring and top-k selection (ties go to the lower entry index)."""

from __future__ import annotations

import torch

from .entries import read_entries


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """score[t, s] = sum_h weights[t, h] * ReLU(q[t, h] . keys[s]).

    q: [S, H, Di]; keys: [T, Di]; weights: [S, H] (already scaled). -> [S, T] float32.
    """
    dots = torch.einsum("shd,td->sht", q.float(), keys.float()).relu()
    return torch.einsum("sht,sh->st", dots, weights.float())


def indexer_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Select the top-k visible entries per query; returns a bool mask [S, T].

    scores: [S, T]; visible: [S, T] bool. Rows with fewer than k visible entries select all of
    them. Equal scores are ordered by the LOWER entry index (stable descending sort).
    """
    S, T = scores.shape
    if T == 0:
        return visible.clone()
    masked = scores.float().masked_fill(~visible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, : min(k, T)]
    sel = torch.zeros_like(visible)
    sel.scatter_(1, order, True)
    return sel & visible


def indexer_topk_indices(scores: torch.Tensor, visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's top-k as indices: scores, visible: [T] -> (idx [k] int64 in selection order,
    ok [k] bool: False where fewer than k entries are visible). Same choice as indexer_topk."""
    masked = scores.float().masked_fill(~visible, float("-inf"))
    idx = torch.sort(masked, descending=True, stable=True).indices[:k]
    return idx, visible[idx]


# Streaming top-k (bounded memory): the running selection of each query is kept as int64 keys that
# order (score descending, entry index ascending), so one torch.topk per key tile keeps exactly the
# choice of the stable sort above, whatever tiles the entries arrive in.
_NONE = torch.iinfo(torch.int64).min  # the key of "no entry"
_LOW = 0xFFFFFFFF


def _order_keys(scores: torch.Tensor, first: int, visible: torch.Tensor) -> torch.Tensor:
    """scores [S, T] of entries first..first+T-1 -> int64 keys [S, T]: the float32 score's bits made
    order-preserving in the high 32 bits, (2^32-1 - entry index) in the low 32; hidden -> _NONE."""
    bits = (scores.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 ties with 0.0
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the float value
    idx = torch.arange(first, first + scores.shape[1], device=scores.device)
    return torch.where(visible, ordered * (_LOW + 1) + (_LOW - idx), torch.full_like(ordered, _NONE))


def topk_merge(best: torch.Tensor | None, scores: torch.Tensor, first: int, visible: torch.Tensor,
               k: int) -> torch.Tensor:
    """Fold the scores [S, T] of entries first..first+T-1 (visible [S, T] bool) into the running
    selection best [S, k'] (int64 keys, or None before the first tile). -> [S, min(k, seen)] keys."""
    keys = _order_keys(scores, first, visible)
    if best is not None:
        keys = torch.cat([best, keys], 1)
    return keys.topk(min(k, keys.shape[1]), dim=1, sorted=True).values


def topk_entries(best: torch.Tensor) -> torch.Tensor:
    """Running selection keys [S, k] -> entry indices [S, k] int64 in selection order (-1: none)."""
    return torch.where(best == _NONE, torch.full_like(best, -1), _LOW - (best & _LOW))


def indexer_select_decode(q: torch.Tensor, weights: torch.Tensor, store: dict, rows: torch.Tensor,
                          ok: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token's Lightning Indexer over the cache: q [H, Di] (already quantised and rotated
    in faithful mode), weights [H] (already scaled), the key store (kernels/reference/entries: FP4
    or float32), rows [n] int64 the pool rows of entries 0..n-1, ok [n] bool which of them the token
    may see. -> (the k chosen entries' pool rows [k] int64 in selection order, whether each is
    visible [k] bool): the choice and order of indexer_topk_indices over indexer_scores."""
    keys = read_entries(store, rows)
    idx, seen = indexer_topk_indices(indexer_scores(q[None], keys, weights[None])[0], ok, k)
    return rows[idx], seen
