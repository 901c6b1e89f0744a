"""Triton kernel for kernels.indexer_scores over a tile of queries x entries (the prefill's streaming
Lightning Indexer, engine/model/attention._indexer_topk_tiles): score[t, s] = sum_h w[t, h] *
ReLU(q[t, h] . k[s]), one [BLOCK_Q, BLOCK_T] tile per program, the heads folded in registers, so the
[queries, heads, entries] intermediate of the reference never exists. Dots at float32 accuracy
(3xTF32; IEEE in the CPU interpreter) for float32 inputs, bf16 tensor-core dots for bf16 queries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _precision, interpreted

TILE = {"queries": 64, "keys": 64, "warps": 4}


@triton.jit
def _indexer_scores(q_ptr, k_ptr, w_ptr, out_ptr, S, T, H, DI: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr):
    qb, tb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    im, jm, dm = i < S, j < T, d < DI
    k = tl.load(k_ptr + j[:, None] * DI + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    if BF16:
        k = k.to(tl.bfloat16)
    else:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_T], tl.float32)
    for h in range(0, H):
        q = tl.load(q_ptr + (i[:, None] * H + h) * DI + d[None, :], mask=im[:, None] & dm[None, :], other=0.0)
        if BF16:
            s = tl.dot(q.to(tl.bfloat16), tl.trans(k))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision=PRECISION)
        wh = tl.load(w_ptr + i * H + h, mask=im, other=0.0).to(tl.float32)
        acc += tl.maximum(s, 0.0) * wh[:, None]
    tl.store(out_ptr + i[:, None] * T + j[None, :], acc, mask=im[:, None] & jm[None, :])


def indexer_scores_supported(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> bool:
    """A tile of queries [S, H, Di] against keys [T, Di] (S, T > 0); no autograd."""
    return (q.dim() == 3 and keys.dim() == 2 and q.shape[0] > 0 and keys.shape[0] > 0
            and not (q.requires_grad or keys.requires_grad or weights.requires_grad))


def indexer_scores_triton(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """kernels.indexer_scores in one launch: -> [S, T] float32."""
    S, H, DI = q.shape
    T = keys.shape[0]
    bf16 = q.dtype == torch.bfloat16 and not interpreted()
    out = torch.empty((S, T), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(S, TILE["queries"]), triton.cdiv(T, TILE["keys"]))
    _indexer_scores[grid](q.contiguous(), keys.contiguous(), weights.float().contiguous(), out, S, T, H, DI=DI,
                          BLOCK_Q=TILE["queries"], BLOCK_T=TILE["keys"], BLOCK_D=max(16, triton.next_power_of_2(DI)),
                          BF16=bf16, PRECISION=_precision(), num_warps=TILE["warps"])
    return out
