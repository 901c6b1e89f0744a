"""The collectives the model math calls on one rank of several (engine/model/context.Collectives),
over a torch.distributed process group: NCCL on GPUs (capturable in the decode step's CUDA graph),
gloo on CPUs."""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankCollectives:
    """all_reduce: the sum of every rank's partial [S, d], reduced in float32 (the partials of a
    sub-layer are added once, as the single-rank GEMV adds its products in float32) and returned in
    the input's dtype. gather_vocab: every rank's logits slice [S, V_r] -> [S, vocab], where
    vocab_parts[r] = (start, stop) of rank r's rows of the head (uneven parts padded for the gather).
    group: the process group (None: the default one)."""

    def __init__(self, vocab_parts, group=None):
        self.group = group
        self.vocab_parts = [tuple(p) for p in vocab_parts]
        self.width = max(b - a for a, b in self.vocab_parts)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().clone() if x.dtype == torch.float32 else x.float()
        dist.all_reduce(y, group=self.group)
        return y.to(x.dtype)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        S, n = logits.shape
        part = logits if n == self.width else torch.nn.functional.pad(logits, (0, self.width - n))
        flat = torch.empty((len(self.vocab_parts) * S, self.width), dtype=part.dtype, device=part.device)
        _all_gather(flat, part.contiguous(), group=self.group)
        parts = flat.view(len(self.vocab_parts), S, self.width)
        return torch.cat([parts[r, :, : b - a] for r, (a, b) in enumerate(self.vocab_parts)], dim=-1)


class NoCollectives:
    """The collectives of one rank measured alone (engine/runtime/parallel/simulate.py): no
    communication; all_reduce returns this rank's partial, gather_vocab pads this rank's logits to
    the whole vocabulary with zeros (the same shapes as the real run)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(logits, (0, self.vocab - logits.shape[-1]))
