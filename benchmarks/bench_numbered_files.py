"""Issue #32: a folder of numbered scans is one case per file for a one-channel model, and nnU-Net
channel files are still one case of C channels for a C-channel model.

1. PneumoniaMNIST (the official ``.npz``): trains ``configs/medmnist_pneumonia.yaml`` with
   :func:`medseg.train` on a short budget (or reuses a finished run folder given with ``--model``)
   and reads the run's own ``test/auc`` from its ``summary.json``. Then writes the 624 official test
   images as ``test_0000.nii.gz`` ... ``test_0623.nii.gz`` (one 1-channel NIfTI each, written as
   ``medseg manifest build --from-medmnist`` writes them), runs ``medseg predict`` on that folder as
   a child process, and checks that ``predictions.csv`` has 624 rows, one case per file, and that
   the AUC of ``prob_pneumonia`` against the official test labels equals the run's test AUC (and
   each case's probability the run's own ``evaluation/test_cases.csv``).
2. nnU-Net layout: a seeded 2-channel dataset (``imagesTr/case_XXX_0000/_0001.nii.gz``,
   ``labelsTr/``, ``dataset.json`` with ``channel_names``) goes through ``medseg manifest build``
   (every case 2 images), a tiny 2-channel U-Net is trained on it for 2 epochs, and ``medseg
   predict`` on 3 unseen cases of 2 channel files each must give 3 cases of 2 channels.

Writes ``benchmarks/results/numbered_files.{json,md}``. About 4 minutes on this project's 2-core CPU
(4 epochs under a 6-minute cap).

Usage:
    python benchmarks/bench_numbered_files.py [--npz ../shared/data/medmnist/pneumoniamnist.npz]
        [--model RUN_DIR] [--epochs 4] [--minutes 6] [--work DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_results import REPO, git_state, machine  # noqa: E402

from medseg.io.atomic import atomic_write_text  # noqa: E402

CONFIG = "configs/medmnist_pneumonia.yaml"
NPZ = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
RESULTS = REPO / "benchmarks" / "results"
TOLERANCE = 1e-4
log = logging.getLogger("bench_numbered_files")


# ------------------------------------------------------------------------------- the two commands


def medseg_cli(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run ``medseg ARGS`` as a child process; (exit code, the command as shown, seconds)."""
    shown = "medseg " + shlex.join(args)
    log.info("%s", shown)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "medseg", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1):  # 1: some cases failed, which the checks below report
        raise SystemExit(f"`{shown}` exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.returncode, shown, seconds


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ 1. PneumoniaMNIST


def train_pneumonia(npz: Path, work: Path, epochs: int, minutes: float) -> Path:
    """Import the npz into ``work`` and train the config on it; the run folder."""
    import medseg

    data = work / "pneumoniamnist"
    medseg.import_medmnist(npz, out=work / "medmnist_pneumonia.csv", data_dir=data, progress=False)
    result = medseg.train(REPO / CONFIG, progress=False, overrides=[
        f"data.manifest={work / 'medmnist_pneumonia.csv'}", f"data.root={data}", f"output_dir={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"train.max_epochs={epochs}",
        f"train.max_minutes={minutes}", "validation.tsne=false"])
    if result is None:
        raise SystemExit(f"{CONFIG}: medseg.train returned no result")
    return Path(result.run_dir)


def write_numbered(images: np.ndarray, folder: Path) -> list[Path]:
    """``test_0000.nii.gz`` ... one grey NIfTI per image, oriented as the MedMNIST importer writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"test_{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T), np.eye(4)), path)
        paths.append(path)
    return paths


def pneumonia(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    with np.load(args.npz) as npz:
        images, labels = npz["test_images"], npz["test_labels"].reshape(-1).astype(int)
    started = time.monotonic()
    run_dir = args.model.resolve() if args.model else train_pneumonia(args.npz, work, args.epochs, args.minutes)
    train_minutes = None if args.model else (time.monotonic() - started) / 60
    summary = json.loads((run_dir / "summary.json").read_text())
    run_auc = float(summary["metrics"]["test/auc"])
    written = write_numbered(images, work / "test")
    out = work / "predicted"
    code, shown, seconds = medseg_cli(["predict", "--model", str(run_dir / "model"), "--input", str(work / "test"),
                                       "--output", str(out), "--tracking-uri", summary["tracking_uri"],
                                       "--no-progress"], REPO)
    rows = read_rows(out / "predictions.csv")
    predict_summary = json.loads((out / "predict_summary.json").read_text())
    ok = [r for r in rows if r["status"] == "ok"]
    ids = [r["case_id"] for r in rows]
    expected_ids = [p.name.removesuffix(".nii.gz") for p in written]
    by_id = {r["case_id"]: r for r in ok}
    probs = np.array([float(by_id[i]["prob_pneumonia"]) for i in expected_ids if i in by_id])
    predict_auc = float(roc_auc_score(labels, probs)) if len(probs) == len(labels) else None
    # the run's own per-case probabilities on the test split (manifest path) against the folder path
    evaluated = {r["case_id"]: r for r in read_rows(run_dir / "evaluation" / "test_cases.csv")}
    run_probs = np.array([float(evaluated[f"pneumoniamnist_test_{i:05d}"]["prob_pneumonia"])
                          for i in range(len(labels))])
    eval_auc = float(roc_auc_score(labels, run_probs))
    diff = np.abs(probs - run_probs) if predict_auc is not None else np.array([np.inf])
    agree = float(np.mean([int(by_id[i]["predicted"]) == int(evaluated[f"pneumoniamnist_test_{k:05d}"]["predicted"])
                           for k, i in enumerate(expected_ids) if i in by_id]))
    return {
        "npz": str(args.npz), "config": CONFIG, "run_dir": str(run_dir), "run_id": summary["run_id"],
        "reused_run": args.model is not None, "epochs": summary["metrics"].get("train/epochs"),
        "train_minutes": summary["metrics"].get("train/minutes"), "train_wall_minutes": train_minutes,
        "files_written": len(written), "predict_command": shown.replace(str(work), "<work>"),
        "predict_exit_code": code, "predict_seconds": round(seconds, 1),
        "predict_backend": predict_summary["backend"], "discovery_notes": predict_summary["discovery_notes"],
        "rows": len(rows), "rows_ok": len(ok), "distinct_case_ids": len(set(ids)),
        "case_ids_are_the_file_names": sorted(ids) == expected_ids,
        "inputs_one_file_each": all(";" not in r["input"] for r in rows),
        "run_test_auc": run_auc, "run_evaluation_csv_auc": eval_auc, "predict_auc": predict_auc,
        "auc_difference": None if predict_auc is None else abs(predict_auc - run_auc),
        "max_probability_difference": float(diff.max()), "predicted_class_agreement": agree,
        "test_labels": {str(k): int((labels == k).sum()) for k in (0, 1)},
    }


# ------------------------------------------------------------------------------- 2. nnU-Net layout


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two channels and a label: a blob bright in T1, dark in T2."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    centre = np.array([rng.uniform(0.35, 0.65) * s for s in shape])
    label = (np.linalg.norm(grid - centre, axis=-1) < rng.uniform(0.18, 0.25) * min(shape)).astype(np.uint8)
    t1 = rng.normal(0.0, 0.3, shape).astype(np.float32) + 1.5 * label + 10.0
    t2 = rng.normal(0.0, 0.3, shape).astype(np.float32) - 1.0 * label + 5.0
    return t1, t2, label


def nnunet_two_channels(work: Path, seed: int = 0) -> dict[str, Any]:
    import yaml

    import medseg
    from medseg.engine.model_format import read_model_folder

    rng = np.random.default_rng(seed)
    root, shape, affine = work / "Dataset900_TwoChannel", (24, 20, 16), np.diag([1.0, 1.0, 2.0, 1.0])
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        t1, t2, label = _case(rng, shape)
        nib.save(nib.Nifti1Image(t1, affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(t2, affine), root / "imagesTr" / f"case_{i:03d}_0001.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    for i in range(100, 103):
        t1, t2, _ = _case(rng, shape)
        nib.save(nib.Nifti1Image(t1, affine), root / "imagesTs" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(t2, affine), root / "imagesTs" / f"case_{i:03d}_0001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "blob": 1},
        "numTraining": 6, "file_ending": ".nii.gz"}))
    manifest = work / "two_channel.csv"
    _, build_shown, _ = medseg_cli(["manifest", "build", "--from", str(root), "--out", str(manifest),
                                    "--val-fraction", "0.34", "--seed", "0"], REPO)
    built = read_rows(manifest)
    cfg = {"task": "segmentation", "seed": 0, "output_dir": str(work / "runs_2ch"),
           "data": {"manifest": str(manifest), "root": str(root), "labels": {0: "background", 1: "blob"},
                    "channels": ["T1", "T2"]},
           "preprocess": {"orientation": "RAS", "spacing": [1.0, 1.0, 2.0], "intensity": {"mode": "zscore"}},
           "patch": {"size": [16, 16, 8], "samples_per_volume": 2},
           "model": {"name": "unet", "channels": [4, 8, 16], "num_res_units": 1},
           "optim": {"lr": 0.01},
           "train": {"max_epochs": 2, "batch_size": 2, "val_interval": 1, "num_threads": 1},
           "validation": {"overlays": 0, "hd95": False},
           "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "numbered-files-2ch"}}
    config = work / "two_channel.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = medseg.train(config, progress=False)
    if result is None:
        raise SystemExit(f"{config}: medseg.train returned no result")
    out = work / "predicted_2ch"
    code, shown, _ = medseg_cli(["predict", "--model", str(Path(result.run_dir) / "model"), "--input",
                                 str(root / "imagesTs"), "--output", str(out), "--tracking-uri",
                                 f"sqlite:///{work / 'mlflow.db'}", "--no-progress"], REPO)
    rows = read_rows(out / "predictions.csv")
    contract = read_model_folder(Path(result.run_dir) / "model").contract
    return {
        "folder": "imagesTr: 6 cases x case_XXX_0000/_0001.nii.gz + labelsTr, imagesTs: 3 cases x 2 channel files",
        "manifest_build_command": build_shown.replace(str(work), "<work>"),
        "manifest_cases": len(built),
        "manifest_images_per_case": sorted({len(r["image"].split(";")) for r in built}),
        "model_in_channels": contract.get("in_channels"),
        "predict_command": shown.replace(str(work), "<work>"), "predict_exit_code": code,
        "cases": [{"case_id": r["case_id"], "status": r["status"],
                   "channel_files": [Path(p).name for p in r["input"].split(";")]} for r in rows],
    }


# ----------------------------------------------------------------------------------------- report


def checks(result: dict[str, Any]) -> dict[str, bool]:
    p, n = result["pneumonia"], result["nnunet"]
    return {
        "624 files -> 624 cases, each its own file": p["rows"] == p["rows_ok"] == p["distinct_case_ids"] == 624
        and p["case_ids_are_the_file_names"] and p["inputs_one_file_each"],
        f"predict AUC = run's test AUC (within {TOLERANCE:g})": p["auc_difference"] is not None
        and p["auc_difference"] <= TOLERANCE,
        "2-channel manifest build: every case 2 images": n["manifest_images_per_case"] == [2],
        "2-channel predict: 3 cases of 2 channel files": len(n["cases"]) == 3
        and all(c["status"] == "ok" and c["channel_files"] == [f"{c['case_id']}_{k:04d}.nii.gz" for k in (0, 1)]
                for c in n["cases"]),
    }


def render(result: dict[str, Any]) -> str:
    p, n = result["pneumonia"], result["nnunet"]
    how = ("the reused run " + p["run_dir"]) if p["reused_run"] else \
        f"`{CONFIG}` trained with `medseg.train` ({p['epochs']:.0f} epochs, {p['train_minutes']:.1f} min)"
    lines = [
        "# Numbered files: one case per scan, channel files one case (issue #32)", "",
        f"Written by `{result['command']}` on {result['date'][:10]} (commit {result['git']['commit'][:12]}"
        f"{', uncommitted changes' if result['git']['uncommitted_changes'] else ''}), "
        f"{result['machine']['cpu']}, {result['machine']['cpus_usable']} CPUs, torch {result['machine']['torch']}; "
        f"{result['minutes']:.1f} min in all.", "",
        "## PneumoniaMNIST test split as 624 numbered files, 1-channel model", "",
        f"The 624 official test images written as `test_0000.nii.gz` … `test_0623.nii.gz` (one grey NIfTI each) "
        f"and predicted with `{p['predict_command']}` by {how}.", "",
        "| files | predictions.csv rows | ok | distinct cases | predict AUC | run's test AUC | difference | "
        "max per-case probability difference | same predicted class |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {p['files_written']} | {p['rows']} | {p['rows_ok']} | {p['distinct_case_ids']} | "
        f"{p['predict_auc']:.6f} | {p['run_test_auc']:.6f} | {p['auc_difference']:.1e} | "
        f"{p['max_probability_difference']:.1e} | {100 * p['predicted_class_agreement']:.1f}% |", "",
        f"The run's test AUC is its `summary.json` `test/auc` (full-precision probabilities); from its own "
        f"`evaluation/test_cases.csv` (the manifest path, probabilities rounded to 6 decimals as in "
        f"predictions.csv) the same AUC is {p['run_evaluation_csv_auc']:.6f}. The per-case difference compares "
        f"each file's `prob_pneumonia` with that CSV. Predict backend: {p['predict_backend']}; discovery notes: "
        f"{len(p['discovery_notes'])}.", "",
        "## nnU-Net layout, 2-channel model", "",
        f"{n['folder']}; `{n['manifest_build_command']}` gave {n['manifest_cases']} cases of "
        f"{'/'.join(str(c) for c in n['manifest_images_per_case'])} images; a tiny U-Net with "
        f"in_channels={n['model_in_channels']} trained 2 epochs, then `{n['predict_command']}`:", "",
        "| case | status | channel files |", "|---|---|---|",
        *[f"| {c['case_id']} | {c['status']} | {', '.join(c['channel_files'])} |" for c in n["cases"]], "",
        "## Checks", "",
        *[f"- {'pass' if ok else 'FAIL'}: {name}" for name, ok in result["checks"].items()],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=NPZ, help="pneumoniamnist.npz (official MedMNIST file)")
    parser.add_argument("--model", type=Path, help="a finished medmnist_pneumonia run folder to reuse (no training)")
    parser.add_argument("--epochs", type=int, default=4, help="train.max_epochs of the short run")
    parser.add_argument("--minutes", type=float, default=6.0, help="train.max_minutes of the short run")
    parser.add_argument("--work", type=Path, help="imported data, runs and predictions (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.npz.is_file():
        raise SystemExit(f"--npz {args.npz}: file not found; the official pneumoniamnist.npz is in "
                         "../shared/data/medmnist/ beside the clone")
    started = time.monotonic()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_numbered_files_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    options = [*([] if args.npz.resolve() == NPZ.resolve() else ["--npz", str(args.npz)]),
               *(["--model", str(args.model)] if args.model else []),
               *([] if args.epochs == 4 else ["--epochs", str(args.epochs)]),
               *([] if args.minutes == 6.0 else ["--minutes", f"{args.minutes:g}"])]
    command = shlex.join(["python", "benchmarks/bench_numbered_files.py", *options])
    result: dict[str, Any] = {"command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "git": git_state(), "machine": machine(),
                              "pneumonia": pneumonia(args, work), "nnunet": nnunet_two_channels(work)}
    result["checks"] = checks(result)
    result["minutes"] = (time.monotonic() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "numbered_files.json", json.dumps(result, indent=1, default=str) + "\n")
    text = render(result)
    atomic_write_text(args.out / "numbered_files.md", text)
    print(text)
    if not all(result["checks"].values()):
        raise SystemExit("numbered files: a check failed (see above)")


if __name__ == "__main__":
    main()
