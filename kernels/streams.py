"""One CUDA stream per device beside the current one, for decode work that may run concurrently.

A decode step is a chain of small kernels, most too small to fill the GPU. Where two chains are
independent, ``side(x, site)`` gives a second stream to fork one of them onto; the fork and the join
are stream waits, so a CUDA-graph capture records them as parallel branches. The sites: "moe" (the
shared expert beside the router and the routed experts: they read the same input and meet only at
the sum) and "compressor" (a compressed layer's compressors, which read only the layer input, beside
the query / KV projections). Split-K kernels launched on the side stream count their arrivals in
their own buffer (``lane``), so they may run while split-K kernels on the main stream do. Off (None)
on the CPU, for more than MAX_ROWS rows (a prefill chunk fills the GPU alone) and with autograd on.
DSV4_OVERLAP: 1 (default) every site, 0 none, or a comma-separated list of sites.
"""

from __future__ import annotations

import os

import torch

MAX_ROWS = 16
_SIDE: dict = {}


SITES = ("moe", "compressor")


def side(x: torch.Tensor, site: str) -> torch.cuda.Stream | None:
    """The side stream of x's device for the work of ``site`` (one of SITES) on x ([rows, ...]), or
    None where overlap is off."""
    want = os.environ.get("DSV4_OVERLAP", "1").replace(" ", "")
    on = want == "1" or site in want.split(",")
    if x.device.type != "cuda" or x.shape[0] > MAX_ROWS or not on or torch.is_grad_enabled():
        return None
    if x.device not in _SIDE:
        _SIDE[x.device] = torch.cuda.Stream(x.device)
    return _SIDE[x.device]


def beside(side: torch.cuda.Stream | None, fn):
    """Run fn() on ``side`` after the current stream's work so far (inline when side is None).
    -> (fn's result, join): join() makes the current stream wait for that work.

    What fn allocates comes from the side stream's pool and may be freed once the current stream
    has used it, before that use has run: the block is reused only by later side-stream work, which
    starts with this wait on the current stream, so the use is done by then."""
    if side is None:
        return fn(), lambda: None
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    return out, lambda: main.wait_stream(side)


def lane(device: torch.device) -> int:
    """1 while the current stream is ``device``'s side stream, else 0."""
    s = _SIDE.get(device)
    return int(s is not None and torch.cuda.current_stream(device) == s)
