"""Safetensors shard files: header parsing, single-tensor reads without a memory map, streaming writes.

Header layout: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets}}, then the data. For F4 (e2m1) the header counts values; torch holds them as packed
pairs (float4_e2m1fn_x2), so the last axis is halved here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
          "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "I32": torch.int32,
          "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and tensor."""


def short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


class ShardReader:
    """One shard's header, and tensors read with plain seek + read, so resident memory holds only
    the tensor asked for, not the pages of the file it came from.

    meta: name -> (safetensors dtype string, torch shape, (start, end) byte offsets in the data).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: shard listed in the index is missing")
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self.data_start = 8 + n
            self.meta = {}
            for name, m in header.items():
                if name == "__metadata__":
                    continue
                shape = tuple(m["shape"])
                if m["dtype"] == "F4":
                    shape = shape[:-1] + (shape[-1] // 2,)
                self.meta[name] = (m["dtype"], shape, tuple(m["data_offsets"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors header ({short(e)})") from None

    def keys(self) -> set:
        return set(self.meta)

    def missing_bytes(self) -> int:
        """How many bytes the header promises beyond the end of the file (0 for a whole file)."""
        need = self.data_start + max((m[2][1] for m in self.meta.values()), default=0)
        return max(0, need - self.path.stat().st_size)

    def get(self, name: str) -> torch.Tensor:
        dt, shape, (a, b) = self.meta[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            buf = bytearray(f.read(b - a))
        if len(buf) != b - a:
            raise CheckpointError(f"{self.path}: tensor {name} is cut short (file truncated)")
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return flat.view(DTYPES[dt]).reshape(shape)


class ShardWriter:
    """Fills shards of at most ``max_bytes`` (a tensor larger than that gets a shard of its own),
    then names them model-0000i-of-0000n.safetensors and writes the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = Path(out), max_bytes
        self.buf, self.size, self.files, self.weight_map = {}, 0, [], {}

    def add(self, tensors: dict) -> None:
        nb = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.buf and self.size + nb > self.max_bytes:
            self.flush()
        self.buf.update(tensors)
        self.size += nb

    def flush(self) -> None:
        if not self.buf:
            return
        fname = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.buf.items()}, str(self.out / fname), metadata={"format": "pt"})
        self.files.append(fname)
        self.weight_map.update({k: fname for k in self.buf})
        self.buf, self.size = {}, 0

    def finish(self) -> dict:
        """Write what is pending, rename the shards to their final names, write the index."""
        self.flush()
        n = len(self.files)
        final = {}
        for i, f in enumerate(self.files):
            final[f] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f, self.out / final[f])
        self.weight_map = {k: final[v] for k, v in self.weight_map.items()}
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=1))
        return self.weight_map
