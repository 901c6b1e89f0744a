"""Keep the C heap from holding on to freed memory during long streaming jobs (glibc only).

glibc raises its mmap threshold each time a large mmapped block is freed, so later tensors of that
size come from the main heap, and freed heap memory above the trim threshold stays resident: a
tensor-by-tensor conversion then grows its resident set by hundreds of MiB although it never holds
more than a few tensors. Fixing the mmap threshold (which turns the dynamic adjustment off) and
trimming eagerly keeps resident memory close to what is really live.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def limit_heap_retention(mmap_threshold: int = 64 << 10) -> bool:
    """Return True when the allocator was adjusted (glibc), False elsewhere (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 0) == 1 and ok
    return ok
