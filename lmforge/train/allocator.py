"""Host memory: what a micro-batch freed goes back to the OS before the next one allocates, and a training process
does not load what it cannot use.

glibc's malloc raises its mmap threshold each time a large block is freed, so after the first micro-batch the
gigabytes of activations each one frees and allocates again live in its heap, where fragmentation makes the
process grow micro-batch after micro-batch. `malloc_trim` after each backward returns the free pages, and the peak
stays at the first micro-batch's. A fixed mmap threshold does the same but page-faults every large tensor afresh,
which slows every step (the numbers: docs/benchmarks.md, "Numbers behind code comments")."""

import ctypes
import sys
from functools import cache

import torch


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


def skip_unusable_triton() -> None:
    """Every torch optimizer imports torch._dynamo, which imports Triton wherever it is installed (xgrammar, of the
    structured-output extra, brings it): ~70 MB resident for a training process whose torch build has no GPU backend
    and so can run no Triton kernel. On such builds `import triton` then fails, and torch reports no Triton."""
    if torch.version.cuda is None and torch.version.hip is None and getattr(torch.version, "xpu", None) is None:
        sys.modules.setdefault("triton", None)


def trim_before_embedding_backward(model) -> None:
    """The last op of a full run's backward, the embedding's, allocates a dense [vocab, hidden] gradient beside the
    head's (113 MB each for SmolLM2; mmapped, so fresh pages): by then backward has freed the micro-batch's
    activations, whose pages glibc keeps until trimmed. Trimmed first, the gradient reuses their share of the peak."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embedding is not None and embedding.weight.requires_grad:
        embedding.register_full_backward_pre_hook(lambda module, grad: release_free_memory())
