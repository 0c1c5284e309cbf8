"""Data-parallel training: ``medseg run --nproc 2`` beside one process, same config, same machine.

Both run the demo config (``configs/demo_segmentation.yaml``, 30 training cases, U-Net
16-32-64-128 on 32x48x32 patches) for a fixed number of epochs, interleaved, several
repetitions. Training epochs are timed from ``history.csv`` (validation only runs in the
last epoch, which is left out, as is the first: cache fill and warm-up). The comparison keeps
the global batch equal (1 process x batch 2 against 2 processes x batch 1), so both do the same
work per epoch and converge alike; a second 2-process variant keeps the per-process batch
(2 x 2: twice the global batch, half the steps).

Usage: python benchmarks/bench_ddp.py [--repeats 2] [--epochs 6] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 1 process x batch 2 and 2 processes x batch 1 for 3 epochs on 4
training and 2 validation cases, a U-Net of 4-32 channels, no temperature fit or mirroring, 1
repetition; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tiny import add_tiny_arguments, results_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_segmentation.yaml"
TINY_CASES = {"train": 4, "val": 2}
#: --tiny runs one variant of each kind (1 process, 2 processes): the third is the second with a larger batch
TINY_VARIANTS = ("1 process x batch 2", "2 processes x batch 1")
VARIANTS = {  # name -> (processes, batch per process)
    "1 process x batch 2": (1, 2),
    "2 processes x batch 1": (2, 1),
    "2 processes x batch 2": (2, 2),
}


def _run(nproc: int, batch: int, epochs: int, workdir: Path, manifest: Path | None = None) -> dict:
    out = workdir / f"n{nproc}b{batch}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "medseg", "run", str(CONFIG), "--nproc", str(nproc), "--no-progress",
               "--set", f"train.max_epochs={epochs}", "--set", "train.max_minutes=null",
               "--set", f"train.batch_size={batch}", "--set", "train.val_interval=1000",
               "--set", "validation.hd95=false", "--set", "validation.overlays=0",
               "--set", f"output_dir={out}", "--set", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]
    if manifest is not None:  # --tiny
        command += ["--set", f"data.manifest={manifest}", "--set", "model.channels=[4,8,16,32]",
                    "--set", "validation.calibrate=false", "--set", "validation.tta=false"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (run_dir,) = out.iterdir()
    with open(run_dir / "history.csv") as f:
        elapsed = [float(row["time/elapsed_min"]) * 60 for row in csv.DictReader(f)]
    epoch_seconds = [b - a for a, b in zip(elapsed, elapsed[1:])][:-1]  # epochs 2..E-1: training only
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"epoch_s": statistics.median(epoch_seconds), "epoch_s_all": epoch_seconds,
            "wall_s": time.monotonic() - started, "val_dice_mean": summary["metrics"].get("val/dice_mean")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    add_tiny_arguments(parser)
    args = parser.parse_args()
    if args.tiny:  # epochs 2..E-1 are timed: 3 epochs time one
        args.repeats, args.epochs = 1, 3
    out = results_folder(args)
    cores = len(os.sched_getaffinity(0))
    variants = {name: VARIANTS[name] for name in TINY_VARIANTS} if args.tiny else VARIANTS
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-ddp-") as tmp:
        manifest = (subset_manifest(REPO / "data_manifests" / "demo_hippocampus.csv", Path(tmp) / "tiny.csv",
                                    TINY_CASES) if args.tiny else None)
        for rep in range(args.repeats):
            for name, (nproc, batch) in variants.items():  # interleaved: machine noise hits all alike
                results[name].append(_run(nproc, batch, args.epochs, Path(tmp), manifest))
                print(f"rep {rep + 1} {name}: {results[name][-1]['epoch_s']:.2f} s/epoch", flush=True)
    base = statistics.median(r["epoch_s"] for r in results["1 process x batch 2"])
    rows = []
    for name, (nproc, batch) in variants.items():
        epoch_s = statistics.median(r["epoch_s"] for r in results[name])
        rows.append({"variant": name, "processes": nproc, "batch_per_process": batch, "global_batch": nproc * batch,
                     "epoch_s_median": epoch_s, "speedup_vs_1_process": base / epoch_s,
                     "val_dice_mean": [r["val_dice_mean"] for r in results[name]], "runs": results[name]})
    report = {"machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "cuda": torch.cuda.is_available()},
              "config": str(CONFIG.relative_to(REPO)), "epochs": args.epochs, "repeats": args.repeats, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(report, indent=2))
    lines = [f"# DDP on this machine ({cores} cores, {'CUDA' if torch.cuda.is_available() else 'CPU, gloo'})", "",
             f"`python benchmarks/bench_ddp.py --repeats {args.repeats} --epochs {args.epochs}`: "
             f"{report['config']}, median training-epoch time over epochs 2..{args.epochs - 1} and {args.repeats} "
             "interleaved repetitions.", "",
             "| variant | global batch | s / epoch | speed-up vs 1 process | val Dice after the run |",
             "|---|---|---|---|---|"]
    for row in rows:
        dice = ", ".join(f"{d:.3f}" for d in row["val_dice_mean"] if d is not None)
        lines.append(f"| {row['variant']} | {row['global_batch']} | {row['epoch_s_median']:.2f} | "
                     f"{row['speedup_vs_1_process']:.2f}x | {dice} |")
    (out / "ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
