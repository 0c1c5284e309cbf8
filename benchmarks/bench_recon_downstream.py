"""Accelerated MRI judged downstream: 4x and 8x undersampled hippocampus MRI, reconstructed, then
segmented by a frozen hippocampus segmenter.

For each acceleration (``--accelerations 4,8``):

1. **Train** the reconstruction model of ``configs/recon_mri_4x.yaml`` (``recon.acceleration`` set,
   equispaced Cartesian mask, 2D slices, ``unet_dc``) for ``--minutes`` on the manifest's train split,
   or reuse a finished run directory (``--recon-run 4=DIR,8=DIR``).
2. **Reconstruct** every slice of each held-out test volume with the reconstruction task's predict
   path (``medseg predict`` in its retrospective mode, ``medseg.Predictor``): the k-space of each slice
   is undersampled (seeded by the case id), and the network's reconstruction and the zero-filled
   baseline are written on the volume's own grid, in its intensity units.
3. **Judge downstream** with ``medseg.evaluate_downstream``: the frozen segmenter's Dice on the fully
   sampled, zero-filled and reconstructed volumes against the reference labels, beside PSNR/SSIM
   (MONAI's, 3D) against the fully sampled volume.

The segmenter is ``--segmenter`` (a model URI, with ``--tracking-uri``) or one trained here for
``--segmenter-minutes`` with ``configs/msd_hippocampus.yaml`` (bench_sr's). Each acceleration is written into ``recon_downstream.json`` as it finishes
(accelerations run as separate invocations keep each other's entries) and ``recon_downstream.md``
is rewritten from all entries.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_recon_downstream.py [--accelerations 4,8] [--minutes 4]
       [--recon-run 4=DIR,8=DIR]
       [--segmenter models:/<id> --tracking-uri sqlite:///runs/sr30/mlflow.db | --segmenter-minutes 15]
       [--cases N] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 4/2/2 hippocampus cases, one short epoch for each model; for the test
suite, never into benchmarks/results.
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

from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
RECON_CONFIG = REPO / "configs" / "recon_mri_4x.yaml"
SEG_CONFIG = REPO / "configs" / "msd_hippocampus.yaml"
KINDS = ("fully_sampled", "reconstructed", "zero_filled")
RECON_HEADLINES = ("test/psnr", "test/zero_filled_psnr", "test/ssim", "test/zero_filled_ssim")
#: the issue's goals: downstream Dice of the reconstruction within this of the fully sampled images
GOALS = {4: 0.01, 8: 0.03}


def _budget(tiny: bool, minutes: float) -> list[str]:
    return ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                         "train.max_epochs=null"]


def train_recon(manifest: Path, scratch: Path, tracking: str, acceleration: int, minutes: float,
                tiny: bool) -> dict[str, Any]:
    """The model of ``RECON_CONFIG`` at ``acceleration``, trained for ``minutes``: its URI and test figures.

    The PGBM real images are left out of its evaluation (``recon.real_images=[]``): they cost minutes
    on a loaded host and are not what this benchmark judges."""
    import medseg

    small = ["train.iterations_per_epoch=2", "model.channels=[4,8,16,32]"] if tiny else []
    overrides = [f"recon.acceleration={acceleration}", "recon.real_images=[]", "validation.overlays=0",
                 f"output_dir={scratch / f'recon_{acceleration}x'}", f"tracking.uri={tracking}",
                 f"data.manifest={manifest}", f"data.root={HIPPOCAMPUS}", "train.device=cpu", "train.num_threads=1",
                 *_budget(tiny, minutes), *small]
    result = medseg.train(RECON_CONFIG, overrides=overrides, progress=False)
    if result is None:  # only a distributed worker gets None; this runs on one process
        raise SystemExit(f"{RECON_CONFIG}: training at {acceleration}x returned no run")
    return {**recon_run_record(result.run_dir), "minutes_budget": None if tiny else minutes, "overrides": overrides}


def recon_run_record(run_dir: Path) -> dict[str, Any]:
    """A finished reconstruction run from its ``summary.json``: its MLflow run and model, its own test
    figures (2D slices), and the model folder it wrote (loaded from there: no download from the store)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    metrics = summary["metrics"]
    return {"model_uri": summary["model_uri"], "run_id": summary["run_id"], "model_folder": str(Path(run_dir) / "model"),
            "wall_minutes": round(summary["wall_minutes"], 2), "epochs": metrics.get("train/epochs"),
            **{k: metrics.get(k) for k in RECON_HEADLINES}}


def reconstruct(model: str, tracking: str, cases: list[dict[str, str]], folder: Path) -> list[float]:
    """Fully sampled, label, reconstructed and zero-filled NIfTIs of every case under ``folder`` (all on
    the case's own grid), by ``medseg predict``'s retrospective mode; CPU seconds per volume."""
    import nibabel as nib
    import numpy as np

    import medseg

    predictor = medseg.Predictor.from_uri(model, "cpu", tracking_uri=tracking)
    for kind in (*KINDS, "labels"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    cpu = []
    for case in cases:
        name = f"{case['case_id']}.nii.gz"
        image: Any = nib.load(HIPPOCAMPUS / case["image"])
        label: Any = nib.load(HIPPOCAMPUS / case["label"])
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), folder / "fully_sampled" / name)
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine), folder / "labels" / name)
        started = time.process_time()
        prediction = predictor.predict(HIPPOCAMPUS / case["image"], case_id=case["case_id"])
        cpu.append(time.process_time() - started)
        nib.save(nib.Nifti1Image(prediction.reconstruction, prediction.affine), folder / "reconstructed" / name)
        nib.save(nib.Nifti1Image(prediction.baseline, prediction.affine), folder / "zero_filled" / name)
    return cpu


def write_pairs(folder: Path, case_ids: list[str]) -> Path:
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "kind", "image", "reference", "label"])
        for case_id in case_ids:
            for kind in KINDS:
                writer.writerow([case_id, kind, f"{kind}/{case_id}.nii.gz", f"fully_sampled/{case_id}.nii.gz",
                                 f"labels/{case_id}.nii.gz"])
    return path


def run_acceleration(args: argparse.Namespace, manifest: Path, scratch: Path, tracking: str, segmenter: str,
                     acceleration: int) -> dict[str, Any]:
    """One acceleration: train (or reuse) the reconstruction model, reconstruct, judge downstream."""
    from bench_sr import test_cases

    import medseg

    reused = args.recon_run.get(acceleration)
    model = {**recon_run_record(reused), "minutes_budget": args.minutes, "reused": True} if reused \
        else train_recon(manifest, scratch, tracking, acceleration, args.minutes, args.tiny)
    cases = test_cases(manifest, args.cases)
    case_ids = [c["case_id"] for c in cases]
    folder = scratch / f"inputs_{acceleration}x"
    cpu = reconstruct(model["model_folder"], tracking, cases, folder)
    scores = medseg.evaluate_downstream(segmenter, write_pairs(folder, case_ids), folder / "downstream",
                                        tracking_uri=tracking, device="cpu", experiment="bench-recon-downstream",
                                        progress=False)
    failed = [r for r in scores.rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"downstream scoring failed for {len(failed)} row(s): {failed[0]['error']}")
    kinds = {kind: {k: (None if v != v or abs(v) == float("inf") else round(v, 5)) for k, v in means.items()}
             for kind, means in scores.means.items()}
    dice = {kind: kinds[kind]["dice_mean"] for kind in KINDS}
    if any(value is None for value in dice.values()):  # no foreground in a reference label: nothing to compare
        raise SystemExit(f"{acceleration}x: expected a mean Dice for every kind of input; got {dice}")
    reference = float(dice["fully_sampled"])  # type: ignore[arg-type]
    return {"acceleration": acceleration, "cases": len(case_ids), "recon_model": model, "kinds": kinds,
            "cpu_s_per_volume_reconstruction": round(sum(cpu) / len(cpu), 4),
            "delta_dice": {kind: round(float(dice[kind]) - reference, 5) for kind in KINDS[1:]},  # type: ignore[arg-type]
            "goal_delta_dice": GOALS.get(acceleration), "downstream_run_id": scores.run_id}


def markdown(report: dict[str, Any]) -> str:
    """The results page from every acceleration in the report."""
    lines = ["# Accelerated MRI reconstruction, judged by a frozen segmenter", "",
             f"Written by `benchmarks/bench_recon_downstream.py` on {report['host']}, one invocation per "
             "acceleration or several: each section names its command and the frozen segmenter that judged it "
             "(compare ΔDice within a section: each is against that segmenter's Dice on the fully sampled "
             "volumes).", "",
             f"**Host**: {report['host_note']}", "",
             "Each held-out test volume (fully sampled magnitude MRI) has every axial slice's k-space "
             "undersampled retrospectively (equispaced Cartesian mask, 8% fully sampled centre, seeded by the "
             "case id) and reconstructed by `medseg predict` (retrospective mode) with the `unet_dc` model of "
             "`configs/recon_mri_4x.yaml` at that acceleration; zero-filled is the inverse FFT of the "
             "undersampled k-space (the naive baseline). All three are on the volume's own grid. PSNR/SSIM: "
             "MONAI's, 3D, against the fully sampled volume (data range its own); Dice: "
             "`medseg evaluate-downstream` (the code of `medseg evaluate`) against the reference labels. The "
             "fully sampled volume's PSNR against itself is infinite (n/a).", ""]
    for key in sorted(report["accelerations"], key=int):
        entry = report["accelerations"][key]
        lines += _section(key, entry, entry.get("segmenter", report["segmenter"]),
                          entry.get("segmenter_origin", report["segmenter_origin"]))
    return "\n".join(lines) + "\n"


def _segmenter_line(seg: dict[str, Any], origin: str) -> str:
    own = (f" (run {seg['run_id']}, {seg.get('train/epochs')} epochs, its own test Dice mean {seg['test/dice_mean']:.4f})"
           if "test/dice_mean" in seg else "")
    return f"Frozen segmenter: `{seg['model_uri']}`{own}; {origin}."


def _section(key: str, entry: dict[str, Any], segmenter: dict[str, Any], origin: str) -> list[str]:
    m = entry["recon_model"]
    lines = [f"## {key}x ({entry['cases']} test cases)", "",
             f"Written by `{entry['command']}` ({entry['when']}"
             + (f", 1-minute load average {entry['load_average_at_start']} at its start" if "load_average_at_start" in entry
                else "") + ").", "", _segmenter_line(segmenter, origin), "",
             f"Reconstruction model: `{m['model_uri']}` (run {m['run_id']}), trained {m['wall_minutes']} min wall "
             f"with its evaluation (budget {m['minutes_budget']} min, {m['epochs']} epochs); its own test split "
             f"(2D slices): PSNR {_f(m.get('test/psnr'), 2)} dB vs zero-filled {_f(m.get('test/zero_filled_psnr'), 2)}, "
             f"SSIM {_f(m.get('test/ssim'))} vs {_f(m.get('test/zero_filled_ssim'))}."
             + (" Trained by an earlier command with the same overrides (`train_recon`), judged here from its run "
                "directory (`--recon-run`)." if m.get("reused") else ""), "",
             "| input | Dice mean | Dice anterior | Dice posterior | ΔDice vs fully sampled | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        k = entry["kinds"][kind]
        delta = entry["delta_dice"].get(kind)
        lines.append(f"| {kind} | {_f(k.get('dice_mean'))} | {_f(k.get('dice/anterior'))} | "
                     f"{_f(k.get('dice/posterior'))} | {'n/a' if delta is None else f'{delta:+.4f}'} | "
                     f"{_f(k.get('psnr'), 2)} | {_f(k.get('ssim'))} |")
    goal = entry.get("goal_delta_dice")
    verdict = "" if goal is None else (f" The issue's goal at {key}x: ΔDice ≥ -{goal}; "
                                       f"{'met' if entry['delta_dice']['reconstructed'] >= -goal else 'not met'}.")
    return lines + ["", f"CPU seconds per volume, reconstruction (all slices, with the zero-filled baseline): "
                        f"{entry['cpu_s_per_volume_reconstruction']:.3f}.{verdict}", ""]


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _runs(text: str | None) -> dict[int, Path]:
    """``4=DIR,8=DIR`` -> {4: DIR, 8: DIR}."""
    runs: dict[int, Path] = {}
    for item in filter(None, (text or "").split(",")):
        acceleration, _, folder = item.partition("=")
        if not folder or not acceleration.strip().isdigit():
            raise SystemExit(f"--recon-run: expected ACCELERATION=RUN_DIR pairs such as 4=runs/x/20261207-0101; "
                             f"got {item!r}")
        runs[int(acceleration)] = Path(folder)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerations", default="4,8", help="k-space accelerations, comma-separated (default 4,8)")
    parser.add_argument("--minutes", type=float, default=4.0, help="reconstruction training budget per acceleration")
    parser.add_argument("--recon-run", type=_runs, default={}, help="finished reconstruction run directories to "
                        "judge instead of training, as ACCELERATION=RUN_DIR pairs, comma-separated")
    parser.add_argument("--segmenter", help="frozen segmentation model URI (default: train one)")
    parser.add_argument("--segmenter-minutes", type=float, default=15.0, help="when training the segmenter here")
    parser.add_argument("--tracking-uri", help="MLflow store (default: one in the scratch folder)")
    parser.add_argument("--cases", type=int, help="only the first N test cases")
    add_tiny_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    import torch
    from bench_sr import segmenter_record, train_segmenter

    torch.set_num_threads(1)  # a shared host: one core for this benchmark
    out = results_folder(args)
    scratch = scratch_folder("medseg-bench-recon-downstream-", args, out)
    manifest = subset_manifest(MANIFEST, scratch / "hippocampus.csv", {"train": 4, "val": 2, "test": 2}) \
        if args.tiny else MANIFEST
    tracking = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"
    segmenter = args.segmenter or train_segmenter(manifest, scratch, tracking, args.segmenter_minutes, args.tiny)
    path = out / "recon_downstream.json"
    report = json.loads(path.read_text()) if path.is_file() and not args.tiny else {"accelerations": {}}
    report.update(command="OMP_NUM_THREADS=1 python benchmarks/bench_recon_downstream.py " + " ".join(argv),
                  host=f"{platform.node()} ({os.cpu_count()} CPUs)", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  host_note="a 2-core host shared with up to five other sessions (their training and tests ran "
                            "alongside; each section gives the 1-minute load average when its invocation started); 1 torch "
                            "thread; times are CPU seconds of this process",
                  segmenter=segmenter_record(segmenter, tracking),
                  segmenter_origin="given with --segmenter" if args.segmenter else
                  f"trained here for {args.segmenter_minutes} min with configs/msd_hippocampus.yaml")
    load = round(os.getloadavg()[0], 1)
    for acceleration in (int(a) for a in args.accelerations.split(",")):
        report["accelerations"][str(acceleration)] = {
            **run_acceleration(args, manifest, scratch, tracking, segmenter, acceleration),
            "command": report["command"], "when": report["when"], "load_average_at_start": load,
            "segmenter": report["segmenter"], "segmenter_origin": report["segmenter_origin"]}
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        (out / "recon_downstream.md").write_text(markdown(report))
        print(f"{acceleration}x: {json.dumps(report['accelerations'][str(acceleration)]['kinds'])}", flush=True)


if __name__ == "__main__":
    main()
