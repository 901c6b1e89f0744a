"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's kernels.

A decode step is a chain of about 38 kernels per layer, each reading what the one before wrote.
Launched plainly, a kernel is scheduled only once the previous one has finished, and in the CUDA
graph that costs about 1 us per kernel (H200: 633 us over the 605 kernels of a 16-layer step,
bench/results/h200_profile_decode.txt). Launched with PDL (``launch(...)``), a kernel's programs may
be scheduled while the previous kernel still runs; each program first waits for it (``wait``:
griddepcontrol.wait, the previous grid complete and its writes visible), then lets the next kernel
be scheduled (griddepcontrol.launch_dependents). Every read and write of the step's data comes
after the wait, so memory sees the plain launches' order; the order is transitive, as every
kernel in the chain waits before it finishes. Before its wait a kernel may only touch what no
kernel of the step writes: a GEMV prefetches its weights into L2 there (``prefetch_l2``), so their
reading overlaps the kernels before it.

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


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at ptrs (any shape; valid addresses) in L2, without waiting."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
