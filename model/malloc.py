"""glibc malloc tuning for large tensors, applied by every entry point before torch allocates.

glibc maps every large allocation with ``mmap`` and unmaps it on free; page faults on fresh memory
are expensive on our VMs, so large-tensor ops ran several times slower (``shared/notes``,
BENCHMARKS.md). Raising the mmap and trim thresholds keeps freed tensors in the heap for reuse.
The ``lalic`` command line and ``python -m service`` call :func:`tune_malloc` first; the Makefile,
the Docker image and the Kubernetes manifests set the same environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_THRESHOLD = 4294967296
"""Value of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (4 GiB) for this and child processes."""
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process and set the env vars for children.

    A threshold whose env var was already set when the process started is left as glibc read it.
    Returns whether ``mallopt`` was applied (False off glibc).
    """
    pending = []
    for variable, option in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD),
    ):
        if variable not in os.environ:
            os.environ[variable] = str(MALLOC_THRESHOLD)
            pending.append(option)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(option, min(MALLOC_THRESHOLD, _INT_MAX)) == 1 for option in pending)
