"""Load a checkpoint directory (published or converted layout) into a runnable Model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv4.engine.model.model import Model
from dsv4.engine.model.weights import cache_dense

from .published import open_checkpoint
from .shards import CheckpointError

CPU_DENSE_CACHE_BYTES = 2 << 30  # float32 copies of quantised linears kept on CPU when they fit


class PrecisionUnsupported(CheckpointError):
    """The checkpoint cannot run in the precision asked for. ``precision`` is the one refused,
    ``fallback`` the one that works, ``reason`` why (for the caller to word as its own option)."""

    def __init__(self, path, precision: str, fallback: str, reason: str):
        self.path, self.precision, self.fallback, self.reason = path, precision, fallback, reason
        super().__init__(f"{path}: {precision} precision cannot run this model ({reason}); "
                         f"use {fallback} precision")


def check_precision(ck, mode) -> None:
    """Raise PrecisionUnsupported when ``mode`` (faithful) cannot run checkpoint ``ck``'s config."""
    problem = ck.config.faithful_problem() if str(mode) == "faithful" else None
    if problem:
        raise PrecisionUnsupported(ck.path, "faithful", "exact", problem)


def load_model(path, mode: str = "faithful", device="cpu", dtype=torch.float32, progress=None,
               dense_cache_bytes: int | None = None) -> Model:
    """Open, validate and load a checkpoint; tensors stay in their stored formats on ``device``.

    On CPU, when the float32 dequantisation of all quantised linears fits in ``dense_cache_bytes``
    (default 2 GiB there, 0 elsewhere), it is made once at load (see weights.cache_dense)."""
    ck = open_checkpoint(path)
    check_precision(ck, mode)
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
