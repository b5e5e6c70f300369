"""Keep freed memory in the process for reuse, for training on CPU.

By default glibc returns large freed blocks to the kernel: every block over its mmap threshold (at most
32 MiB) is unmapped when freed, and free memory at the top of the heap is trimmed. A training step frees
and reallocates the same large tensors every step (logits, their gradient, activations, an MoE layer's
per-expert gradients), so each step then faults in and zeroes fresh pages. On the 2-core VM this made the
demo's training step 1.6x slower (README, "Training").
"""

import ctypes
import os
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # mallopt(3): a trim threshold of -1 disables trimming
# allocators that keep freed memory by themselves, and whose mallopt (if any) is a stub
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory() -> bool:
    """Tell glibc to serve every block from its heap (no mmap) and never trim the heap, so a freed block is
    reused by the next allocation. The process's memory then stays at its peak, which a training loop reaches
    every step anyway. Returns False, changing nothing, where the allocator is not glibc's (macOS, Windows, musl,
    or jemalloc/tcmalloc preloaded)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if not sys.platform.startswith("linux") or any(name in preloaded for name in OTHER_ALLOCATORS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    no_mmap = mallopt(M_MMAP_MAX, 0) == 1  # accepted by every glibc, unlike mmap thresholds over 32 MiB
    no_trim = mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1  # musl's mallopt is a stub that returns 0
    return no_mmap and no_trim
