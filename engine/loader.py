"""Load a checkpoint directory (published or converted layout) into a runnable Model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .model import Model


def load_model(path, mode: str = "faithful", device="cpu", dtype=torch.float32, progress=None) -> Model:
    """Open, validate and load a checkpoint; tensors stay in their stored formats on ``device``."""
    ck = open_checkpoint(path)
    tensors = ck.load(device, progress=progress)
    return Model.from_state_dict(ck.config, tensors, mode=mode, device=device, dtype=dtype)


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
