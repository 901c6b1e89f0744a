"""Typed per-layer views of one slot's cache state, for one forward call.

Handles are built once per slot when the manager is created; acquiring them (``manager.handles``)
returns the prebuilt objects and allocates nothing. Each handle reads the slot's committed token
count (``seq_len``) from the manager; the engine reads state first, then writes, then the manager
commits the new tokens once per forward.
"""

from __future__ import annotations

import torch

from .schema import LayerSchema


class LayerHandle:
    def __init__(self, mgr, layer: LayerSchema, slot: int):
        self.mgr, self.layer, self.slot = mgr, layer, slot
        st = mgr.layer_state[layer.index]
        self._window = st["window"]
        self._pool = st.get("pool")
        self._ipool = st.get("ipool")
        self._state = {k: v[slot] for k, v in st.items() if isinstance(v, torch.Tensor)}  # views, no copies
        self._ring_base = slot * layer.window

    def state_tensors(self) -> list[torch.Tensor]:
        """This slot's compressor state (tails, series a) as views, for callers that must save and
        restore it around a trial step (engine/decode.py's warm-up before graph capture)."""
        return list(self._state.values())

    # ----------------------------------------------------------------- basics
    @property
    def seq_len(self) -> int:
        """Tokens of this slot already in the cache (position of the next token)."""
        return self.mgr.seq_len(self.slot)

    @property
    def n_entries(self) -> int:
        """Compressed entries emitted so far (complete windows)."""
        return self.seq_len // self.layer.ratio if self.layer.ratio else 0

    # ----------------------------------------------------------------- window
    def read_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring contents before this call: (entries [W, D] float32, positions [W] int64, -1 = empty)."""
        W, n = self.layer.window, self.seq_len
        idx = torch.arange(W, device=self.mgr.device)
        pos = (n - 1) - torch.remainder(n - 1 - idx, W)
        pos = torch.where(pos >= 0, pos, torch.full_like(pos, -1))
        return self._window.read(slice(self._ring_base, self._ring_base + W)), pos

    def write_window(self, x: torch.Tensor, start: int) -> None:
        """Store the last min(S, W) of x [S, D] (positions start..start+S-1) into the ring."""
        W = self.layer.window
        S = x.shape[0]
        keep = min(S, W)
        pos = torch.arange(start + S - keep, start + S, device=x.device)
        self._window.write(self._ring_base + torch.remainder(pos, W), x[S - keep:])

    def ring_store(self) -> dict:
        """This slot's W ring rows as store tensors (kernels/entries.py): views, row j = slot j."""
        W = self.layer.window
        return {k: v[self._ring_base:self._ring_base + W] for k, v in self._window.tensors.items()}

    # ------------------------------------------------------------ compressor
    def tail(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor]:
        """Pending (C, Z) rows of the unfinished window: [seq_len % ratio, width] float32 views."""
        k = self.seq_len % self.layer.ratio
        p = "" if name == "main" else "i"
        return self._state[p + "tail_c"][:k], self._state[p + "tail_z"][:k]

    def set_tail(self, c: torch.Tensor, z: torch.Tensor, name: str = "main") -> None:
        p = "" if name == "main" else "i"
        self._state[p + "tail_c"][: c.shape[0]] = c
        self._state[p + "tail_z"][: z.shape[0]] = z

    def prev_a(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor] | None:
        """CSA: series a (C, Z) [ratio, D] of the last complete window, or None before the first."""
        if self.seq_len < self.layer.ratio:
            return None
        p = "" if name == "main" else "i"
        return self._state[p + "prev_c"], self._state[p + "prev_z"]

    def set_prev_a(self, c: torch.Tensor, z: torch.Tensor, name: str = "main") -> None:
        p = "" if name == "main" else "i"
        self._state[p + "prev_c"].copy_(c)
        self._state[p + "prev_z"].copy_(z)

    def full_tail(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor]:
        """All ratio-1 tail rows (C, Z) [ratio-1, width] float32 views, pending or stale (the
        captured decode step reads and writes them in place, kernels.compress_decode)."""
        p = "" if name == "main" else "i"
        return self._state[p + "tail_c"], self._state[p + "tail_z"]

    def prev_state(self, name: str = "main") -> tuple[torch.Tensor, torch.Tensor]:
        """CSA series-a buffers (C, Z) [ratio, D] as stored (meaningful once a window has closed)."""
        p = "" if name == "main" else "i"
        return self._state[p + "prev_c"], self._state[p + "prev_z"]

    # ------------------------------------------------------ compressed entries
    def entry_rows(self, first: int, count: int) -> torch.Tensor:
        """Pool rows [count] int64 of compressed entries first..first+count-1 (their blocks held),
        for reading them in their storage format (entry_store(), index_store())."""
        return self._rows(first, count, self.mgr.device)

    def _rows(self, first: int, count: int, device) -> torch.Tensor:
        epb = self.layer.entries_per_block
        if count and (first + count - 1) // epb >= self.mgr.blocks_held(self.slot):  # host-side: no device sync
            raise RuntimeError("compressed entry written past the slot's allocated blocks (call prepare first)")
        e = torch.arange(first, first + count, device=device)
        blocks = self.mgr.block_table[self.slot].to(device)[e // epb].long()
        return blocks * epb + e % epb

    def read_entries(self, count: int | None = None) -> torch.Tensor:
        """Compressed entries 0..count-1 as float32 [count, D] (default: all emitted)."""
        count = self.n_entries if count is None else count
        return self._pool.read(self._rows(0, count, self.mgr.device))

    def append_entries(self, first: int, x: torch.Tensor) -> None:
        """Store entries first..first+k-1 from x [k, D]."""
        if x.shape[0]:
            self._pool.write(self._rows(first, x.shape[0], self.mgr.device), x)

    def read_index_keys(self, count: int | None = None) -> torch.Tensor:
        count = self.n_entries if count is None else count
        return self._ipool.read(self._rows(0, count, self.mgr.device))

    def append_index_keys(self, first: int, x: torch.Tensor) -> None:
        if x.shape[0]:
            self._ipool.write(self._rows(first, x.shape[0], self.mgr.device), x)

    # ------------------------------------ fixed-size access (captured decode step)
    def block_row(self) -> torch.Tensor:
        """This slot's block table row [blocks_per_slot] int32 (device; -1: not allocated)."""
        return self.mgr.block_table[self.slot]

    def entry_capacity(self) -> int:
        return self.mgr.entry_capacity(self.layer.ratio)

    def entry_store(self) -> dict:
        """The compressed-entry pool's store tensors (all slots; rows from kernels.entry_rows)."""
        return self._pool.tensors

    def index_store(self) -> dict:
        return self._ipool.tensors

    def read_index_keys_at(self, rows: torch.Tensor) -> torch.Tensor:
        """Indexer keys at pool rows [k] (from kernels.entry_rows) as float32 [k, Di]."""
        return self._ipool.read(rows)

