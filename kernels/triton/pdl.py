"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's kernels.

A decode step is a chain of about 38 kernels per layer, each reading what the one before wrote.
Launched plainly, a kernel is scheduled only once the previous one has finished, and in the CUDA
graph that costs about 1 us per kernel (H200, a 16-layer step of 605 kernels: the graph took 633 us
longer than the kernels' sum; profile of 2026-12-01 in git history). Launched with PDL
(``launch(...)``), a kernel's programs may be scheduled while the previous kernel still runs; each
program first waits for it (``wait``: griddepcontrol.wait, the previous grid complete and its writes
visible), then lets the next kernel be scheduled (griddepcontrol.launch_dependents). Every read and
write of the step's data comes after the wait, so memory sees the plain launches' order; the order
is transitive, as every kernel in the chain waits before it finishes.

Measured on the H200 (16 Flash layers, prompt 1024, faithful, CUDA-graph step, bench/profile_decode.py
--compare DSV4_PDL=0,DSV4_PDL=1): 3345 us plain, 3177 / 3144 us with PDL; on 2026-12-02 3400 / 3401
us plain, 3179 / 3178 us with PDL, and in the final code with the side stream off 3433 us plain,
3222 / 3210 us with PDL (bench/results/h200_decode_overlap_pdl.txt). Two variants measured no
better and are not kept: the trigger left implicit (the next kernel scheduled as this one's programs exit, 3376 us), and
GEMVs prefetching the first 8 / 32 lines of their weight rows into L2 before the wait (3259 / 3503
us; the prefetch competes with the running kernel for bandwidth; prefetching whole slices, the
earlier design, took 3760 us against 3526 us plain).

Off in Triton's CPU interpreter, before Hopper, with a Triton without ``launch_pdl``, and with
DSV4_PDL=0 (the benchmarks compare both).
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


@functools.cache
def _supported(device_index: int) -> bool:
    import torch

    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(device_index)[0] >= 9


def on(device) -> bool:
    """Whether kernels on ``device`` (a torch.device) launch with PDL."""
    from .attention import interpreted  # attention.py launches with PDL too

    return (device.type == "cuda" and os.environ.get("DSV4_PDL", "1") != "0" and not interpreted()
            and _supported(device.index if device.index is not None else 0))


def launch(device) -> dict:
    """Keyword arguments for a launch of a kernel taking a ``PDL: tl.constexpr`` that calls ``wait``:
    {"PDL": True, "launch_pdl": True} where PDL is on, else {"PDL": False}."""
    return {"PDL": True, "launch_pdl": True} if on(device) else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one be scheduled. Call
    before the program's first read or write of data the step produces. No-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
