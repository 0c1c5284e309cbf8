"""Device, precision and CPU-thread choices, made once from config and the machine."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from medseg.allocator import tune_allocator
from medseg.config import Precision
from medseg.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["tune_allocator"]  # re-exported: the loop and predict call it with the other runtime choices

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
    """Intra-op threads: the configured count, else ``OMP_NUM_THREADS`` where the user set it (as torch
    and every OpenMP program honour it: on a shared machine it is how one says "one core"), else this
    machine's cores shared evenly between the ``processes_here`` training processes on it (so DDP
    workers do not fight over cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(num_threads or _omp_threads() or cores // max(1, processes_here))))
    return torch.get_num_threads()


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive count, or None where it is unset or not one (as OpenMP ignores it)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


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
        # only to undo an earlier run's demand in this process: the call imports torch._inductor (~2 s)
        if torch.are_deterministic_algorithms_enabled():
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


def use_channels_last(setting: bool | None, spatial_dims: int) -> bool:
    """``model.channels_last``: None (auto) means on for 3D networks, where oneDNN's and cuDNN's
    channels-last convolutions are the fast ones (benchmarks/results/perf.md, W2)."""
    return spatial_dims == 3 if setting is None else setting


def to_channels_last(x: Any, spatial_dims: int) -> Any:
    """A network (its conv weights) or a batch (N, C, *spatial) in channels-last memory order
    (NDHWC / NHWC). The values are unchanged, only their order in memory; anything else passes."""
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    if isinstance(x, torch.Tensor) and x.ndim != spatial_dims + 2:
        return x
    return x.to(memory_format=fmt)
