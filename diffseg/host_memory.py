"""Keep freed host memory in the process, so a CPU train step does not page-fault its buffers anew.

With glibc's defaults, every large buffer XLA (or PyTorch) allocates is served by fresh pages:
big blocks are ``mmap``-ed and returned on free, and blocks freed in per-thread arenas are
trimmed. A CPU train step of the benchmark's 3D U-Net (channels 32–256, 64×64×16, batch 2)
then takes ~134 000 page faults: 1.38–1.45 s per step against 1.24–1.27 s without them on the
2-core benchmark machine. One arena, no ``mmap`` for large blocks and no trimming
make the second and later steps reuse the same pages: zero faults per step.

``diffseg``'s command line calls ``reuse_freed_memory()`` first thing; ``DIFFSEG_MALLOC=default``
turns it off. The process keeps its peak memory until it exits, which is what a training or
inference job does anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory; True if it was applied.

    Must run before the threads that allocate (JAX's, oneDNN's) first allocate, i.e. before
    any computation. No-op (False) on non-glibc systems or with ``DIFFSEG_MALLOC=default``.
    """
    if os.environ.get("DIFFSEG_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all(mallopt(param, value) == 1 for param, value in settings)
