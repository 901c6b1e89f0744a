"""Undoing one token's cache writes exactly (speculative decoding's rejected draft).

A token at position t writes, in each layer of one slot (whether through the chunk forward or the
static decode step):
- the window ring row t % W (every store tensor of the ring: FP8 values, scales, BF16 RoPE, or f32);
- the compressor state (tails, and for CSA the series-a rows of the main and indexer compressors);
- for compressed layers (ratio m), the pool row of entry t // m (its partial or final value) and,
  for CSA, the same row of the indexer-key pool.
``TokenCheckpoint.save(pos)`` copies exactly those locations (pos: device tensor [1], the token's
position, read on the device: no host sync, fixed shapes, so it can sit inside a captured CUDA
graph) and ``restore()`` writes them back, bit for bit. The copies are preallocated once.
``locate(pos)`` then ``save_layer(i)`` per layer does the same one layer at a time (inside a step
of several tokens, between the tokens' writes to that layer).

``PositionedHandle`` is a LayerHandle whose ``seq_len`` the caller sets: the chunk forward reads a
layer's "tokens before this call" from it, so a token can be run at position t before the manager
commits t tokens (and rolled back without an uncommit).
"""

from __future__ import annotations

import torch

from dsv4.cache.handles import LayerHandle


class PositionedHandle(LayerHandle):
    """A LayerHandle over the same storage whose ``seq_len`` is ``self.at`` (set by the caller)."""

    def __init__(self, mgr, layer, slot: int):
        super().__init__(mgr, layer, slot)
        self.at = 0

    @property
    def seq_len(self) -> int:
        return self.at


def positioned_handles(mgr, slot: int) -> list[PositionedHandle]:
    """One PositionedHandle per cache layer of ``slot`` (main layers, then the MTP layer if present)."""
    return [PositionedHandle(mgr, ly, slot) for ly in mgr.schema.layers]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """One-byte formats (FP8 values, ue8m0 scales, FP4 codes) as uint8 views: the bytes are what is
    saved, and index_copy_ has no FP8 kernel on every device."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


class TokenCheckpoint:
    """Saved copies of what one token writes in the given layers' cache (see the module docstring).

    handles: LayerHandles of one slot. Their storage (ring_store, state_tensors, entry_store,
    index_store: views of the cache's preallocated tensors, written in place) is looked up once,
    here, with the copies' buffers. Per layer a save is one gather (index_select into its buffer)
    per row tensor and one multi-tensor copy for the compressor state; a restore the scatters and
    one multi-tensor copy for every layer's state."""

    def __init__(self, handles):
        self.handles = list(handles)
        if len({h.layer.window for h in self.handles}) > 1:
            raise ValueError("TokenCheckpoint: the layers' window rings differ in size")
        dev = self.handles[0].mgr.device if self.handles else torch.device("cpu")
        self.ring_row = torch.zeros(1, dtype=torch.long, device=dev)
        self.entry_row = {}  # ratio -> [1] int64 pool row of the token's entry
        self._by_ratio = {}  # ratio -> one handle of that ratio (one block table per slot)
        self.rows: list[list[tuple]] = []  # per handle: (cache tensor, its row index [1], saved row)
        self.states: list[tuple[list, list]] = []  # per handle: (state tensors, their copies)
        for h in self.handles:
            rows = [(_raw(v), self.ring_row) for v in h.ring_store().values()]
            if h.layer.ratio:
                row = self.entry_row.setdefault(h.layer.ratio, torch.zeros(1, dtype=torch.long, device=dev))
                self._by_ratio.setdefault(h.layer.ratio, h)
                rows += [(_raw(v), row) for v in h.entry_store().values()]
                if h.layer.overlap:
                    rows += [(_raw(v), row) for v in h.index_store().values()]
            self.rows.append([(t, r, torch.empty_like(t[:1])) for t, r in rows])
            state = h.state_tensors()
            self.states.append((state, [torch.empty_like(t) for t in state]))

    def locate(self, pos: torch.Tensor) -> None:
        """Find the rows a token at device position pos [1] int64 writes (the window ring row and,
        per ratio, its entry's pool row). The slot's blocks for pos must be allocated
        (CacheManager.prepare)."""
        if self.handles:
            W = self.handles[0].layer.window
            self.ring_row.copy_(torch.remainder(pos, W))
        for ratio, row in self.entry_row.items():
            h = self._by_ratio[ratio]
            epb = h.layer.entries_per_block
            e = pos // ratio
            row.copy_(h.block_row().long()[e // epb].clamp(min=0) * epb + e % epb)

    def save_layer(self, i: int) -> None:
        """Copy what the located token will write in the i-th handle's layer (after ``locate``);
        MTP's batched verify saves each layer just before the draft writes it."""
        for t, row, buf in self.rows[i]:
            torch.index_select(t, 0, row, out=buf)
        state, bufs = self.states[i]
        if state:
            torch._foreach_copy_(bufs, state)

    def save(self, pos: torch.Tensor) -> None:
        """Copy what a token at device position pos [1] int64 will write, in every layer."""
        self.locate(pos)
        for i in range(len(self.handles)):
            self.save_layer(i)

    def restore(self) -> None:
        """Write the saved copies back (the cache as it was before the token)."""
        for rows in self.rows:
            for t, row, buf in rows:
                t.index_copy_(0, row, buf)
        state = [t for s, _ in self.states for t in s]
        if state:
            torch._foreach_copy_(state, [b for _, bufs in self.states for b in bufs])
