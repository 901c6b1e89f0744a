"""One CUDA stream per device beside the current one, for decode work that may run concurrently.

A decode step is a chain of small kernels, most too small to fill the GPU. Where two chains are
independent (the MoE's shared expert and its router + routed experts read the same input and meet
only at the sum), ``side(device)`` gives a second stream to fork one of them onto; the fork and the
join are stream waits, so a CUDA-graph capture records them as parallel branches. Split-K kernels
launched on the side stream count their arrivals in their own buffer (``lane``), so they may run
while split-K kernels on the main stream do. Off (None) on the CPU, for more than MAX_ROWS rows (a
prefill chunk fills the GPU alone) and with DSV4_OVERLAP=0.
"""

from __future__ import annotations

import os

import torch

MAX_ROWS = 16
_SIDE: dict = {}


def side(x: torch.Tensor) -> torch.cuda.Stream | None:
    """The side stream of x's device for work on x ([rows, ...]), or None where overlap is off."""
    if x.device.type != "cuda" or x.shape[0] > MAX_ROWS or os.environ.get("DSV4_OVERLAP", "1") == "0":
        return None
    if x.device not in _SIDE:
        _SIDE[x.device] = torch.cuda.Stream(x.device)
    return _SIDE[x.device]


def lane(device: torch.device) -> int:
    """1 while the current stream is ``device``'s side stream, else 0."""
    s = _SIDE.get(device)
    return int(s is not None and torch.cuda.current_stream(device) == s)
