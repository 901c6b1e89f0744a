"""Triton kernels for the MoE routers on a decode token: sqrt(softplus) scores after the gate GEMV,
and the top-k (score + bias, lower expert id first on ties) or hash-table pick, with the chosen
scores renormalised, in one launch each (instead of a sort and ~8 small launches)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.linear import QWeight
from . import pdl
from .linear import gemv


@triton.jit
def _sqrt_softplus(l_ptr, out_ptr, E, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    e = tl.arange(0, BLOCK)
    m = e < E
    x = tl.load(l_ptr + e, mask=m, other=0.0)
    u = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))  # accurate log(1 + u) for small u
    sp = tl.where(x > 20.0, x, log1p)  # torch's softplus threshold
    tl.store(out_ptr + e, tl.sqrt(sp), mask=m)


@triton.jit
def _pick(s_ptr, b_ptr, tid_ptr, tok_ptr, w_ptr, ids_ptr, E, scale, K: tl.constexpr, KP: tl.constexpr,
          HASH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """K experts of one token -> ids [K] int64 and weights [K] = chosen scores / their sum * scale
    (KP = K rounded up to a power of two)."""
    pdl.wait(PDL)
    e = tl.arange(0, BLOCK)
    m = e < E
    s = tl.load(s_ptr + e, mask=m, other=0.0)
    k = tl.arange(0, KP)
    km = k < K
    if HASH:
        tok = tl.load(tok_ptr).to(tl.int64)
        ids = tl.load(tid_ptr + tok * K + k, mask=km, other=-1).to(tl.int32)
    else:
        sel = tl.where(m, s + tl.load(b_ptr + e, mask=m, other=0.0), float("-inf"))
        ids = tl.full([KP], -1, tl.int32)
        for j in range(0, K):
            i = tl.argmax(sel, 0, tie_break_left=True)
            ids = tl.where(k == j, i, ids)
            sel = tl.where(e == i, float("-inf"), sel)
    chosen = tl.sum(tl.where(e[None, :] == ids[:, None], s[None, :], 0.0), 1)
    tl.store(w_ptr + k, chosen / (tl.sum(chosen, 0) + 1e-20) * scale, mask=km)
    tl.store(ids_ptr + k, ids.to(tl.int64), mask=km)


def router_scores_supported(x: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """One token; no autograd."""
    return x.shape[0] == 1 and not (x.requires_grad or gate_weight.requires_grad)


def router_topk_supported(scores: torch.Tensor, *args) -> bool:
    return scores.shape[0] == 1 and not scores.requires_grad


def hash_route_supported(scores: torch.Tensor, tid2eid: torch.Tensor, *args) -> bool:
    return scores.shape[0] == 1 and not scores.requires_grad and tid2eid.is_contiguous()


def router_scores_triton(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """kernels.router_scores for one CUDA token: the gate GEMV, then sqrt(softplus) in one launch."""
    E = gate_weight.shape[0]
    logits = gemv(x.float(), QWeight("dense", gate_weight))
    out = torch.empty_like(logits)
    _sqrt_softplus[(1,)](logits, out, E, BLOCK=triton.next_power_of_2(E), **pdl.launch(logits.device))
    return out


def _launch(scores, bias, tid2eid, token_ids, k: int, scale: float, hash_: bool):
    E = scores.shape[1]
    w = torch.empty((1, k), device=scores.device, dtype=torch.float32)
    ids = torch.empty((1, k), device=scores.device, dtype=torch.long)
    s = scores.float().contiguous()
    _pick[(1,)](s, bias if bias is not None else s, tid2eid if tid2eid is not None else s,
                token_ids if token_ids is not None else s, w, ids, E, float(scale), K=k,
                KP=triton.next_power_of_2(k), HASH=hash_,
                BLOCK=triton.next_power_of_2(E), **pdl.launch(scores.device))
    return w, ids


def router_topk_triton(scores: torch.Tensor, bias: torch.Tensor, k: int, scale: float):
    """kernels.router_topk for one CUDA token."""
    return _launch(scores, bias.float().contiguous(), None, None, k, scale, False)


def hash_route_triton(scores: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor, scale: float):
    """kernels.hash_route for one CUDA token."""
    k = tid2eid.shape[1]
    return _launch(scores, None, tid2eid, token_ids.reshape(-1), k, scale, True)
