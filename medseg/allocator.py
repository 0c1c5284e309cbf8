"""The memory allocator: glibc tuned at start-up (default), left alone, or jemalloc preloaded.

Kept free of torch so the command line can decide before anything heavy is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from medseg.errors import UsageError

#: ``MEDSEG_ALLOCATOR``: ``tuned`` (default) keeps freed memory in glibc's heap; ``system`` leaves
#: malloc as it is; ``jemalloc`` is taken by the ``medseg`` command (see :func:`jemalloc_environment`).
ALLOCATOR_ENV = "MEDSEG_ALLOCATOR"
ALLOCATORS = ("tuned", "system", "jemalloc")
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocator_setting() -> str:
    """``MEDSEG_ALLOCATOR``, checked: one of :data:`ALLOCATORS` (default ``tuned``)."""
    value = os.environ.get(ALLOCATOR_ENV, "tuned").strip().lower() or "tuned"
    if value not in ALLOCATORS:
        raise UsageError(f"{ALLOCATOR_ENV}={value!r} is not an allocator setting; use one of {', '.join(ALLOCATORS)}")
    return value


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of handing it back to the kernel.

    A training step allocates and frees activations of tens of MB; by default glibc maps each
    one afresh (or trims the heap after it), so every step pays a page fault per 4 KiB touched.
    A high trim threshold and a large top pad keep those pages, and an mmap threshold at its
    32 MiB maximum serves activations from the heap. Process-wide and idempotent; a no-op (False)
    off glibc, with ``MEDSEG_ALLOCATOR=system``, or when jemalloc is preloaded.
    """
    if sys.platform != "linux" or allocator_setting() != "tuned" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20)))


def find_jemalloc() -> str | None:
    """Path of a jemalloc shared library on this machine, if any (Debian/Ubuntu: libjemalloc2)."""
    for candidate in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                      "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2"):
        if os.path.isfile(candidate):
            return candidate
    name = ctypes.util.find_library("jemalloc")
    return name if name and os.path.isabs(name) else None


def jemalloc_environment() -> dict[str, str] | None:
    """The environment to re-run the command under jemalloc with, when ``MEDSEG_ALLOCATOR=jemalloc``
    and it is not loaded yet; None when nothing is to be done.

    Raises:
        UsageError: jemalloc asked for but not installed here.
    """
    if allocator_setting() != "jemalloc" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    library = find_jemalloc()
    if library is None:
        raise UsageError(f"{ALLOCATOR_ENV}=jemalloc but no libjemalloc.so.2 was found; install it "
                         "(apt install libjemalloc2) or unset the variable to use the tuned glibc allocator")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    # Without decay jemalloc keeps freed pages too (its defaults give them back within 10 s).
    env.setdefault("MALLOC_CONF", _JEMALLOC_CONF)
    return env
