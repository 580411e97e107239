"""glibc malloc tuning for large tensors, applied by every entry point before torch allocates.

glibc maps every large allocation with ``mmap`` and unmaps it on free; page faults on fresh memory
are expensive on our VMs (a fresh page can cost 0.5 to 25 us when the hypervisor has to back it),
so large-tensor ops ran several times slower (``shared/notes``, BENCHMARKS.md). Three settings keep
freed tensors in the heap for reuse:

- the mmap threshold: large blocks come from the heap instead of their own mapping;
- the trim threshold: the heap's free top is not handed back to the kernel after every image;
- one arena: glibc gives each new thread an arena of its own, made of 64 MiB heaps that cannot hold
  a tensor larger than that, so the service's worker thread (and any thread but the main one) got
  every large tensor from a fresh mapping again whatever the thresholds said. With one arena every
  thread allocates from the main heap, which grows as needed.

The ``lalic`` command line and ``python -m service`` call :func:`tune_malloc` first; the Makefile,
the Docker image and the Kubernetes manifests set :data:`MALLOC_ENVIRONMENT` (tests keep them equal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_THRESHOLD = 4294967296
"""``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (4 GiB)."""
MALLOC_ARENAS = 1
"""``MALLOC_ARENA_MAX``: every thread allocates from the main heap."""
MALLOC_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_THRESHOLD),
    "MALLOC_ARENA_MAX": str(MALLOC_ARENAS),
}
"""The environment that applies the tuning to a process from its start (glibc reads it then)."""
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_ARENA_MAX": -8}
"""``mallopt`` parameter numbers (``M_TRIM_THRESHOLD``, ``M_MMAP_THRESHOLD``, ``M_ARENA_MAX``)."""
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_ENVIRONMENT` to this process with ``mallopt`` and export it for children.

    A variable already set when the process started is left as glibc read it. Call it before any
    thread but the main one exists (threads started earlier keep their own arenas). Returns whether
    ``mallopt`` was applied (False off glibc).
    """
    pending = []
    for variable, value in MALLOC_ENVIRONMENT.items():
        if variable not in os.environ:
            os.environ[variable] = value
            pending.append((_MALLOPT[variable], min(int(value), _INT_MAX)))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in pending)
