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


#: ``madvise``'s advice that drops a private anonymous range's pages (they read back as zeros).
MADV_DONTNEED = 4


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise``, or None where there is none (Windows)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def release_pages(address: int, length: int) -> int:
    """Hand back to the operating system the whole pages inside ``[address, address + length)`` of
    memory that will not be read again (``madvise(MADV_DONTNEED)``): its resident size drops, and a
    later read would see zeros. For a buffer this process allocated and is done with in part (the
    rows of a scan a sweep has passed); the partial pages at either end stay.

    Returns:
        The bytes handed back (0 where the C library cannot, or the range holds no whole page).
    """
    import mmap

    advise = _madvise()
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    stop = (address + length) // page * page
    if advise is None or stop <= start:
        return 0
    return stop - start if advise(start, stop - start, MADV_DONTNEED) == 0 else 0


#: ``mallopt``'s parameter for the size from which an allocation gets pages of its own (``mmap``).
M_MMAP_THRESHOLD = -3


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(size: int) -> bool:
    """Give every allocation of ``size`` bytes or more pages of its own, handed back when it is freed.

    glibc raises its threshold up to 32 MiB as large blocks are freed, so a sweep's many short-lived
    tensors of a few MiB (tiles of class scores, their weights and probabilities) land in the heap,
    where freed ones in between live ones leave it fragmented: resident, and growing as the sweep goes
    on (a gigabyte of a 100-class whole-body sweep). A fixed threshold also stops the raising. For
    the rest of the process (glibc cannot go back to the moving threshold).

    Returns:
        Whether the C library took it (False where it has no ``mallopt``).
    """
    mallopt = _mallopt()
    return bool(mallopt(M_MMAP_THRESHOLD, int(size))) if mallopt is not None else False
