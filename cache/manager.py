"""The cache manager: owns schema, pools, per-slot state, the block allocator and the handles."""

from __future__ import annotations

import torch

from .allocator import BlockAllocator
from .handles import LayerHandle
from .pools import EntryStore
from .schema import BLOCK_TOKENS, CacheError, CacheSchema


class CacheManager:
    """All per-request attention state, sized up front and addressed by slot.

    schema: the per-layer layout; max_context: the most tokens one request may hold;
    num_slots: concurrent requests (1 for the product, more for tests); num_blocks: pool size in
    128-token blocks shared by all slots (default: enough for every slot at max_context).
    """

    def __init__(self, schema: CacheSchema, max_context: int, num_slots: int = 1,
                 num_blocks: int | None = None, device="cpu"):
        if max_context < 1:
            raise CacheError(f"max_context must be >= 1, got {max_context}")
        self.schema, self.max_context, self.num_slots = schema, max_context, num_slots
        self.device = torch.device(device)
        self.blocks_per_slot = schema.blocks_for(max_context)
        self.num_blocks = self.blocks_per_slot * num_slots if num_blocks is None else num_blocks
        self.allocator = BlockAllocator(self.num_blocks)
        self.block_table = torch.full((num_slots, self.blocks_per_slot), -1, dtype=torch.int32, device=self.device)
        self._blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self._seq = [0] * num_slots
        self._limit = [0] * num_slots
        self._reserved = [0] * num_slots
        self._active = [False] * num_slots
        self.layer_state = [self._make_layer(ly) for ly in schema.layers]
        self._handles = [[LayerHandle(self, ly, s) for ly in schema.layers] for s in range(num_slots)]

    def _make_layer(self, ly) -> dict:
        dev, S = self.device, self.num_slots
        st: dict = {"window": EntryStore(S * ly.window, ly.kv, dev)}
        if ly.ratio:
            st["pool"] = EntryStore(self.num_blocks * ly.entries_per_block, ly.kv, dev)
            z = lambda *shape: torch.zeros(S, *shape, dtype=torch.float32, device=dev)  # noqa: E731
            st["tail_c"], st["tail_z"] = z(ly.tail_rows, ly.tail_width), z(ly.tail_rows, ly.tail_width)
            if ly.overlap:
                D, Di = ly.kv.dim, ly.idx.dim
                st["prev_c"], st["prev_z"] = z(ly.ratio, D), z(ly.ratio, D)
                st["ipool"] = EntryStore(self.num_blocks * ly.entries_per_block, ly.idx, dev)
                st["itail_c"], st["itail_z"] = z(ly.tail_rows, 2 * Di), z(ly.tail_rows, 2 * Di)
                st["iprev_c"], st["iprev_z"] = z(ly.ratio, Di), z(ly.ratio, Di)
        return st

    # ------------------------------------------------------------- requests
    def admit_request(self, max_tokens: int | None = None) -> int:
        """Reserve a slot and the blocks for up to ``max_tokens`` tokens (default max_context)."""
        max_tokens = self.max_context if max_tokens is None else max_tokens
        if max_tokens > self.max_context:
            raise CacheError(f"request of {max_tokens} tokens exceeds max_context {self.max_context}")
        try:
            slot = self._active.index(False)
        except ValueError:
            raise CacheError(f"all {self.num_slots} cache slots are in use") from None
        need = self.schema.blocks_for(max_tokens)
        free = self.num_blocks - sum(self._reserved)
        if need > free:
            raise CacheError(
                f"KV cache budget exceeded: a {max_tokens}-token request needs {need} blocks, "
                f"{free} of {self.num_blocks} are free"
            )
        self._active[slot], self._reserved[slot], self._limit[slot] = True, need, max_tokens
        self._seq[slot] = 0
        return slot

    def release_request(self, slot: int) -> None:
        self.reset_slot(slot)
        self._active[slot], self._reserved[slot], self._limit[slot] = False, 0, 0

    def reset_slot(self, slot: int) -> None:
        """Forget the conversation in ``slot``: return its blocks, clear its state (admission kept)."""
        self._check(slot)
        for b in self._blocks[slot]:
            self.allocator.release(b)
        self._blocks[slot] = []
        self.block_table[slot].fill_(-1)
        self._seq[slot] = 0
        for ly, st in zip(self.schema.layers, self.layer_state):
            st["window"].zero_rows(slice(slot * ly.window, (slot + 1) * ly.window))
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v[slot].zero_()

    # ------------------------------------------------------------- forward
    def handles(self, slot: int) -> list[LayerHandle]:
        """Prebuilt per-layer handles for ``slot`` (allocates nothing)."""
        return self._handles[slot]

    def seq_len(self, slot: int) -> int:
        return self._seq[slot]

    def remaining(self, slot: int) -> int:
        return self._limit[slot] - self._seq[slot]

    def prepare(self, slot: int, n_new: int) -> None:
        """Make room for ``n_new`` more tokens: check the limit, allocate blocks entries will land in.

        Block b is allocated as soon as the context reaches a token of it (128*b + 1 tokens): the
        captured decode step (engine/decode.py) writes the entry of the window a token is filling
        at every step, before the window closes.
        """
        self._check(slot)
        total = self._seq[slot] + n_new
        if total > self._limit[slot]:
            raise CacheError(
                f"context limit reached: {total} tokens > {self._limit[slot]} reserved for this request"
            )
        if not self.schema.min_ratio:
            return
        need = -(-total // BLOCK_TOKENS)
        first = len(self._blocks[slot])
        try:
            while len(self._blocks[slot]) < need:
                self._blocks[slot].append(self.allocator.acquire())
        finally:  # the table gets every block acquired, also when the pool runs out part-way
            last = len(self._blocks[slot])
            if last > first:  # one copy, queued without a host wait on CUDA (pinned source, non-blocking)
                new = torch.tensor(self._blocks[slot][first:last], dtype=torch.int32)
                if self.block_table.is_cuda:
                    new = new.pin_memory()
                self.block_table[slot, first:last].copy_(new, non_blocking=True)

    def snapshot(self, slot: int) -> dict:
        """What a chunk forward of ``slot`` rewrites in place, copied (per layer: the window ring rows
        and the compressor tails / series a; a few hundred KiB at Flash size), with the token count.
        Entries a cut chunk appended past the count stay unseen and are rewritten; see ``restore``."""
        layers = []
        for ly, st in zip(self.schema.layers, self.layer_state):
            ring = {k: v[slot * ly.window:(slot + 1) * ly.window].clone() for k, v in st["window"].tensors.items()}
            layers.append((ring, {k: v[slot].clone() for k, v in st.items() if isinstance(v, torch.Tensor)}))
        return {"seq": self._seq[slot], "layers": layers}

    def restore(self, slot: int, snap: dict) -> None:
        """Put ``slot`` back to a ``snapshot`` taken at its current token count or after (a forward
        cut midway: the count was not committed). Blocks allocated since stay with the slot."""
        self._check(slot)
        for ly, st, (ring, state) in zip(self.schema.layers, self.layer_state, snap["layers"]):
            for k, v in st["window"].tensors.items():
                v[slot * ly.window:(slot + 1) * ly.window] = ring[k]
            for k, v in state.items():
                st[k][slot].copy_(v)
        self._seq[slot] = snap["seq"]

    def commit(self, slot: int, n_new: int) -> None:
        self._seq[slot] += n_new

    def entry_capacity(self, ratio: int) -> int:
        """Compressed entries of one ratio-``ratio`` layer that one slot's block table can address."""
        return self.blocks_per_slot * (BLOCK_TOKENS // ratio)

    def blocks_held(self, slot: int) -> int:
        return len(self._blocks[slot])

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._active[slot]:
            raise CacheError(f"slot {slot} is not an admitted request")

    # ---------------------------------------------------------- accounting
    def memory_report(self) -> dict:
        """Bytes the manager holds, by layer type and component (capacity, all slots)."""
        out: dict[str, dict] = {}
        for ly, st in zip(self.schema.layers, self.layer_state):
            t = out.setdefault(ly.attn, {"layers": 0, "window": 0, "state": 0})
            t["layers"] += 1
            t["window"] += sum(st["window"].nbytes().values())
            for key in ("pool", "ipool"):
                if key in st:
                    for comp, n in st[key].nbytes().items():
                        t[comp] = t.get(comp, 0) + n
            t["state"] += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        for t in out.values():
            t["total"] = sum(v for k, v in t.items() if k not in ("layers", "total"))
        return {"by_type": out, "total": sum(t["total"] for t in out.values()), "blocks": self.num_blocks}
