"""Resident memory: handing the heap a process freed back to the OS.

glibc keeps what a process frees inside its heap, resident, and returns only a free top of the heap; memory freed
below live allocations stays counted in the process's RSS until malloc_trim releases its whole free pages. The
loaders and the prompt's GEMMs free a lot of it (bench/rss_stages.py traces it stage by stage).
"""
from __future__ import annotations

import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS; a no-op without glibc. Measured: after load, the tokenizer's
    construction garbage (112 MB on Qwen2.5-0.5B's GGUF, 300 MB on Gemma-3's 262k vocabulary); after a prompt, its
    activations and dequantized weight slices (80 MB on Gemma-3-270M at 512 tokens, 130 MB on Qwen2.5-0.5B)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
