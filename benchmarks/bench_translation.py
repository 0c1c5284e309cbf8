"""Image-to-image translation benchmark: one MR contrast synthesised from others, the network
(recon.problem: translation) beside histogram matching, on held-out data.

Two datasets, each trained for ``--minutes`` on CPU and scored on its test split by the run's own
evaluate stage (MONAI's PSNR / SSIM / MAE per volume, every contrast scaled to [0, 1] per volume):

* **pgbm001**: TCIA Brain-Tumor-Progression PGBM-001 (../shared/data), four co-registered MR series
  (T1pre, T1post, T2, FLAIR) on one oblique grid of 24 slices, cut into 8 slabs of 3 slices:
  FLAIR is synthesised from T1pre, T1post and T2; slabs 0, 1, 2, 4, 7 train, 6 validates, 3 and 5
  are held out (the tumour's slices 13-20 are in slabs 4-6: one of each split). Histogram matching maps T2 onto the
  training FLAIR histogram.
* **phantom**: the known answer. MSD hippocampus scans (the manifest's first train / val / test
  cases) and a target made from each by a known monotone map (smoothstep on the scan scaled to
  [0, 1]), so a perfect translator exists. Histogram matching maps the scan onto the training
  targets' pooled histogram: exact only where a case's histogram equals the pool's.

Also reported: the mean TTA spread (the uncertainty), the share of test voxels the trusted mask keeps
(its threshold: the 90% quantile of the validation voxels' spread, ``trusted_coverage``) and the MAE
inside and outside it: an informative uncertainty puts the errors outside.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_translation.py [--minutes 6] [--datasets pgbm001,phantom]
       [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 3 PGBM slabs and 4 phantom cases, one short epoch each; for the
test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PGBM = SHARED / "tcia_brain_tumor_progression_pgbm001"
HIPPOCAMPUS = SHARED / "msd_task04_hippocampus"
HIPPOCAMPUS_MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
#: PGBM-001's series, in channel order, and the contrast synthesised
PGBM_CONTRASTS = {"T1pre": "T1prereg", "T1post": "T1post", "T2": "T2reg", "FLAIR": "FLAIRreg"}
PGBM_TARGET, PGBM_BASELINE = "FLAIR", "T2"
#: slab i of 3 slices -> split ("" leaves it out)
PGBM_SPLITS = ["train", "train", "train", "test", "train", "test", "val", "train"]
TINY_PGBM_SPLITS = ["train", "", "", "test", "", "", "val", ""]
PHANTOM_CASES = {"train": 40, "val": 6, "test": 12}
TINY_PHANTOM_CASES = {"train": 2, "val": 1, "test": 1}
DATASETS = ("pgbm001", "phantom")
HEADLINES = ("psnr", "ssim", "mae", "histmatch_psnr", "histmatch_ssim", "histmatch_mae", "uncertainty_mean",
             "trusted_fraction", "trusted_mae", "untrusted_mae")


def prepare_pgbm(folder: Path, tiny: bool) -> Path:
    """PGBM-001's four MR series (DICOM, read by medseg's reader) cut into slab cases; the manifest."""
    from medseg.io.readers import load_volume
    from medseg.tasks.reconstruction.translation_data import write_slabs

    volumes = {name: load_volume(PGBM / series) for name, series in PGBM_CONTRASTS.items()}
    affine = next(iter(volumes.values())).affine.numpy()
    contrasts = {name: v.as_tensor()[0].numpy() for name, v in volumes.items()}
    return write_slabs("pgbm001", contrasts, affine, 2, 3, TINY_PGBM_SPLITS if tiny else PGBM_SPLITS, folder,
                       folder / "manifest.csv")


def prepare_phantom(folder: Path, tiny: bool) -> Path:
    """Hippocampus scans and their monotone-map targets; the manifest."""
    import nibabel as nib
    import numpy as np

    from medseg.tasks.reconstruction.translation_data import write_monotone_phantoms

    wanted = dict(TINY_PHANTOM_CASES if tiny else PHANTOM_CASES)
    sources = []
    with open(HIPPOCAMPUS_MANIFEST, newline="") as fh:
        for row in csv.DictReader(fh):
            if wanted.get(row["split"], 0) > 0:
                wanted[row["split"]] -= 1
                image = nib.load(HIPPOCAMPUS / row["image"])
                sources.append((row["case_id"], np.asarray(image.dataobj, dtype=np.float32), image.affine, row["split"]))
    return write_monotone_phantoms(sources, folder, folder / "manifest.csv")


def config(dataset: str, manifest: Path, root: Path, scratch: Path, tracking: str, minutes: float,
           tiny: bool) -> dict[str, Any]:
    """The run config of one dataset (2D U-Net over axial slices, L1 + SSIM, flips)."""
    if dataset == "pgbm001":
        channels, translation = list(PGBM_CONTRASTS), {"target": PGBM_TARGET, "baseline_channel": PGBM_BASELINE}
        image_size, slices = [128, 128], 3
    else:
        channels, translation = ["scan", "target"], {"target": "target"}
        image_size, slices = [48, 64], 4
    budget = {"max_epochs": 1, "max_minutes": None, "iterations_per_epoch": 2} if tiny else \
        {"max_epochs": None, "max_minutes": minutes, "iterations_per_epoch": 50}
    return {
        "task": "reconstruction", "seed": 0, "output_dir": str(scratch / dataset / "runs"),
        "data": {"manifest": str(manifest), "root": str(root), "channels": channels, "cache": "memory"},
        "preprocess": {"orientation": "RAS", "spacing": None},
        "recon": {"problem": "translation", "image_size": image_size, "slice_axis": 2, "slices_per_volume": slices,
                  "translation": translation},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]}],
        "model": {"name": "unet", "channels": [4, 8, 16] if tiny else [16, 32, 64, 128],
                  "strides": [2, 2] if tiny else [2, 2, 2], "num_res_units": 1, "norm": "instance"},
        "loss": {"name": "l1_ssim", "ssim_weight": 0.84},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.00001, "schedule": "cosine"},
        "train": {**budget, "batch_size": 4, "val_interval": 1, "device": "cpu", "num_threads": 1},
        "validation": {"overlays": 0 if tiny else 1},
        "tracking": {"uri": tracking, "experiment": "bench-translation"}}


def run_dataset(dataset: str, scratch: Path, tracking: str, minutes: float, tiny: bool) -> dict[str, Any]:
    """Prepare, train and score one dataset: its entry in translation.json."""
    import medseg

    root = scratch / dataset / "data"
    manifest = (prepare_pgbm if dataset == "pgbm001" else prepare_phantom)(root, tiny)
    cfg = config(dataset, manifest, root, scratch, tracking, minutes, tiny)
    path = scratch / dataset / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    started = time.monotonic()
    result = medseg.train(path, progress=False)
    if result is None:
        raise SystemExit(f"{dataset}: medseg.train returned no result")
    with open(manifest, newline="") as fh:
        counts: dict[str, int] = {}
        for row in csv.DictReader(fh):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    metrics = result.metrics
    return {"cases": counts, "channels": cfg["data"]["channels"], "translation": cfg["recon"]["translation"],
            "run_id": result.run_id, "model_uri": result.model_uri, "epochs": metrics.get("train/epochs"),
            "minutes_budget": None if tiny else minutes, "wall_minutes": round((time.monotonic() - started) / 60, 2),
            "trust_threshold": metrics.get("best_val/trust_threshold"),
            "test": {k: _rounded(metrics.get(f"test/{k}")) for k in HEADLINES}}


def _rounded(value: float | None) -> float | None:
    return None if value is None or value != value or abs(value) == float("inf") else round(float(value), 5)


def markdown(report: dict[str, Any]) -> str:
    """The results page from every dataset in the report."""
    lines = ["# Image-to-image translation: the network vs histogram matching on held-out data", "",
             f"Written by `{report['command']}` on {report['host']} ({report['when']}).", "",
             f"**Host**: {report['host_note']}", "",
             "PSNR / SSIM / MAE: MONAI's, per test volume (PSNR and MAE over the volume, SSIM the mean over its "
             "axial slices, 7x7 uniform window), every contrast scaled to [0, 1] per volume (data range 1); the "
             "network's output is the mean over in-plane flips. Trusted: the voxels whose flip spread (standard "
             "deviation) is at most the threshold chosen on the validation split, the 90% quantile of its voxels' "
             "spread (recon.translation.trusted_coverage 0.9, no error budget).", "",
             "| dataset | test cases | epochs | method | PSNR dB | SSIM | MAE |", "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        t = d["test"]
        lines.append(f"| {name} | {d['cases'].get('test', 0)} | {d['epochs']} | network (U-Net, L1 + SSIM) | "
                     f"{_f(t['psnr'], 2)} | {_f(t['ssim'])} | {_f(t['mae'])} |")
        lines.append(f"| {name} | | | histogram matching | {_f(t['histmatch_psnr'], 2)} | {_f(t['histmatch_ssim'])} | "
                     f"{_f(t['histmatch_mae'])} |")
    lines += ["", "| dataset | mean uncertainty | trust threshold | trusted share | MAE trusted | MAE untrusted |",
              "|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        t = d["test"]
        lines.append(f"| {name} | {_f(t['uncertainty_mean'])} | {_f(d['trust_threshold'])} | "
                     f"{_f(t['trusted_fraction'], 3)} | {_f(t['trusted_mae'])} | {_f(t['untrusted_mae'])} |")
    lines.append("")
    for name, d in report["datasets"].items():
        lines.append(f"- **{name}**: {d['channels']} -> {d['translation']['target']} (splits {d['cases']}); run "
                     f"{d['run_id']}, model `{d['model_uri']}`, budget {d['minutes_budget']} min "
                     f"({d['wall_minutes']} min wall for training and evaluation).")
    lines += ["", "pgbm001: FLAIR from T1pre, T1post and T2 of PGBM-001, 8 slabs of 3 slices (train 0, 1, 2, 4, 7; "
              "val 6; test 3 and 5; the tumour is on slices 13-20, so in slabs 4, 5 and 6); the baseline matches T2 "
              "to the training FLAIR "
              "histogram. phantom: MSD hippocampus scans and a target 3x^2 - 2x^3 of each scan scaled to [0, 1] "
              "(a perfect translator exists); the baseline matches the scan to the training targets' histogram.",
              ""]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per dataset (default 6)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {DATASETS}")
    add_tiny_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a shared host: one core for this benchmark
    out = results_folder(args)
    scratch = scratch_folder("medseg-bench-translation-", args, out)
    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    path = out / "translation.json"
    report = json.loads(path.read_text()) if path.is_file() and not args.tiny else {"datasets": {}}
    report.update(command="OMP_NUM_THREADS=1 python benchmarks/bench_translation.py " + " ".join(argv),
                  host=f"{platform.node()} ({os.cpu_count()} CPUs)", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  host_note="a 2-core host shared with up to five other sessions (their training and tests ran "
                            "alongside); 1 torch thread; short CPU training (minutes), so the figures are those "
                            "of a briefly trained network, not of a converged one")
    for dataset in args.datasets.split(","):
        if dataset not in DATASETS:
            raise SystemExit(f"--datasets: {dataset!r} is not one of {DATASETS}")
        report["datasets"][dataset] = run_dataset(dataset, scratch, tracking, args.minutes, args.tiny)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        (out / "translation.md").write_text(markdown(report))
        print(f"{dataset}: {json.dumps(report['datasets'][dataset]['test'])}", flush=True)


if __name__ == "__main__":
    main()
