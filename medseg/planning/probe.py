"""The probe: a few real training steps of candidate plans on the device in use.

nnU-Net sizes a plan for a reference GPU's memory. What decides a plan under a time budget is
how long a training step takes *here*: on one 2-core CPU bf16 autocast runs the 3D U-Net step
2.2x faster than fp32, on another it is slower; a channels-last layout helps one network and not
another. So the planner times each candidate's forward + backward + optimiser step on the device
(:func:`time_steps`), within a fixed overall budget (at most 60 s), and only takes a reduced
precision after :func:`same_loss_curve` showed it trains like fp32 on a few steps.

Everything here builds the network and the loss through the task (``task.build_network``,
``task.create_loss``) from a validated config, so the probe times exactly what ``medseg run``
will train.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from medseg.config import Precision
from medseg.engine.runtime import autocast, autocast_dtype, to_channels_last

log = logging.getLogger(__name__)

#: The whole probe (every candidate, precision check included) stays under this.
PROBE_SECONDS = 60.0
#: Timed steps per candidate after one warm-up step. The fastest is kept: anything else running
#: on the machine only ever adds time to a step, so the minimum is the step's own cost.
TIMED_STEPS = 4
#: Below this share of its threads' time (median over the timed steps), the probe's process was
#: crowded out by other work: a quiet 2-core host gives 0.85-1.0 (serial parts of a step idle the
#: other thread), one shared with a docs build about 0.3.
BUSY_CPU_SHARE = 0.6
#: How a crowded measurement's note starts.
CROWDED = "machine busy"
#: Steps of the fp32-vs-reduced-precision loss-curve check.
CURVE_STEPS = 8
#: A reduced precision must stay within this relative distance of fp32's loss at every step.
CURVE_TOLERANCE = 0.05

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ProbeResult:
    """One candidate's measurement (``seconds_per_step`` is None when it was skipped or failed)."""

    name: str
    precision: str
    channels_last: bool
    seconds_per_step: float | None
    peak_memory_mb: float | None
    parameters: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "channels_last": self.channels_last,
                "seconds_per_step": None if self.seconds_per_step is None else round(self.seconds_per_step, 4),
                "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 1),
                "parameters": self.parameters, "note": self.note}


class ProbeClock:
    """What remains of the probe's time budget."""

    def __init__(self, seconds: float = PROBE_SECONDS):
        self.seconds = seconds
        self.started = time.perf_counter()

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    @property
    def used(self) -> float:
        return time.perf_counter() - self.started


def reduced_precisions(device: torch.device) -> list[Precision]:
    """The precisions worth timing against fp32 here: bf16 on a CPU (torch runs its autocast on
    any x86/ARM CPU; whether it is *faster* is the probe's question); fp16 and, where the GPU has
    it, bf16 on CUDA."""
    if device.type == "cuda":
        return [Precision.FP16] + ([Precision.BF16] if torch.cuda.is_bf16_supported() else [])
    return [Precision.BF16]


def _peak_memory_mb(device: torch.device) -> float | None:
    """The candidate's peak device memory on a GPU; None on a CPU, where torch keeps no per-allocation
    count (the process's peak RSS, :func:`process_peak_rss_mb`, bounds all candidates together)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def process_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _train_steps(task: Any, cfg: Any, batch: Batch, device: torch.device, precision: Precision,
                 channels_last: bool, steps: int, seed: int = 0) -> tuple[list[tuple[float, float, float]], int]:
    """(wall seconds, loss, this process's CPU seconds) of ``steps`` AdamW steps on one fixed batch,
    from a seeded initialisation, and the network's parameter count."""
    torch.manual_seed(seed)
    network = task.build_network(cfg).to(device)
    dims = int(cfg.model.spatial_dims)
    if channels_last:
        network = to_channels_last(network, dims)
    loss_fn = task.create_loss(cfg)
    optimiser = torch.optim.AdamW(network.parameters(), lr=float(cfg.optim.lr))
    images, labels = (t.to(device) for t in batch)
    if channels_last:
        images = to_channels_last(images, dims)
    dtype = autocast_dtype(precision, device)
    out: list[tuple[float, float, float]] = []
    network.train()
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        with autocast(dtype, device):
            loss = loss_fn(network(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - started, float(loss.detach()), time.process_time() - cpu_started))
    return out, sum(p.numel() for p in network.parameters())


def time_steps(task: Any, cfg: Any, batch: Batch, device: torch.device, precision: Precision, channels_last: bool,
               name: str, clock: ProbeClock) -> ProbeResult:
    """Median seconds per training step of ``cfg``'s network on ``batch`` (one warm-up step first).

    Stops early (and says so) when the probe's clock runs out; a candidate that does not fit in
    memory is recorded as failed, not raised.
    """
    if clock.left <= 0:
        return ProbeResult(name, str(precision), channels_last, None, None, note="skipped: probe time used up")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        runs, parameters = _train_steps(task, cfg, batch, device, precision, channels_last, 1 + TIMED_STEPS)
    except (RuntimeError, MemoryError) as err:  # out of memory, or an op without a kernel at this precision
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return ProbeResult(name, str(precision), channels_last, None, None, note=f"failed: {str(err)[:120]}")
    fastest, note = _step_seconds(runs[1:], device)
    return ProbeResult(name, str(precision), channels_last, fastest, _peak_memory_mb(device), parameters, note)


def _step_seconds(steps: list[tuple[float, float, float]], device: torch.device) -> tuple[float, str]:
    """A step's own cost from timed steps -- the fastest wall time -- and a note when other
    processes held the CPU cores for most of every step.

    The minimum is enough against a short interruption. A machine busy with other work for the
    whole probe (a docs build, another training) makes every step slow, and unevenly so between
    candidates timed seconds apart: that once made bf16 look 2x faster than fp32 on a host where
    it is 7x slower. CPU time does not undo it (threads spinning at a barrier while a peer waits
    for a core count as work), so a crowded probe is only said, and reduced precision is not
    chosen on it (:func:`crowded`).
    """
    fastest = min(wall for wall, _, _ in steps)
    if device.type != "cpu":
        return fastest, ""
    threads = max(1, torch.get_num_threads())
    shares = sorted(cpu / (wall * threads) for wall, _, cpu in steps if wall > 0)
    share = shares[len(shares) // 2] if shares else 1.0
    if share >= BUSY_CPU_SHARE:
        return fastest, ""
    return fastest, f"{CROWDED}: this process had {share:.0%} of its {threads} threads' time"


def crowded(result: ProbeResult) -> bool:
    """Whether other work crowded this measurement out (its time says little about this machine)."""
    return result.note.startswith(CROWDED)


def crowded_probe_notes(probe: list[ProbeResult]) -> list[str]:
    """The plan's note when other work crowded any of the probe's measurements out."""
    if not any(crowded(result) for result in probe):
        return []
    return ["the machine was busy while the probe timed training steps (other processes held most of the CPU): "
            "its step times are too long, so this plan trains less than a quiet machine allows, and no layout or "
            "precision was chosen over the default on them. Plan again when the machine is quiet"]


def same_loss_curve(task: Any, cfg: Any, batch: Batch, device: torch.device, precision: Precision,
                    channels_last: bool) -> tuple[bool, float, list[float], list[float]]:
    """Train the same initialisation on the same batch for :data:`CURVE_STEPS` steps in fp32 and
    in ``precision``; True when every step's loss is within :data:`CURVE_TOLERANCE` (relative) of
    fp32's and the reduced-precision run ends no higher. Returns (same, worst relative gap, fp32
    losses, reduced-precision losses)."""
    reference = [step[1] for step in _train_steps(task, cfg, batch, device, Precision.FP32, channels_last,
                                                  CURVE_STEPS)[0]]
    reduced = [step[1] for step in _train_steps(task, cfg, batch, device, precision, channels_last, CURVE_STEPS)[0]]
    gaps = [abs(r - f) / max(abs(f), 1e-6) for f, r in zip(reference, reduced)]
    worst = max(gaps)
    same = all(math.isfinite(v) for v in reduced) and worst <= CURVE_TOLERANCE \
        and reduced[-1] <= reference[-1] * (1 + CURVE_TOLERANCE)
    return same, worst, reference, reduced


def with_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the nested config dict ``base`` with dotted-key ``overrides`` applied."""
    out = copy.deepcopy(dict(base))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


@dataclass(frozen=True)
class BudgetPick:
    """Which candidate :func:`pick_within_budget` chose, the steps it gets, and whether it reaches the goal."""

    index: int
    steps: int
    reaches_goal: bool


def pick_within_budget(seconds_per_step: list[float | None], budget_seconds: float, min_steps: float) -> BudgetPick | None:
    """The budget rule: candidates come richest first; take the first whose measured step time
    fits ``min_steps`` steps into ``budget_seconds``; when none does, the one that fits the most.
    Unmeasured candidates (None) are never taken; None when nothing was measured."""
    measured = [(i, budget_seconds / s) for i, s in enumerate(seconds_per_step) if s]
    if not measured:
        return None
    for index, steps in measured:
        if steps >= min_steps:
            return BudgetPick(index, int(steps), True)
    index, steps = max(measured, key=lambda m: m[1])
    return BudgetPick(index, int(steps), False)
