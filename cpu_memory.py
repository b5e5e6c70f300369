"""Keep freed memory in the process for reuse, for training on CPU.

By default glibc returns large freed blocks to the kernel: every block over its mmap threshold (at most
32 MiB) is unmapped when freed, and free memory at the top of the heap is trimmed. A training step frees
and reallocates the same large tensors every step (logits, their gradient, activations, an MoE layer's
per-expert gradients), so each step then faults in and zeroes fresh pages. On the 2-core VM this made the
demo's training step 1.6x slower and the MoE layer's time swing by 20% between processes (BENCHMARKS.md).
"""

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap and stay there once freed


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 1 GiB from the heap and never trim it. The process's memory then
    stays at its peak, which a training loop reaches every step anyway. Returns False where this is not
    glibc (macOS, Windows, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(parameter, KEEP_BELOW_BYTES) == 1 for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
