"""Host memory that a micro-batch freed goes back to the OS before the next one allocates.

glibc's malloc raises its mmap threshold each time a large block is freed, so after the first micro-batch the
gigabytes of activations each one frees and allocates again live in its heap, where fragmentation makes the
process grow micro-batch after micro-batch. `malloc_trim` after each backward returns the free pages, and the peak
stays at the first micro-batch's. A fixed mmap threshold does the same but page-faults every large tensor afresh,
which slows every step (the numbers: docs/benchmarks.md, "Numbers behind code comments")."""

import ctypes
import sys
from functools import cache


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries: nothing to do
        return None


def release_free_memory() -> None:
    """Returns the allocator's free pages to the OS (glibc); elsewhere a no-op."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
