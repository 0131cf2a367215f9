"""CPU memory: keep freed memory in the process for reuse instead of handing it back to the OS.

With glibc's defaults a CPU forward pass re-faults its activation buffers page by page whenever malloc has
trimmed or unmapped them since the previous batch (20,000-180,000 minor page faults per batch measured for
``cifar_resnet56`` at batch 250; see BENCHMARKS.md). ``main.py`` calls ``keep_freed_memory`` before it builds
anything unless ``ASH_KEEP_FREED_MEMORY=0``. The process then keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import os

KEEP_FREED_MEMORY_ENV = "ASH_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap, not fresh mmap pages


def keep_freed_memory() -> bool:
    """Set glibc's ``M_TRIM_THRESHOLD`` to 1 GiB and ``M_MMAP_THRESHOLD`` to 32 MiB (which also stops their
    dynamic adjustment); forked DataLoader workers inherit it. Returns False where glibc's ``mallopt`` is
    unavailable (macOS, Windows, musl) and changes nothing there."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def keep_freed_memory_unless_disabled() -> bool:
    """``keep_freed_memory()`` unless ``$ASH_KEEP_FREED_MEMORY`` is ``0``; True when it was applied."""
    return os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0" and keep_freed_memory()
