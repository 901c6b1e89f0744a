"""Manifold-constrained hyper-connections (mHC): pre (collapse + weights), post (expand + mix), head."""

from __future__ import annotations

import torch

from .norm import rms_norm


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb: [..., n, n] positive. Column-normalise once, then (iters-1) x (rows, columns)."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def mhc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            iters: int, hc_eps: float, norm_eps: float):
    """streams: [S, n, d]; fn: [(2+n)*n, n*d]; base: [(2+n)*n]; scale: [3].

    Returns (x [S, d] block input, post [S, n] float32, comb [S, n, n] float32).
    """
    S, n, d = streams.shape
    flat = rms_norm(streams.reshape(S, n * d).float(), None, norm_eps)
    mix = flat @ fn.float().t()
    pre_m, post_m, comb_m = mix.split([n, n, n * n], -1)
    b = base.float()
    pre_b, post_b, comb_b = b.split([n, n, n * n])
    sc = scale.float()
    pre = torch.sigmoid(pre_m * sc[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_m * sc[1] + post_b)
    comb = torch.softmax((comb_m * sc[2] + comb_b).reshape(S, n, n), -1) + hc_eps
    comb = sinkhorn(comb, iters, hc_eps)
    x = (pre.unsqueeze(-1) * streams).sum(1).to(streams.dtype)
    return x, post, comb


def mhc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """new_stream_j = post_j * out + sum_i comb[i, j] * stream_i.  out: [S, d] -> [S, n, d]."""
    dt = streams.dtype
    mixed = torch.einsum("sij,sid->sjd", comb.to(dt), streams)
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(1) + mixed


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse: streams [S, n, d], fn [n, n*d], base [n], scale [1] -> [S, d]."""
    S, n, d = streams.shape
    flat = rms_norm(streams.reshape(S, n * d).float(), None, norm_eps)
    pre = torch.sigmoid(flat @ fn.float().t() * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * streams).sum(1).to(streams.dtype)
