"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min-p must be in [0, 1), got {self.min_p}")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k largest logits (ties at the threshold kept)."""
    if k <= 0 or k >= logits.numel():
        return torch.ones_like(logits, dtype=torch.bool)
    return logits >= torch.topk(logits, k).values[-1]


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest set of most likely tokens whose probability sums to >= p (always >= 1 token)."""
    if p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    sp, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sp, 0) - sp  # mass strictly before each token
    keep_sorted = before < p
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


def min_p_mask(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Tokens with probability >= min_p * max probability."""
    return probs >= min_p * probs.max()


class Sampler:
    def __init__(self, params: SamplingParams, seed: int | None = None):
        params.validate()
        self.params = params
        self.gen = torch.Generator()
        if seed is not None:
            self.gen.manual_seed(seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> token id."""
        p = self.params
        logits = logits.detach().float().cpu()
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        mask = top_k_mask(logits, p.top_k)
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, -1)
        mask = top_p_mask(probs, p.top_p) & min_p_mask(probs, p.min_p)
        probs = probs * mask
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.gen))
