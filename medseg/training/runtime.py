"""Device, precision and CPU-thread choices, made once from config and the machine."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from medseg.config import Precision
from medseg.errors import UsageError

log = logging.getLogger(__name__)

#: ``MEDSEG_ALLOCATOR``: ``tuned`` (default) keeps freed memory in glibc's heap; ``system`` leaves
#: malloc as it is; ``jemalloc`` is taken by the ``medseg`` command (see :func:`jemalloc_environment`).
ALLOCATOR_ENV = "MEDSEG_ALLOCATOR"
ALLOCATORS = ("tuned", "system", "jemalloc")
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if present, else CPU; ``cuda:1``/``cpu`` as given.

    Raises:
        UsageError: an unknown device name, or a CUDA device on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but no CUDA device is available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def configure_threads(num_threads: int | None, processes_here: int = 1) -> int:
    """Intra-op threads: the configured count, else this machine's cores shared evenly between
    the ``processes_here`` training processes on it (so DDP workers do not fight over cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(num_threads or cores // max(1, processes_here))))
    return torch.get_num_threads()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also demand deterministic kernels.

    Without it cuDNN may benchmark and pick the fastest (possibly nondeterministic) kernels;
    on CPUs medseg's results are reproducible either way for a fixed thread count.
    """
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at first use
        # warn_only: a kernel without a deterministic version warns (and is named) instead of failing a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def seed_step(seed: int, epoch: int, iteration: int, rank: int) -> None:
    """Reseed torch for one training step (dropout and other in-model randomness).

    Deriving the state from the step instead of carrying it makes a run resumed at any
    iteration continue exactly as the uninterrupted run would have.
    """
    from medseg.data.sampling import stream_seed

    torch.manual_seed(stream_seed(seed, epoch, iteration, rank, 0xD409))


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == Precision.AUTO:
        return torch.float16 if device.type == "cuda" else None
    if precision == Precision.BF16:
        return torch.bfloat16
    if precision == Precision.FP16:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


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


def use_channels_last(setting: bool | None, spatial_dims: int) -> bool:
    """``model.channels_last``: None (auto) means on for 3D networks, where oneDNN's and cuDNN's
    channels-last convolutions are the fast ones (measured 1.5x a whole 3D U-Net step on CPU)."""
    return spatial_dims == 3 if setting is None else setting


def to_channels_last(x: Any, spatial_dims: int) -> Any:
    """A network (its conv weights) or a batch (N, C, *spatial) in channels-last memory order
    (NDHWC / NHWC). The values are unchanged, only their order in memory; anything else passes."""
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    if isinstance(x, torch.Tensor) and x.ndim != spatial_dims + 2:
        return x
    return x.to(memory_format=fmt)
