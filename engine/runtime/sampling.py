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


# top-p looks at this many of the most likely tokens first (a partial sort: ~0.8 ms at a 129k
# vocabulary on one CPU core, against ~11 ms for the full sort it falls back to when they hold less
# than p of the mass, e.g. a flat distribution)
TOP_P_CANDIDATES = 1024


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest set of most likely tokens whose probability sums to >= p (always >= 1 token).
    probs: [vocab] float32."""
    if p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    n = probs.numel()
    sp, order = torch.topk(probs, min(TOP_P_CANDIDATES, n))  # descending
    mass = torch.cumsum(sp, 0)
    if sp.numel() < n and float(mass[-1]) < p:  # the set reaches past the candidates
        sp, order = torch.sort(probs, descending=True)
        mass = torch.cumsum(sp, 0)
    keep = (mass - sp) < p  # the mass strictly before each token (every later one is dropped)
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order] = keep
    return mask


def min_p_mask(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Tokens with probability >= min_p * max probability."""
    return probs >= min_p * probs.max()


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: logits [vocab] -> probs [vocab] float32 on the logits'
    device (a GPU's logits stay there: no copy of the vocabulary to the host), after temperature,
    top-k, top-p and min-p; temperature 0: one-hot at the argmax (greedy)."""
    logits = logits.detach().float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.numel()).float()
    logits = logits / params.temperature
    logits = logits.masked_fill(~top_k_mask(logits, params.top_k), float("-inf"))
    probs = torch.softmax(logits, -1)
    probs = probs * (top_p_mask(probs, params.top_p) & min_p_mask(probs, params.min_p))
    return probs / probs.sum()


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from probs [vocab] (>= 0, not necessarily normalised; a one-hot gives its index), on
    probs' device: by inverting the float64 cumulative sum at a uniform draw of ``gen`` (a CPU
    generator; ~0.3 ms at a 129k vocabulary on one CPU core, where torch.multinomial takes ~3.3 ms).
    A zero-probability token is never drawn."""
    cdf = torch.cumsum(probs.double(), 0)
    if not float(cdf[-1]) > 0:
        raise ValueError("no token has a positive probability to draw from")
    x = float(torch.rand((), dtype=torch.float64, generator=gen)) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64, device=cdf.device), right=True))
    if i >= probs.numel():  # x rounded up to the total: the last token with mass
        i = int(torch.nonzero(probs).max())
    return i


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
        """logits: [vocab] (any device: the work runs where they are) -> token id."""
        if self.params.temperature == 0:
            return int(torch.argmax(logits.detach()))
        return draw(distribution(logits, self.params), self.gen)
