"""Device, precision and CPU-thread choices, made once from config and the machine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from medseg.config import Precision
from medseg.errors import UsageError


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


def configure_threads(num_threads: int | None) -> int:
    """Use every core for intra-op parallelism unless told otherwise; returns the count in use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(num_threads or cores)))
    return torch.get_num_threads()


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
