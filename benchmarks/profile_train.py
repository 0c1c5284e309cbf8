"""Where a training epoch spends its time, stage by stage: medseg's training loop against the MONAI
tutorial loop of bench_perf.py's W4 (configs/msd_hippocampus.yaml on MSD Task04 Hippocampus), the
same network, patches and augmentations, in one run.

Stages of each optimiser step (seconds per epoch: the mean step of the epochs after the first, times
the steps of an epoch):

- data: from the end of one optimiser step to the next forward pass: waiting for the loader's batch,
  moving it to the device, zeroing the gradients, and anything else the loop does between steps --
  at an epoch's first step, the end of the epoch before (medseg: its checkpoint and logging)
- forward: the network's forward passes (an outermost module with parameters)
- loss + backward: from the end of the forward pass to the optimiser step: the loss, its backward
  pass, gradient scaling or clipping
- step: the optimiser's ``step``

Both loops are timed by the same global hooks (``torch.nn.modules.module.register_module_forward_*_hook``
and ``torch.optim.optimizer.register_optimizer_step_*_hook``) in the worker's process; nothing in
medseg or the tutorial loop changes. The compute stages (forward, loss + backward, step) bound what a
faster data path can buy: medseg's epoch cannot be shorter than its compute, so plain MONAI's epoch
over medseg's compute is the most W4's ratio can reach with this network on this machine.

Usage: python benchmarks/profile_train.py [--epochs 3] [--repeats 1] [--out benchmarks/results] [--tiny]

Both loops take torch's default threads (the machine's cores), as ``make bench``'s W4 does, unless
``OMP_NUM_THREADS`` says otherwise (then the command in the results file says so).

Each path runs in its own child process (bench_perf.py's W4 worker), the paths interleaved. ``--tiny``
(benchmarks/tiny.py): bench_perf's tiny W4 (3 training cases, a small U-Net), 2 epochs, the workers in
this process; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_perf  # noqa: E402
from interleaved import run_child  # noqa: E402
from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest  # noqa: E402

STAGES = ("data", "forward", "loss_backward", "step")
COMPUTE = ("forward", "loss_backward", "step")
PATHS = ("plain", "medseg")


class StageClock:
    """Per optimiser step, the seconds of each of :data:`STAGES`, from global module and optimiser hooks."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._depth = 0
        self._outer_has_params = False
        self._current = dict.fromkeys(STAGES, 0.0)
        self._mark: float | None = None  # end of the last step (None before the first forward)
        self._forward_start = self._forward_end = self._step_start = 0.0
        self._handles: list[Any] = []

    def install(self) -> StageClock:
        from torch.nn.modules import module
        from torch.optim import optimizer

        self._handles = [module.register_module_forward_pre_hook(self._pre_forward),
                         module.register_module_forward_hook(self._post_forward),
                         optimizer.register_optimizer_step_pre_hook(self._pre_step),
                         optimizer.register_optimizer_step_post_hook(self._post_step)]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_forward(self, module: Any, _inputs: Any) -> None:
        if self._depth == 0:
            # only a module with parameters is the network (a loss is a parameterless module)
            self._outer_has_params = any(True for _ in module.parameters())
            if self._outer_has_params:
                now = time.perf_counter()
                if self._mark is not None and self._forward_end <= self._mark:  # first forward of a step
                    self._current["data"] += now - self._mark
                self._forward_start = now
        self._depth += 1

    def _post_forward(self, _module: Any, _inputs: Any, _output: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._outer_has_params:
            self._forward_end = time.perf_counter()
            self._current["forward"] += self._forward_end - self._forward_start

    def _pre_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self._step_start = time.perf_counter()
        self._current["loss_backward"] += self._step_start - self._forward_end

    def _post_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self._mark = time.perf_counter()
        self._current["step"] += self._mark - self._step_start
        self.steps.append(self._current)
        self._current = dict.fromkeys(STAGES, 0.0)


def per_epoch(steps: list[dict[str, float]], epochs: int) -> dict[str, Any]:
    """Each stage's seconds per epoch over the epochs after the first (the first builds caches and
    warms up), from the steps' stage times; an epoch has len(steps) / epochs steps."""
    if epochs < 2 or not steps or len(steps) % epochs:
        raise SystemExit(f"expected the same number of optimiser steps in each of {epochs} epochs (2 or more); "
                         f"got {len(steps)} steps")
    per = len(steps) // epochs
    later = steps[per:]
    return {"steps_per_epoch": per, **{stage: statistics.fmean(s[stage] for s in later) * per for stage in STAGES}}


def worker(path: str, epochs: int, work: Path) -> dict[str, Any]:
    """One W4 training of ``path`` with the stage clock installed: its stages and epoch times."""
    clock = StageClock().install()
    try:
        result = bench_perf.worker_w4(path, epochs, work)
    finally:
        clock.remove()
    import torch

    return {"path": path, "epoch_s": result["epoch_s"], "stages": per_epoch(clock.steps, epochs),
            "threads": torch.get_num_threads()}


def _child(work: Path, path: str, epochs: int, tiny: bool) -> dict[str, Any]:
    extra = ["--work", str(work), "--epochs", str(epochs), *(["--tiny"] if tiny else [])]
    return run_child(__file__, path, extra, REPO, main if tiny else None)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per path, the median over repetitions of each stage and of the later epochs' wall time; the bound
    on medseg's ratio that its compute sets."""
    summary: dict[str, Any] = {}
    for path, results in runs.items():
        row = {stage: statistics.median(r["stages"][stage] for r in results) for stage in STAGES}
        row["compute"] = sum(row[stage] for stage in COMPUTE)
        row["cycle"] = sum(row[stage] for stage in STAGES)  # an epoch of step cycles, its end included
        row["epoch_s"] = statistics.median(e for r in results for e in r["epoch_s"][1:])  # the loop's own timer
        row["steps_per_epoch"] = results[0]["stages"]["steps_per_epoch"]
        row["threads"] = results[0]["threads"]
        summary[path] = row
    plain, medseg = summary["plain"], summary["medseg"]
    summary["ratio"] = plain["cycle"] / medseg["cycle"]
    summary["ratio_own_timers"] = plain["epoch_s"] / medseg["epoch_s"]  # as perf.md's W4 row
    summary["bound"] = plain["cycle"] / medseg["compute"]  # medseg's data stage at zero
    summary["repeats"] = len(runs["plain"])
    return summary


def markdown(summary: dict[str, Any], command: str, load: tuple[float, float], machine: str) -> str:
    plain, medseg = summary["plain"], summary["medseg"]
    names = {"data": "data and between steps (loader wait, to device, zero_grad; an epoch's end)", "forward": "forward",
             "loss_backward": "loss + backward", "step": "optimiser step"}
    lines = ["| stage | plain MONAI s/epoch | share | medseg s/epoch | share | plain / medseg |", "|---|---|---|---|---|---|"]
    for stage in (*STAGES, "compute"):
        label = "**compute** (forward + loss/backward + step)" if stage == "compute" else names[stage]
        lines.append(f"| {label} | {plain[stage]:.2f} | {plain[stage] / plain['cycle']:.0%} | {medseg[stage]:.2f} | "
                     f"{medseg[stage] / medseg['cycle']:.0%} | {plain[stage] / max(medseg[stage], 1e-9):.2f}x |")
    lines.append(f"| **epoch** (all stages) | **{plain['cycle']:.2f}** | 100% | **{medseg['cycle']:.2f}** | 100% | "
                 f"**{summary['ratio']:.2f}x** |")
    lines.append(f"| epoch by each loop's own timer (perf.md's W4) | {plain['epoch_s']:.2f} | | {medseg['epoch_s']:.2f} | | "
                 f"{summary['ratio_own_timers']:.2f}x |")
    return "\n".join([
        "Where a W4 training epoch (configs/msd_hippocampus.yaml on MSD Task04 Hippocampus, the epochs after the first) "
        "spends its time: plain MONAI's tutorial loop against medseg's, the same network, patches and augmentations "
        f"(`python benchmarks/profile_train.py`; stages as its docstring defines them). {plain['steps_per_epoch']} "
        f"optimiser steps per epoch (plain), {medseg['steps_per_epoch']} (medseg); torch threads {plain['threads']} "
        f"(plain), {medseg['threads']} (medseg); the median of {summary['repeats']} run(s) of each.", "", *lines, "",
        f"**What bounds the ratio:** medseg's compute stages take {medseg['compute']:.2f} s of its {medseg['cycle']:.2f} s "
        f"epoch; even with its data stage at zero, plain MONAI's {plain['cycle']:.2f} s epoch over that compute is "
        f"**{summary['bound']:.2f}x**, the most this network allows on this machine "
        f"({'below' if summary['bound'] < 2 else 'at or above'} the 2x target).", "",
        f"Written by `{command}`; {machine}; load average {load[0]:.1f} before, {load[1]:.1f} after (1 min)"
        f"{' -- **other work shared the 2-core host** (load above 2)' if max(load) > 2 else ''}.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per worker (the first is left out)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    if args.tiny:
        bench_perf.SCALE, args.epochs, args.repeats = bench_perf.TINY, 2, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.epochs, args.work)))
        return
    out = results_folder(args)
    work = args.work or scratch_folder("profile_train_", args, out)
    if bench_perf.SCALE.w4_cases:
        subset_manifest(REPO / "data_manifests" / "msd_hippocampus.csv", work / "w4_manifest.csv",
                        dict(bench_perf.SCALE.w4_cases))
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    for repeat in range(args.repeats):  # interleaved, the order alternated
        for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
            runs[path].append(_child(work, path, args.epochs, args.tiny))
    summary = summarise(runs)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/profile_train.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_stages.json").write_text(json.dumps({"runs": runs, "summary": summary, "command": command,
                                                        "epochs": args.epochs, "repeats": args.repeats}, indent=1))
    (out / "train_stages.md").write_text(markdown(summary, command, (load_before, os.getloadavg()[0]),
                                                  bench_perf._machine()))
    print((out / "train_stages.md").read_text())


if __name__ == "__main__":
    main()
