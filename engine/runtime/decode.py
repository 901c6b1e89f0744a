"""The decode runner: one token per call through ``Model.decode_forward``, captured once in a CUDA
graph and replayed at every later position.

The step's inputs (token id, position) live in two device buffers that are refilled before each
replay; the logits come back in a fixed buffer (copied out, so a caller may keep them). The graph
is captured at the first step: warm-up runs compile the kernels first, with the cache state they
touch saved and restored around them, so the real step sees the cache as it was. Only the cache's
block table changes between steps (``CacheManager.prepare`` fills it in place), and the graph reads
it on the device. On a CPU (or with ``graph=False``) the same static step runs eagerly.
"""

from __future__ import annotations

import torch


def capture_graph(body, undo=lambda: None, warmup: int = 2) -> tuple:
    """Capture ``body()`` (device work on static buffers) in a CUDA graph, after ``warmup`` runs on a
    side stream (kernels compile and autotune outside the capture; each run followed by ``undo()``,
    which puts back the cache state it wrote). The one capture sequence of the engine: the decode
    step, the MTP verify / draft steps and the benchmarks' head timing all use it.
    -> (replay: a callable, the graph's output tensors, overwritten by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
            undo()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph.replay, out


class DecodeRunner:
    """Runs decode steps of one cache slot. handles: the slot's per-layer cache handles."""

    WARMUP = 2

    def __init__(self, model, handles, graph: bool | None = None):
        self.model, self.handles = model, handles
        dev = model.device
        self.graph_enabled = dev.type == "cuda" if graph is None else graph
        if self.graph_enabled and dev.type != "cuda":
            raise ValueError("CUDA-graph decode needs a CUDA device")
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.replay = None  # the captured step (capture_graph), made at the first step
        self.logits: torch.Tensor | None = None

    def _state(self) -> list[torch.Tensor]:
        """The per-slot cache tensors a step rewrites without being idempotent (compressor series a
        and tails), which warm-up runs must leave as they found them."""
        return [t for h in self.handles for t in h.state_tensors()]

    def _run(self) -> torch.Tensor:
        return self.model.decode_forward(self.token, self.pos, self.handles)

    def _capture(self) -> None:
        saved = [t.clone() for t in self._state()]

        def undo():
            for t, s in zip(self._state(), saved):
                t.copy_(s)

        self.replay, self.logits = capture_graph(self._run, undo, self.WARMUP)

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Decode ``token`` at position ``pos`` (= tokens already cached; the caller has run
        ``prepare`` for it). -> logits [vocab] float32, a fresh tensor."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        if not self.graph_enabled:
            return self._run()[0]
        if self.replay is None:
            self._capture()
        self.replay()
        return self.logits[0].clone()
