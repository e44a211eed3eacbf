"""Keep freed memory inside the process, so CPU forward passes stop page-faulting.

glibc's malloc serves large blocks with fresh ``mmap`` pages and unmaps them on ``free``
(always above 32 MB, its cap for the adaptive threshold). A CPU forward pass allocates and
frees activations of 10-100 MB per layer, so every batch touched its whole working set anew:
EfficientNet-Lite0 at batch 64 spent more time in the kernel (page faults, zeroing) than in
the model, at 32 tiles/s here. Serving all blocks from the heap and keeping up to 1 GiB of
freed heap made it 62-86 tiles/s, for ~30 % more resident memory. This is what the jemalloc
or tcmalloc preloads recommended for PyTorch CPU inference achieve, without a preload.

It is process-wide, so the ``pathrobust`` command applies it at start-up (library code never
does); set ``PATHROBUST_SYSTEM_MALLOC=1`` to keep the system's behaviour.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and return freed memory to the system only past
    1 GiB of free heap. Returns whether the settings took (glibc on Linux only)."""
    if os.environ.get("PATHROBUST_SYSTEM_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
