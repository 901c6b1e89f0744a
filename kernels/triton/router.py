"""Triton kernels for the MoE routers: sqrt(softplus) scores after the gate product, and the top-k
(score + bias, lower expert id first on ties) or hash-table pick, with the chosen scores
renormalised, in one launch each (instead of a sort and ~8 small launches).

One decode token, or up to MAX_ROWS (16) rows: the gate GEMV. A prefill chunk of more rows: the gate
product as the prefill GEMM (kernels/triton/prefill_linear.py: bf16 gate on the tensor cores,
float32 rows split into three bf16 parts, float32 accuracy against the reference's float32 matmul)
into float32 logits. Then sqrt(softplus) over all S x E of them, and the top-k of TILE["pick_rows"]
rows per program (K rounds of a row-wise argmax) instead of a stable sort of every row. H100, an 8k
prefill of 4 Flash layers: no faster than torch's float32 SGEMM and sort (128.6 ms either way,
bench/results/h100_compare_router_grouped.txt); bench/tune_prefill.py --only router / dense time the
top-k's and the GEMM's tiles."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.reference.linear import QWeight
from . import pdl
from .linear import MAX_ROWS, gemv
from .prefill_linear import gemm

# A chunk's top-k: rows per program, warps; bench/tune_prefill.py --only router times the alternatives.
TILE = {"pick_rows": 16, "pick_warps": 4}


@triton.jit
def _sqrt_softplus(l_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[i] = sqrt(softplus(l[i])) for the n float32 values of l, BLOCK per program."""
    pdl.wait(PDL)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
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


@triton.jit
def _pick_rows(s_ptr, b_ptr, w_ptr, ids_ptr, S, E, scale, K: tl.constexpr, KP: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """The dense router's pick for BLOCK_S rows of scores [S, E] (float32): ids [S, K] int64 = the K
    largest score + bias, in order, the lower id first on ties; weights [S, K] = the chosen scores /
    their sum * scale."""
    rs = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    e = tl.arange(0, BLOCK)
    m = (rs < S)[:, None] & (e < E)[None, :]
    s = tl.load(s_ptr + rs[:, None] * E + e[None, :], mask=m, other=0.0)
    sel = tl.where(m, s + tl.load(b_ptr + e, mask=e < E, other=0.0)[None, :], float("-inf"))
    k = tl.arange(0, KP)
    ids = tl.full([BLOCK_S, KP], -1, tl.int32)
    chosen = tl.zeros([BLOCK_S, KP], tl.float32)
    for j in tl.static_range(0, K):
        i = tl.argmax(sel, 1, tie_break_left=True)
        hit = e[None, :] == i[:, None]
        ids = tl.where(k[None, :] == j, i[:, None], ids)
        chosen = tl.where(k[None, :] == j, tl.sum(tl.where(hit, s, 0.0), 1)[:, None], chosen)
        sel = tl.where(hit, float("-inf"), sel)
    w = chosen / (tl.sum(chosen, 1)[:, None] + 1e-20) * scale
    out = rs[:, None] * K + k[None, :]
    om = (rs < S)[:, None] & (k < K)[None, :]
    tl.store(w_ptr + out, w, mask=om)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=om)


def router_scores_supported(x: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """One token, or a chunk of float32 / bf16 rows with a bf16 gate (the chunk GEMM); no autograd."""
    if x.requires_grad or gate_weight.requires_grad:
        return False
    return x.shape[0] == 1 or (x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)
                               and gate_weight.dtype == torch.bfloat16)


def router_topk_supported(scores: torch.Tensor, *args) -> bool:
    """One token, or a chunk of float32 scores with at most 1024 experts (one row per program tile)."""
    return not scores.requires_grad and (scores.shape[0] == 1 or (
        scores.dim() == 2 and scores.dtype == torch.float32 and scores.shape[1] <= 1024))


def hash_route_supported(scores: torch.Tensor, tid2eid: torch.Tensor, *args) -> bool:
    return scores.shape[0] == 1 and not scores.requires_grad and tid2eid.is_contiguous()


def _chunk_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """x [S, d] . gate^T -> float32 [S, E] through the prefill GEMM (bf16 gate; float32 x in three
    bf16 parts; its tile is prefill_linear.TILE, timed on the gate's shape by tune_prefill --only dense)."""
    y = torch.empty((x.shape[0], gate_weight.shape[0]), device=x.device, dtype=torch.float32)
    return gemm(x.contiguous(), QWeight("dense", gate_weight), out=y)


def router_scores_triton(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """kernels.router_scores on CUDA: one token through the gate GEMV, a chunk (more than MAX_ROWS
    rows) through the prefill GEMM (a few rows: the GEMV); then sqrt(softplus) in one launch."""
    if x.shape[0] > MAX_ROWS:
        logits = _chunk_logits(x, gate_weight)
    else:
        logits = gemv(x.float(), QWeight("dense", gate_weight))
    out = torch.empty_like(logits)
    n = logits.numel()
    block = min(triton.next_power_of_2(n), 1024)
    _sqrt_softplus[(triton.cdiv(n, block),)](logits, out, n, BLOCK=block, **pdl.launch(logits.device))
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
    """kernels.router_topk on CUDA: one token (one program, PDL) or a chunk (TILE["pick_rows"] rows a program)."""
    if scores.shape[0] == 1:
        return _launch(scores, bias.float().contiguous(), None, None, k, scale, False)
    S, E = scores.shape
    w = torch.empty((S, k), device=scores.device, dtype=torch.float32)
    ids = torch.empty((S, k), device=scores.device, dtype=torch.long)
    rows = TILE["pick_rows"]
    _pick_rows[(triton.cdiv(S, rows),)](scores.contiguous(), bias.float().contiguous(), w, ids, S, E, float(scale),
                                       K=k, KP=triton.next_power_of_2(k), BLOCK_S=rows,
                                       BLOCK=triton.next_power_of_2(E), num_warps=TILE["pick_warps"])
    return w, ids


def hash_route_triton(scores: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor, scale: float):
    """kernels.hash_route for one CUDA token."""
    k = tid2eid.shape[1]
    return _launch(scores, None, tid2eid, token_ids.reshape(-1), k, scale, True)
