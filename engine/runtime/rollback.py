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

    handles: LayerHandles of one slot (their storage is read through ring_store, state_tensors,
    entry_store, index_store and block_row; the copies' buffers are allocated here, once)."""

    def __init__(self, handles):
        self.handles = list(handles)
        if len({h.layer.window for h in self.handles}) > 1:
            raise ValueError("TokenCheckpoint: the layers' window rings differ in size")
        dev = self.handles[0].mgr.device if self.handles else torch.device("cpu")
        self.ring_row = torch.zeros(1, dtype=torch.long, device=dev)
        self.entry_row = {}  # ratio -> [1] int64 pool row of the token's entry
        self._by_ratio = {}  # ratio -> one handle of that ratio (one block table per slot)
        self.saved: list[tuple] = []  # (kind, handle index, key, buffer)
        for i, h in enumerate(self.handles):
            for k, v in h.ring_store().items():
                self.saved.append(("ring", i, k, torch.empty_like(_raw(v[:1]))))
            for j, t in enumerate(h.state_tensors()):
                self.saved.append(("state", i, j, torch.empty_like(t)))
            if h.layer.ratio:
                self.entry_row.setdefault(h.layer.ratio, torch.zeros(1, dtype=torch.long, device=dev))
                self._by_ratio.setdefault(h.layer.ratio, h)
                for k, v in h.entry_store().items():
                    self.saved.append(("entry", i, k, torch.empty_like(_raw(v[:1]))))
                if h.layer.overlap:
                    for k, v in h.index_store().items():
                        self.saved.append(("index", i, k, torch.empty_like(_raw(v[:1]))))

    def _target(self, kind: str, i: int, key):
        """(tensor, row index [1] or None for a whole-tensor copy) of one saved location."""
        h = self.handles[i]
        if kind == "ring":
            return _raw(h.ring_store()[key]), self.ring_row
        if kind == "state":
            return h.state_tensors()[key], None
        store = h.entry_store() if kind == "entry" else h.index_store()
        return _raw(store[key]), self.entry_row[h.layer.ratio]

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
        for kind, j, key, buf in self.saved:
            if j == i:
                self._copy_out(kind, j, key, buf)

    def save(self, pos: torch.Tensor) -> None:
        """Copy what a token at device position pos [1] int64 will write, in every layer."""
        self.locate(pos)
        for kind, i, key, buf in self.saved:
            self._copy_out(kind, i, key, buf)

    def _copy_out(self, kind: str, i: int, key, buf: torch.Tensor) -> None:
        t, row = self._target(kind, i, key)
        buf.copy_(t if row is None else t.index_select(0, row))

    def restore(self) -> None:
        """Write the saved copies back (the cache as it was before the token)."""
        for kind, i, key, buf in self.saved:
            t, row = self._target(kind, i, key)
            if row is None:
                t.copy_(buf)
            else:
                t.index_copy_(0, row, buf)
