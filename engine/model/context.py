"""What one layer's forward reads besides its input: ``LayerContext``, and the cache interface the
chunk forward needs (``ChunkHandle``).

A context is made per layer per forward by ``Model``; ``block``, ``attention``, ``decode_attention``
and ``moe`` take (input, ctx). The chunk forward (prefill, training) runs at a host-known ``start``;
the static decode step (the one captured in a CUDA graph) has ``start=None`` and reads its position
from the device tensor ``positions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from dsv4.kernels import ExpertSet
from dsv4.kernels.formats import Precision

from .config import DSV4Config, LayerSpec
from .rope import RopeTables, StepRope


class ChunkHandle(Protocol):
    """The cache state of one layer of one request, as the chunk forward reads and writes it.

    cache/handles.LayerHandle implements it over the paged cache (and adds the fixed-shape views
    the static decode step reads); train/trainer.SequenceHandle implements it for one training
    sequence from position 0. Shapes: window rows [W', D] with their positions [W'] (int64, -1 for
    empty slots); compressor tails [k, width] float32; entries [n, D]; indexer keys [n, Di]."""

    def read_window(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def write_window(self, x: torch.Tensor, start: int) -> None: ...

    def tail(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor]: ...

    def set_tail(self, c: torch.Tensor, z: torch.Tensor, name: str = "main") -> None: ...

    def prev_a(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def set_prev_a(self, c: torch.Tensor, z: torch.Tensor, name: str = "main") -> None: ...

    def read_entries(self, count: int | None = None) -> torch.Tensor: ...

    def append_entries(self, first: int, x: torch.Tensor) -> None: ...

    def read_index_keys(self, count: int | None = None) -> torch.Tensor: ...

    def append_index_keys(self, first: int, x: torch.Tensor) -> None: ...


class Collectives(Protocol):
    """What the model math asks of the ranks it is split over (engine/runtime/parallel/ implements it
    over torch.distributed): ``all_reduce`` sums a sub-layer's partial output [S, d] over the ranks
    (same shape, same dtype, the same values on every rank); ``gather_vocab`` turns this rank's
    slice of the logits [S, V_rank] into the whole vocabulary [S, vocab] (identity when the head is
    not split)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor: ...


class OneRank:
    """The collectives of a model that runs whole on one rank: identities."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


ONE_RANK = OneRank()


@dataclass
class LayerContext:
    """One layer's forward. prefix: the layer's weight prefix ("layers.i" or "mtp.0"); positions:
    [S] int64 absolute positions on the model's device; token_ids: [S] int64 (hash routing);
    rope: the model's RopeTables (chunk forward) or the step's StepRope (static decode step);
    start: the first position as a host int (chunk forward), None in the static decode step;
    experts: the layer's routed ExpertSet (engine/model/moe.layer_experts); comm: the collectives
    that turn this rank's partial sub-layer outputs into the whole ones (ONE_RANK: identities). On
    one rank of several, cfg is the rank-local config (its heads and output groups) and w holds
    this rank's slices (engine/runtime/parallel/layout.py). before_token: in a static step of
    several tokens, called with i before the i-th token (i >= 1) writes this layer's cache (MTP's
    batched verify saves what the draft will overwrite: engine/runtime/speculative.py)."""

    cfg: DSV4Config
    w: Mapping
    prefix: str
    spec: LayerSpec
    handle: ChunkHandle
    positions: torch.Tensor
    token_ids: torch.Tensor
    rope: RopeTables | StepRope
    precision: Precision
    start: int | None
    experts: ExpertSet
    comm: Collectives = ONE_RANK
    before_token: Callable[[int], None] | None = None

    @property
    def static(self) -> bool:
        """The fixed-shape decode step (CUDA-graph capturable), not a chunk forward."""
        return self.start is None

    @property
    def faithful(self) -> bool:
        return self.precision is Precision.FAITHFUL
