"""Single-request generation: prefill (optionally chunked), decode one token at a time, reset.

All per-request state lives in a CacheManager slot; a Session only tracks which slot it owns.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from dsv4.cache import CacheManager, CacheSchema
from dsv4.kernels import dispatch

from .decode import DecodeRunner
from .generate import decode_tokens
from dsv4.engine.model.model import Model


class Session:
    """cuda_graph: decode steps through a captured CUDA graph (engine/decode.py). Default: on for a
    CUDA model unless the kernels are forced to the torch references (DSV4_KERNELS=reference)."""

    def __init__(self, model: Model, max_context: int | None = None, cache: CacheManager | None = None,
                 cuda_graph: bool | None = None):
        self.model = model
        cfg = model.cfg
        if cache is None:
            max_context = max_context or min(cfg.max_position_embeddings, 8192)
            cache = CacheManager(CacheSchema.from_config(cfg, model.mode), max_context, device=model.device)
        self.cache = cache
        self.slot = cache.admit_request()
        if cuda_graph is None:
            cuda_graph = model.device.type == "cuda" and dispatch.mode() != "reference"
        self.runner = DecodeRunner(model, cache.handles(self.slot), graph=True) if cuda_graph else None

    @property
    def seq_len(self) -> int:
        """Tokens already in this session's cache."""
        return self.cache.seq_len(self.slot)

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    def forward(self, token_ids, last_only: bool = False) -> torch.Tensor:
        """Append tokens to the context; returns their logits [S, vocab] ([1, vocab] if last_only)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        self.cache.prepare(self.slot, ids.numel())
        with torch.inference_mode():
            logits = self.model.forward(ids, self.cache.handles(self.slot), self.seq_len, last_only=last_only)
        self.cache.commit(self.slot, ids.numel())
        return logits

    def prefill(self, token_ids, chunk: int | None = None, last_only: bool = True) -> torch.Tensor:
        """Run a prompt in chunks of ``chunk`` tokens (default: all at once); returns the logits of
        the last token [vocab] (or of all tokens [S, vocab] with last_only=False)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        chunk = chunk or ids.numel()
        outs = [self.forward(ids[i:i + chunk], last_only=last_only) for i in range(0, ids.numel(), chunk)]
        return outs[-1][-1] if last_only else torch.cat(outs, 0)

    def step(self, token: int) -> torch.Tensor:
        """Decode one token; returns next-token logits [vocab]."""
        if self.runner is None:
            return self.forward([token])[-1]
        self.cache.prepare(self.slot, 1)
        logits = self.runner.step(int(token), self.seq_len)
        self.cache.commit(self.slot, 1)
        return logits

    def generate(self, prompt_ids, sample: Callable[[torch.Tensor], int], max_new_tokens: int,
                 stop_ids: set[int] | frozenset = frozenset(), chunk: int | None = None) -> Iterator[int]:
        """Prefill ``prompt_ids`` then yield sampled tokens until a stop id (yielded) or the limit.

        Stops early, without error, when the context is full (engine/runtime/generate.py's loop)."""
        logits = self.prefill(prompt_ids, chunk=chunk)
        for tok, _ in decode_tokens(self, logits, sample, max_new_tokens, stop_ids):
            yield tok

    def reset(self) -> None:
        """Forget the conversation; the slot stays reserved for the next one."""
        self.cache.reset_slot(self.slot)

    def close(self) -> None:
        self.cache.release_request(self.slot)
