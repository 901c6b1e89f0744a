"""A prefill chunk's (token, slot) pairs sorted by expert and cut into tiles, on the device (torch ops
only, no host sync): the schedule of the grouped expert GEMMs (prefill_experts.py, staged_experts.py)."""

from __future__ import annotations

import torch


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Pairs per expert [n_experts] int64 of ids [S, k] int64, on the device (torch.bincount would read
    the largest id back to the host on CUDA: a sync per MoE layer)."""
    flat = ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def _tile_ends(counts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tiles per expert, their running end) for ``block`` pairs a tile, experts in id order."""
    tiles = (counts + block - 1) // block
    return tiles, torch.cumsum(tiles, 0)


def group_spans(counts: torch.Tensor, block: int, G: int) -> torch.Tensor:
    """The first tile of each group of G experts in ``schedule``'s tile order, then the end
    [ceil(E / G) + 1] (counts: expert_counts)."""
    ends = torch.cat([counts.new_zeros(1), _tile_ends(counts, block)[1]])
    return torch.cat([ends[0:len(counts):G], ends[len(counts):]])


def schedule(ids: torch.Tensor, n_experts: int, block: int, counts: torch.Tensor | None = None):
    """Sort the [S, k] (token, slot) pairs by expert (stable) and cut each expert's run into tiles of
    ``block`` pairs, all on the device. -> (order [S*k] pair ids sorted, tile_e / tile_lo / tile_hi
    [T] int64: the tile's expert (-1: unused), its first and end positions in ``order``), T a fixed
    bound (pairs / block + experts). No host sync (ids [S, k] int64 in [0, n_experts)). counts: the
    pairs per expert if the caller has them (expert_counts)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = expert_counts(ids, n_experts) if counts is None else counts
    first = torch.cumsum(counts, 0) - counts
    tiles, ends = _tile_ends(counts, block)
    T = (flat.numel() + block - 1) // block + n_experts
    j = torch.arange(T, device=ids.device)
    e = torch.searchsorted(ends, j, right=True)
    used = e < n_experts
    ec = e.clamp(max=n_experts - 1)
    lo = first[ec] + (j - (ends[ec] - tiles[ec])) * block
    hi = torch.minimum(lo + block, first[ec] + counts[ec])
    return order, torch.where(used, ec, -1), lo, hi
