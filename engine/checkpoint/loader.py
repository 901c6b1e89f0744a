"""Load a checkpoint directory (published or converted layout) into a runnable Model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .published import open_checkpoint
from dsv4.engine.model.model import Model
from dsv4.engine.model.weights import cache_dense

CPU_DENSE_CACHE_BYTES = 2 << 30  # float32 copies of quantised linears kept on CPU when they fit


def load_model(path, mode: str = "faithful", device="cpu", dtype=torch.float32, progress=None,
               dense_cache_bytes: int | None = None) -> Model:
    """Open, validate and load a checkpoint; tensors stay in their stored formats on ``device``.

    On CPU, when the float32 dequantisation of all quantised linears fits in ``dense_cache_bytes``
    (default 2 GiB there, 0 elsewhere), it is made once at load (see weights.cache_dense)."""
    ck = open_checkpoint(path)
    tensors = ck.load(device, progress=progress)
    model = Model.from_state_dict(ck.config, tensors, mode=mode, device=device, dtype=dtype)
    if dense_cache_bytes is None:
        dense_cache_bytes = CPU_DENSE_CACHE_BYTES if torch.device(device).type == "cpu" else 0
    cache_dense(model.w, dense_cache_bytes)
    return model


def generation_defaults(path) -> dict:
    """Sampling defaults from generation_config.json (temperature, top_p, top_k), if present."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}
    return {k: d[k] for k in ("temperature", "top_p", "top_k") if k in d}
