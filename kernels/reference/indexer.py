"""Lightning Indexer scoring and top-k selection (ties go to the lower entry index)."""

from __future__ import annotations

import torch


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
