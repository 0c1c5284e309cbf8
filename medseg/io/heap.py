"""Handing freed heap memory back to the operating system between the stages of a big prediction."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the free pages of every malloc arena to the operating system (glibc ``malloc_trim(0)``).

    Reading a compressed NIfTI decompresses it in many small pieces; once they are freed, glibc keeps
    their pages (about the size of the raw volume) in its heap, resident, until something reuses them.
    Trimming between preprocessing and the sweep makes the resident size what is really held.

    Returns:
        Whether anything was handed back (False too where the C library cannot trim).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
