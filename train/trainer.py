"""Training the engine's own model (exact mode) on packed token sequences.

The forward is ``engine.model.Model.forward`` itself, run over a whole training sequence from
position 0 with ``SequenceHandle`` standing in for the KV cache: it keeps the compressed entries and
indexer keys that the sequence's own forward appends (as autograd tensors) and reports an empty
sliding-window ring and empty compressor tails, which is the cache state at position 0. Everything
else (mHC, attention with sink, compressors, indexer top-k, hash and score routing, MTP) is the
inference code, so the trained weights are exactly what ``dsv4 chat`` runs.

Quantisation-aware training: in the last part of training the weights pass through their published
storage formats on the forward (FP8 e4m3 with 128x128 ue8m0 block scales for the dense projections,
MXFP4 for routed experts, BF16 for embeddings, head and small linears) with a straight-through
gradient, so the shipped published-layout checkpoint is the model that was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.engine.checkpoint.encode import stored_values
from dsv4.engine.checkpoint.formats import published_format
from dsv4.engine.model.context import ChunkHandle
from dsv4.engine.model.model import Model
from dsv4.engine.model.weights import build_weights


class SequenceHandle(ChunkHandle):
    """The chunk forward's cache interface (engine/model/context.ChunkHandle) for one forward over a
    full sequence starting at position 0 (no grad cut)."""

    def __init__(self, layer, device):
        self.layer, self.device = layer, device
        self.entries = self.index_keys = None

    def read_window(self):
        # a 1-D empty tensor is skipped by torch.cat, whatever the other operand's width
        return torch.empty(0, device=self.device), torch.empty(0, dtype=torch.long, device=self.device)

    def write_window(self, x, start):
        pass

    def tail(self, name="main"):
        e = torch.empty(0, device=self.device)
        return e, e

    def set_tail(self, c, z, name="main"):
        pass

    def prev_a(self, name="main"):
        return None

    def set_prev_a(self, c, z, name="main"):
        pass

    def append_entries(self, first, x):
        assert first == 0, "SequenceHandle runs one sequence from position 0"
        self.entries = x

    def read_entries(self, count=None):
        return self.entries[:count]

    def append_index_keys(self, first, x):
        assert first == 0
        self.index_keys = x

    def read_index_keys(self, count=None):
        return self.index_keys[:count]


@dataclass
class LayerInfo:
    ratio: int


def sequence_handles(model: Model, device) -> tuple[list, SequenceHandle]:
    layers = [SequenceHandle(LayerInfo(spec.ratio), device) for spec in model.specs]
    mtp = SequenceHandle(LayerInfo(model.cfg.mtp_layer(0).ratio), device)
    return layers, mtp


def stored_roundtrip(name: str, t: torch.Tensor) -> torch.Tensor:
    """t [out, in] -> the float32 values its published storage format holds: the checkpoint
    writer's encoder and decoder (engine/checkpoint/encode.py), so training sees what is shipped."""
    return stored_values(name, t, published_format(name))


def fake_quant(name: str, t: torch.Tensor) -> torch.Tensor:
    """t through its published storage format and back, with a straight-through gradient."""
    if t.dim() != 2 or published_format(name) not in ("fp8", "mxfp4", "bf16"):
        return t
    with torch.no_grad():
        q = stored_roundtrip(name, t.detach().float()).to(t.dtype)
    return t + (q - t).detach()


def weights_for_step(params: dict, fixed: dict, qat: bool, device) -> dict:
    """Published name -> tensor (parameters, fake-quantised when ``qat``) -> the engine's weight dict."""
    tensors = {n: (fake_quant(n, p) if qat else p) for n, p in params.items()}
    tensors.update(fixed)
    return build_weights(tensors, device)


def lm_losses(model: Model, ids: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [S] -> (main next-token loss, MTP loss) averaged over tokens (MTP predicts t+2)."""
    layers, mtp = sequence_handles(model, model.device)
    logits, streams = model.forward(ids, layers, 0, return_streams=True)
    main = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    if not mtp_weight or not model.has_mtp:
        return main, torch.zeros((), device=main.device)
    mlog = model.mtp_forward(streams[:-1], ids[1:], mtp, 0)
    return main, torch.nn.functional.cross_entropy(mlog[:-1], ids[2:])


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


class Capture:
    """Records, during one training forward, what the auxiliary objectives need from inside the
    inference code: the indexer's scores and visibility (per CSA layer), the attention's queries and
    keys, and the experts each score-routed layer picked (keyed by its gate-bias tensor).

    Used as a context manager: it observes those ops through ``kernels.dispatch.observing`` (the
    values are the ones the forward computed; nothing is replaced)."""

    def __init__(self):
        self.index, self.attn, self.routes = [], [], []
        self._observing = None

    def __enter__(self):
        from dsv4.kernels import dispatch

        def indexer_topk(args, out):
            scores, visible, _ = args
            self.index.append((len(self.attn), scores, visible))

        def sparse_mqa_attention(args, out):
            q, kv, _, _, scale = args
            self.attn.append((q, kv, scale))

        def router_topk(args, out):
            self.routes.append((args[1], out[1]))  # (gate bias, expert ids)

        self._observing = dispatch.observing({"indexer_topk": indexer_topk, "sparse_mqa_attention": sparse_mqa_attention,
                                              "router_topk": router_topk})
        self._observing.__enter__()
        return self

    def __exit__(self, *exc):
        self._observing.__exit__(*exc)

    def indexer_loss(self) -> torch.Tensor:
        """KL(attention's distribution over the visible compressed entries || indexer's), per query.

        The target is the main attention's softmax of q . entry (heads averaged, detached), computed
        over every causally visible entry; the indexer learns to rank the entries attention wants,
        which is what its top-k selection then serves."""
        losses = []
        for attn_i, scores, visible in self.index:
            q, kv, scale = self.attn[attn_i]
            n = scores.shape[1]
            if n == 0:
                continue
            rows = visible.any(1)
            if not bool(rows.any()):
                continue
            with torch.no_grad():
                ent = kv[-n:].float()
                logits = torch.einsum("shd,nd->shn", q.float(), ent) * scale
                logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
                target = torch.softmax(logits, -1).mean(1)[rows]  # [R, n]
            logq = torch.log_softmax(scores.float().masked_fill(~visible, float("-inf")), -1)[rows]
            kl = (target * (torch.log(target.clamp_min(1e-12)) - logq.clamp_min(-1e4))).sum(-1)
            losses.append(kl.mean())
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def balance_bias(self, n_experts: int, rate: float) -> None:
        """Auxiliary-loss-free load balancing: nudge each score-routed layer's gate bias up for
        under-loaded experts and down for over-loaded ones (sign of the load error, step ``rate``)."""
        with torch.no_grad():
            for bias, ids in self.routes:
                load = torch.bincount(ids.reshape(-1), minlength=n_experts).float()
                bias += rate * torch.sign(load.mean() - load)
