"""Row stores for cache entries in their storage formats.

A store holds ``rows`` vectors of ``fmt.dim`` channels:
- "kv":  fp8 float8_e4m3fn [rows, D-r], rope bfloat16 [rows, r], scale uint8 [rows, (D-r)/64]
         (ue8m0 exponents, one per 64 FP8 channels);
- "fp4": codes uint8 [rows, Di/2] (two e2m1 per byte, low nibble first), scale uint8 [rows, Di/32];
- "f32": float32 [rows, D].
Writes quantise; reads dequantise to float32 (kernels/entries.py). The write of an already-quantised
value is exact.
"""

from __future__ import annotations

import torch

from dsv4.kernels.reference import entries

from .schema import FP4_GROUP, FP8_GROUP, EntryFormat


class EntryStore:
    def __init__(self, rows: int, fmt: EntryFormat, device):
        self.fmt, self.rows = fmt, rows
        d, r = fmt.dim, fmt.rope_dim
        if fmt.kind == "kv":
            self.tensors = {
                "fp8": torch.zeros(rows, d - r, dtype=torch.float8_e4m3fn, device=device),
                "bf16": torch.zeros(rows, r, dtype=torch.bfloat16, device=device),
                "scales": torch.zeros(rows, (d - r) // FP8_GROUP, dtype=torch.uint8, device=device),
            }
        elif fmt.kind == "fp4":
            self.tensors = {
                "fp4": torch.zeros(rows, d // 2, dtype=torch.uint8, device=device),
                "scales": torch.zeros(rows, d // FP4_GROUP, dtype=torch.uint8, device=device),
            }
        else:
            self.tensors = {"f32": torch.zeros(rows, d, dtype=torch.float32, device=device)}

    def nbytes(self) -> dict:
        return {k: t.numel() * t.element_size() for k, t in self.tensors.items()}

    def write(self, rows: torch.Tensor | slice, x: torch.Tensor) -> None:
        """Store x [k, dim] at ``rows`` (index tensor [k] or slice), quantised to the pool's format:
        through kernels.store_entry for an index tensor (a quantise-and-store kernel on CUDA)."""
        if isinstance(rows, torch.Tensor) and x.shape[0]:
            from dsv4 import kernels  # the kernels package loads its GPU kernels; the cache needs it only here

            kernels.store_entry(x.reshape(-1, x.shape[-1]), self.tensors, rows.reshape(-1))
        else:
            entries.write_entries(self.tensors, rows, x)

    def read(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Entries at ``rows`` as float32 [k, dim]."""
        return entries.read_entries(self.tensors, rows)

    def zero_rows(self, rows: torch.Tensor | slice) -> None:
        for v in self.tensors.values():
            v[rows] = 0
