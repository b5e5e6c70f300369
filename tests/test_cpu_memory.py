"""cpu_memory.keep_freed_memory: a freed large tensor stays in the process, as it would not by default.

The setting is process-wide, so each case runs in a fresh interpreter.
"""

import os
import subprocess
import sys

from conftest import REPO_ROOT, requires_glibc

from cpu_memory import keep_freed_memory

BLOCK_MIB = 256
# allocate and touch a 256 MiB tensor, free it, and print how much of it the process gave back to the kernel
CHILD = f"""
import os, sys, torch
from cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = torch.ones({BLOCK_MIB} << 20, dtype=torch.uint8)
held = resident_mib()
del block
print(applied, held - resident_mib())
"""

# the child gets glibc's defaults: no malloc settings or preloaded allocator from the caller's environment
CHILD_ENV = {
    name: value
    for name, value in os.environ.items()
    if not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "LD_PRELOAD")
}

pytestmark = requires_glibc


def released_mib(mode: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO_ROOT,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    applied, released = result.stdout.split()
    return applied, float(released)


def test_freed_memory_is_kept_for_reuse():
    applied, released = released_mib("keep")
    assert applied == "True"
    assert released < 0.1 * BLOCK_MIB


def test_by_default_glibc_returns_it_to_the_kernel():
    """What the setting changes (and why the test above can fail): a default process gives the block back."""
    applied, released = released_mib("default")
    assert applied == "None"
    assert released > 0.9 * BLOCK_MIB


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    """jemalloc and tcmalloc keep freed memory by themselves; glibc's mallopt would claim a setting doing nothing."""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert keep_freed_memory() is False
