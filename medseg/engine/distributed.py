"""Data-parallel training through PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` connects them (NCCL on GPUs, gloo on CPUs).

medseg never launches or schedules workers itself beyond handing ``--nproc N`` to
``torchrun --standalone``; several machines use the plain ``torchrun --nnodes ...`` form with
the same entry point. Every process reads the rendezvous from the environment variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``).

When a worker dies, torchrun's agent stops the others and exits non-zero, so a job ends
instead of hanging in a collective; a worker that is alive but stuck in a training collective
is ended by the process-group timeout (``$MEDSEG_DIST_TIMEOUT_MINUTES``, default 30). Waiting
for the main process while it works alone (verifying data, evaluating, logging the model) goes
through a separate gloo group whose timeout is ``$MEDSEG_DIST_WAIT_HOURS`` (default 24), since
that work may take longer than any training step.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medseg.errors import DistributedRunError, UsageError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MEDSEG_DIST_TIMEOUT_MINUTES"
WAIT_ENV = "MEDSEG_DIST_WAIT_HOURS"
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank among all, and among those on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes run files, checkpoints and talks to MLflow."""
        return self.rank == 0

    # ------------------------------------------------------------------------ collectives
    # Objects and barriers go through the control group (gloo, long timeout); tensors of the
    # training loop through the default group (NCCL on GPUs).
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=_control_group)

    def broadcast(self, value: T) -> T:
        """``value`` as the main process has it (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=_control_group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order (any picklable object)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=_control_group)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place by summation (float64 stays float64: exact counts)."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.enabled:
            return tensor
        if self.backend == "nccl" and tensor.device.type != "cuda":  # NCCL reduces GPU memory only
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, op=op)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=op)
        return tensor


_current = DistContext()
_control_group: Any = None


def current() -> DistContext:
    """This process's context (single-process until :func:`init_distributed` connected it)."""
    return _current


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"${name}={value!r} is not an integer; it is set by torchrun, do not set it by hand") from None


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group torchrun set up, or stay single-process without it.

    Args:
        device_name: the config's ``train.device``; ``cpu`` forces gloo even where CUDA exists.

    Returns:
        The context, also available afterwards from :func:`current`.

    Raises:
        UsageError: torchrun asked for more processes per machine than there are GPUs.
    """
    global _current, _control_group
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or (_current.enabled and dist.is_initialized()):
        return _current
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"{local_world} processes on this machine but only {torch.cuda.device_count()} GPU(s); "
                             "use --nproc (or torchrun --nproc-per-node) no larger than the GPU count, "
                             "or train.device=cpu")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "30")))
    dist.init_process_group(backend=backend, timeout=timeout)
    _control_group = dist.new_group(backend="gloo",
                                    timeout=timedelta(hours=float(os.environ.get(WAIT_ENV, "24"))))
    _current = DistContext(rank, world, local_rank, local_world, backend)
    if rank != 0:  # one voice in the logs; errors still reach stderr through torchrun
        logging.getLogger("medseg").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%d on this machine), backend %s", world, local_world, backend)
    return _current


def shutdown() -> None:
    """Leave the process group once every process's work is done.

    Only after success: after an exception the process just exits, since tearing down an
    NCCL communicator can itself wait for the others, and torchrun stops them anyway.
    """
    global _current, _control_group
    if dist.is_available() and dist.is_initialized():
        _current.barrier()  # all done: nobody tears down a group another still uses
        dist.destroy_process_group()
    _current, _control_group = DistContext(), None


def process_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each process of a multi-GPU job takes the GPU of its local rank."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def launch(argv: Sequence[str], nproc: int, device_name: str = "auto") -> int:
    """Run ``medseg <argv>`` in ``nproc`` processes on this machine through ``torchrun --standalone``.

    Args:
        argv: the ``medseg`` arguments of every worker.
        nproc: processes on this machine.
        device_name: the config's ``train.device`` (GPU runs need a GPU per process).

    Returns:
        0 when every worker succeeded.

    Raises:
        UsageError: more processes than GPUs on a GPU machine.
        DistributedRunError: a worker failed or was killed; torchrun has stopped the rest.
    """
    if torch.cuda.is_available() and not device_name.startswith("cpu") and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); use at most that "
                         "many processes, or --set train.device=cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "-m", "medseg", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))  # torchrun would set 1
    code = subprocess.call(command, env=env)
    if code != 0:
        raise DistributedRunError(
            f"distributed run failed: torchrun exited with code {code} after a worker failed or was killed "
            "(its traceback and rank are printed above; a signal such as SIGKILL often means out of memory). "
            "The other workers were stopped. Fix the cause, then continue with --resume")
    return 0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
