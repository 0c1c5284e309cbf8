"""Super-resolution benchmark: thick-slice hippocampus MRI back to 1 mm, judged by image metrics and
by what a frozen segmenter makes of it.

For each through-plane factor (``--factors 3,5``):

1. **Train** the SR model of ``configs/sr_hippocampus_3x.yaml`` (``recon.sr.factor`` set to the
   factor) for ``--sr-minutes`` on the manifest's train split.
2. **Simulate** each held-out test case's thick-slice acquisition along S (the config's Gaussian
   slice profile; medseg's ``simulate_thick``), the original cropped to the whole thick slices
   (``n // factor * factor`` thin slices, the grid the thick slices were measured on), and
   interpolate it back linearly (``trilinear``) and by cubic B-spline (``bspline``).
3. **Super-resolve** each thick NIfTI with ``medseg predict --measured`` (``medseg.Predictor``):
   thin grid, sliding window; CPU seconds per volume for it and for both interpolations.
4. **Judge downstream** with ``medseg.evaluate_downstream``: the frozen hippocampus segmenter's
   Dice on the original, SR, trilinear and B-spline images against the reference labels, beside
   PSNR/SSIM (MONAI's, 3D) against the original.

The segmenter is ``--segmenter`` (a model URI, with ``--tracking-uri``) or one trained here for
``--segmenter-minutes`` with ``configs/msd_hippocampus.yaml``. Each factor is written into
``super_resolution.json`` as it finishes (factors run as separate invocations keep each other's
entries) and ``super_resolution.md`` is rewritten from all entries.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_sr.py [--factors 3] [--sr-minutes 4]
       [--segmenter runs:/<id>/model --tracking-uri sqlite:///runs/mlflow.db | --segmenter-minutes 10]
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
SR_CONFIG = REPO / "configs" / "sr_hippocampus_3x.yaml"
SEG_CONFIG = REPO / "configs" / "msd_hippocampus.yaml"
KINDS = ("original", "sr", "trilinear", "bspline")
SR_HEADLINES = ("test/psnr", "test/trilinear_psnr", "test/ssim", "test/trilinear_ssim")


def _budget(tiny: bool, minutes: float) -> list[str]:
    return ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                         "train.max_epochs=null"]


def train_sr(manifest: Path, scratch: Path, tracking: str, factor: int, minutes: float, tiny: bool) -> dict[str, Any]:
    """The SR model of ``SR_CONFIG`` at ``factor``, trained for ``minutes``: its URI and test figures."""
    import medseg

    small = ["train.iterations_per_epoch=2", "model.channels=[4,8,16,32]", "validation.overlays=0"] if tiny else []
    overrides = [f"recon.sr.factor={factor}", f"output_dir={scratch / f'sr_{factor}x'}", f"tracking.uri={tracking}",
                 f"data.manifest={manifest}", f"data.root={HIPPOCAMPUS}", "train.device=cpu", "train.num_threads=1",
                 *_budget(tiny, minutes), *small]
    result = medseg.train(SR_CONFIG, overrides=overrides, progress=False)
    return {**sr_run_record(result.run_dir), "minutes_budget": None if tiny else minutes, "overrides": overrides}


def sr_run_record(run_dir: Path) -> dict[str, Any]:
    """A finished SR run from its ``summary.json``: its MLflow run and model, its own test figures, and
    the model folder it wrote (loaded from there: no download from the store)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    metrics = summary["metrics"]
    return {"model_uri": summary["model_uri"], "run_id": summary["run_id"], "model_folder": str(Path(run_dir) / "model"),
            "wall_minutes": round(summary["wall_minutes"], 2), "epochs": metrics.get("train/epochs"),
            **{k: metrics.get(k) for k in SR_HEADLINES}}


def train_segmenter(manifest: Path, scratch: Path, tracking: str, minutes: float, tiny: bool) -> str:
    """A hippocampus segmenter from ``SEG_CONFIG`` trained for ``minutes``: its model URI."""
    import medseg

    overrides = [f"output_dir={scratch / 'segmenter'}", f"tracking.uri={tracking}", f"data.manifest={manifest}",
                 f"data.root={HIPPOCAMPUS}", "train.device=cpu", "train.num_threads=1", *_budget(tiny, minutes)]
    if tiny:
        overrides += ["validation.overlays=0", "validation.hd95=false"]
    return str(medseg.train(SEG_CONFIG, overrides=overrides, progress=False).model_uri)


def segmenter_record(uri: str, tracking: str) -> dict[str, Any]:
    """What the results say about the frozen segmenter: its URI and, for a run's model, its own test Dice."""
    from mlflow.tracking import MlflowClient

    record: dict[str, Any] = {"model_uri": uri}
    client = MlflowClient(tracking)
    if uri.startswith("runs:/"):
        run_id = uri.split("/")[1]
    elif uri.startswith("models:/m-"):  # a logged model: the run that logged it
        run_id = client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    else:
        return record
    run = client.get_run(run_id)
    record.update(run_id=run.info.run_id, **{k: v for k, v in run.data.metrics.items()
                                             if k.startswith("test/dice") or k == "train/epochs"})
    return record


def test_cases(manifest: Path, limit: int | None) -> list[dict[str, str]]:
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    return rows[:limit] if limit else rows


def make_inputs(cases: list[dict[str, str]], factor: int, folder: Path) -> dict[str, list[float]]:
    """Original (cropped to whole thick slices), labels, thick, trilinear and B-spline NIfTIs of every
    case under ``folder``; CPU seconds per volume of each interpolation."""
    import nibabel as nib
    import numpy as np

    from medseg.tasks.reconstruction.config import SuperResolutionConfig
    from medseg.tasks.reconstruction.slice_profile import simulate_thick, thin_affine, upsample
    from medseg.tasks.reconstruction.super_resolution import file_axis
    from medseg.tasks.registry import load_config

    sr = SuperResolutionConfig(**{**load_config(SR_CONFIG).recon.sr.model_dump(), "factor": factor})  # type: ignore[attr-defined]
    cpu: dict[str, list[float]] = {"trilinear": [], "bspline": []}
    for name in ("original", "labels", "thick", "trilinear", "bspline"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for case in cases:
        image, label = nib.load(HIPPOCAMPUS / case["image"]), nib.load(HIPPOCAMPUS / case["label"])
        axis = file_axis(image.affine, "RAS", sr.axis)
        keep = [slice(None)] * 3
        keep[axis] = slice(0, image.shape[axis] // factor * factor)
        thin = np.asarray(image.dataobj, dtype=np.float32)[tuple(keep)]
        thick, thick_grid = simulate_thick(thin, image.affine, axis, sr)
        name = f"{case['case_id']}.nii.gz"
        nib.save(nib.Nifti1Image(thin, image.affine), folder / "original" / name)
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[tuple(keep)], label.affine), folder / "labels" / name)
        nib.save(nib.Nifti1Image(thick, thick_grid), folder / "thick" / name)
        for kind, order in (("trilinear", 1), ("bspline", 3)):
            started = time.process_time()
            upsampled = upsample(thick, axis, factor, order=order)
            cpu[kind].append(time.process_time() - started)
            nib.save(nib.Nifti1Image(upsampled, thin_affine(thick_grid, axis, factor)), folder / kind / name)
    return cpu


def super_resolve(model: str, tracking: str, folder: Path, case_ids: list[str]) -> list[float]:
    """``medseg predict --measured`` of every thick case into ``folder/sr``; CPU seconds per volume."""
    import nibabel as nib

    import medseg

    predictor = medseg.Predictor.from_uri(model, "cpu", tracking_uri=tracking, measured=True)
    (folder / "sr").mkdir(exist_ok=True)
    cpu = []
    for case_id in case_ids:
        started = time.process_time()
        prediction = predictor.predict(folder / "thick" / f"{case_id}.nii.gz", case_id=case_id)
        cpu.append(time.process_time() - started)
        nib.save(nib.Nifti1Image(prediction.reconstruction, prediction.affine), folder / "sr" / f"{case_id}.nii.gz")
    return cpu


def write_pairs(folder: Path, case_ids: list[str]) -> Path:
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "kind", "image", "reference", "label"])
        for case_id in case_ids:
            for kind in KINDS:
                writer.writerow([case_id, kind, f"{kind}/{case_id}.nii.gz", f"original/{case_id}.nii.gz",
                                 f"labels/{case_id}.nii.gz"])
    return path


def run_factor(args: argparse.Namespace, manifest: Path, scratch: Path, tracking: str, segmenter: str,
               factor: int) -> dict[str, Any]:
    """One factor: train SR, simulate, super-resolve, judge downstream."""
    import medseg

    sr_model = {**sr_run_record(args.sr_run), "minutes_budget": args.sr_minutes, "reused": True} if args.sr_run \
        else train_sr(manifest, scratch, tracking, factor, args.sr_minutes, args.tiny)
    cases = test_cases(manifest, args.cases)
    case_ids = [c["case_id"] for c in cases]
    folder = scratch / f"inputs_{factor}x"
    cpu = make_inputs(cases, factor, folder)
    cpu["sr"] = super_resolve(sr_model["model_folder"], tracking, folder, case_ids)
    scores = medseg.evaluate_downstream(segmenter, write_pairs(folder, case_ids), folder / "downstream",
                                        tracking_uri=tracking, device="cpu", experiment="bench-sr", progress=False)
    failed = [r for r in scores.rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"downstream scoring failed for {len(failed)} row(s): {failed[0]['error']}")
    kinds = {kind: {k: (None if v != v or abs(v) == float("inf") else round(v, 5)) for k, v in means.items()}
             for kind, means in scores.means.items()}
    return {"factor": factor, "cases": len(case_ids), "sr_model": sr_model, "kinds": kinds,
            "cpu_s_per_volume": {k: round(sum(v) / len(v), 4) for k, v in cpu.items()},
            "dice_sr_minus_original": round(kinds["sr"]["dice_mean"] - kinds["original"]["dice_mean"], 5),
            "downstream_run_id": scores.run_id}


def markdown(report: dict[str, Any]) -> str:
    """The results page from every factor in the report."""
    seg = report["segmenter"]
    own = (f" (run {seg['run_id']}, {seg.get('train/epochs')} epochs, its own test Dice mean {seg['test/dice_mean']:.4f})"
           if "test/dice_mean" in seg else "")
    lines = ["# Super-resolution: thick-slice hippocampus MRI, judged by a frozen segmenter", "",
             f"Written by `benchmarks/bench_sr.py` on {report['host']}, one invocation per factor: each section "
             "names its command.", "",
             f"**Host**: {report['host_note']}", "",
             f"**Frozen segmenter**: `{seg['model_uri']}`{own}; {report['segmenter_origin']}.", "",
             "Each test case's original is cropped to its whole thick slices; `thick` is simulated from it "
             "along S (Gaussian slice profile, FWHM = slice thickness, no gap); trilinear and B-spline "
             "interpolate it back onto the thin grid; SR is `medseg predict --measured` on the thick NIfTI. "
             "PSNR/SSIM: MONAI's, 3D, against the cropped original (data range its own); Dice: "
             "`medseg evaluate-downstream` (the code of `medseg evaluate`). The original's PSNR against itself "
             "is infinite (n/a).", ""]
    for key in sorted(report["factors"], key=int):
        f = report["factors"][key]
        m = f["sr_model"]
        lines += [f"## {key}x through-plane ({f['cases']} test cases)", "",
                  f"Written by `{f['command']}` ({f['when']}).", "",
                  f"SR model: `{m['model_uri']}` (run {m['run_id']}), trained {m['wall_minutes']} min wall with its "
                  f"evaluation (budget {m['minutes_budget']} min, {m['epochs']} epochs); its own test split "
                  f"(2D slices): PSNR {_f(m.get('test/psnr'), 2)} dB vs trilinear {_f(m.get('test/trilinear_psnr'), 2)}, "
                  f"SSIM {_f(m.get('test/ssim'))} vs {_f(m.get('test/trilinear_ssim'))}."
                  + (" Trained by an earlier invocation of this command without `--sr-run`, judged here from its run "
                     "directory (`--sr-run`)." if m.get("reused") else ""), "",
                  "| input | Dice mean | Dice anterior | Dice posterior | PSNR dB | SSIM | CPU s / volume |",
                  "|---|---|---|---|---|---|---|"]
        for kind in KINDS:
            k = f["kinds"][kind]
            cpu = f["cpu_s_per_volume"].get(kind)
            lines.append(f"| {kind} | {_f(k.get('dice_mean'))} | {_f(k.get('dice/anterior'))} | "
                         f"{_f(k.get('dice/posterior'))} | {_f(k.get('psnr'), 2)} | {_f(k.get('ssim'))} | "
                         f"{_f(cpu, 3)} |")
        goal = " (the issue's goal at 3x: within 0.01)" if key == "3" else ""
        lines += ["", f"Dice SR - original: {f['dice_sr_minus_original']:+.4f}{goal}.", ""]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factors", default="3", help="through-plane factors, comma-separated (default 3)")
    parser.add_argument("--sr-minutes", type=float, default=4.0, help="SR training budget per factor")
    parser.add_argument("--sr-run", type=Path, help="a finished SR run directory of this factor to judge instead "
                        "of training one (with a single --factors)")
    parser.add_argument("--segmenter", help="frozen segmentation model URI (default: train one)")
    parser.add_argument("--segmenter-minutes", type=float, default=10.0, help="when training the segmenter here")
    parser.add_argument("--tracking-uri", help="MLflow store (default: one in the scratch folder)")
    parser.add_argument("--cases", type=int, help="only the first N test cases")
    add_tiny_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a shared host: one core for this benchmark
    out = results_folder(args)
    scratch = scratch_folder("medseg-bench-sr-", args, out)
    manifest = subset_manifest(MANIFEST, scratch / "hippocampus.csv", {"train": 4, "val": 2, "test": 2}) \
        if args.tiny else MANIFEST
    tracking = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"
    segmenter = args.segmenter or train_segmenter(manifest, scratch, tracking, args.segmenter_minutes, args.tiny)
    path = out / "super_resolution.json"
    report = json.loads(path.read_text()) if path.is_file() and not args.tiny else {"factors": {}}
    report.update(command="OMP_NUM_THREADS=1 python benchmarks/bench_sr.py " + " ".join(argv),
                  host=f"{platform.node()} ({os.cpu_count()} CPUs)", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  host_note="a 2-core host shared with up to five other sessions (their training and tests ran "
                            "alongside); 1 torch thread; times are CPU seconds of this process",
                  segmenter=segmenter_record(segmenter, tracking),
                  segmenter_origin="given with --segmenter" if args.segmenter else
                  f"trained here for {args.segmenter_minutes} min with configs/msd_hippocampus.yaml")
    for factor in (int(f) for f in args.factors.split(",")):
        report["factors"][str(factor)] = {**run_factor(args, manifest, scratch, tracking, segmenter, factor),
                                          "command": report["command"], "when": report["when"]}
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        (out / "super_resolution.md").write_text(markdown(report))
        print(f"{factor}x: {json.dumps(report['factors'][str(factor)]['kinds'])}", flush=True)


if __name__ == "__main__":
    main()
