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
   thin grid, sliding window; CPU seconds per volume for it and for both interpolations. With
   ``--tta``, ``medseg predict --measured --tta`` (the mean over the model's in-plane flips), and the
   same model without it is timed too (what the flips cost).
4. **Judge downstream** with ``medseg.evaluate_downstream``: the frozen hippocampus segmenter's
   Dice on the original, SR, trilinear and B-spline images against the reference labels, beside
   PSNR/SSIM (MONAI's, 3D) against the original.

The segmenter is ``--segmenter`` (a model URI, with ``--tracking-uri``) or one trained here for
``--segmenter-minutes`` with ``configs/msd_hippocampus.yaml``. Each factor is written into
``super_resolution.json`` as it finishes (factors run as separate invocations keep each other's
entries) with the segmenter that judged it and what shared the host (``--host-note``), and
``super_resolution.md`` is rewritten from all entries.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_sr.py [--factors 3] [--sr-minutes 4]
       [--segmenter runs:/<id>/model --tracking-uri sqlite:///runs/mlflow.db | --segmenter-minutes 10]
       [--cases N] [--variant NAME --set KEY=VALUE ...] [--sr-run DIR] [--tta] [--host-note TEXT]
       [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 4/2/2 hippocampus cases, one short epoch for each model; for the test
suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
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
#: With --tta: the same SR model predicted plainly, judged beside it in the same invocation.
PLAIN_SR = "sr_without_tta"
MNI152_CASE = "mni152_t1"
MNI152_KINDS = ("sr", "trilinear", "bspline")
SR_HEADLINES = ("test/psnr", "test/trilinear_psnr", "test/ssim", "test/trilinear_ssim")


def _budget(tiny: bool, minutes: float) -> list[str]:
    return ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                         "train.max_epochs=null"]


def train_sr(manifest: Path, scratch: Path, tracking: str, factor: int, minutes: float, tiny: bool,
             extra: list[str] | None = None) -> dict[str, Any]:
    """The SR model of ``SR_CONFIG`` at ``factor``, trained for ``minutes`` (``extra``: more config
    overrides, e.g. ``loss.name=l1``): its URI and test figures."""
    import medseg

    small = ["train.iterations_per_epoch=2", "model.channels=[4,8,16,32]", "validation.overlays=0"] if tiny else []
    overrides = [f"recon.sr.factor={factor}", f"output_dir={scratch / f'sr_{factor}x'}", f"tracking.uri={tracking}",
                 f"data.manifest={manifest}", f"data.root={HIPPOCAMPUS}", "train.device=cpu", "train.num_threads=1",
                 *_budget(tiny, minutes), *small, *(extra or [])]
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

    cpu: dict[str, list[float]] = {"trilinear": [], "bspline": []}
    for case in cases:
        image, label = nib.load(HIPPOCAMPUS / case["image"]), nib.load(HIPPOCAMPUS / case["label"])
        seconds = write_case_inputs(case["case_id"], np.asarray(image.dataobj, dtype=np.float32), image.affine, factor,
                                    folder, np.asarray(label.dataobj))
        for kind, value in seconds.items():
            cpu[kind].append(value)
    return cpu


def write_case_inputs(case_id: str, volume: Any, affine: Any, factor: int, folder: Path,
                      label: Any = None) -> dict[str, float]:
    """One thin RAS-orientable volume's inputs under ``folder``: ``original`` (cropped along S to its whole
    thick slices), ``labels`` (the same crop, when given), ``thick`` (simulated with the SR config's slice
    profile at ``factor``), ``trilinear`` and ``bspline`` (back on the cropped original's grid).

    Returns:
        CPU seconds of each interpolation.
    """
    import nibabel as nib
    import numpy as np

    from medseg.tasks.reconstruction.config import SuperResolutionConfig
    from medseg.tasks.reconstruction.slice_profile import simulate_thick, thin_affine, upsample
    from medseg.tasks.reconstruction.super_resolution import file_axis
    from medseg.tasks.registry import load_config

    sr = SuperResolutionConfig(**{**load_config(SR_CONFIG).recon.sr.model_dump(), "factor": factor})  # type: ignore[attr-defined]
    axis = file_axis(affine, "RAS", sr.axis)
    keep = [slice(None)] * 3
    keep[axis] = slice(0, volume.shape[axis] // factor * factor)
    thin = np.asarray(volume, dtype=np.float32)[tuple(keep)]
    thick, thick_grid = simulate_thick(thin, affine, axis, sr)
    name = f"{case_id}.nii.gz"
    kinds = ["original", "thick", "trilinear", "bspline", *(["labels"] if label is not None else [])]
    for kind in kinds:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(thin, affine), folder / "original" / name)
    if label is not None:
        nib.save(nib.Nifti1Image(np.asarray(label)[tuple(keep)], affine), folder / "labels" / name)
    nib.save(nib.Nifti1Image(thick, thick_grid), folder / "thick" / name)
    cpu = {}
    for kind, order in (("trilinear", 1), ("bspline", 3)):
        started = time.process_time()
        upsampled = upsample(thick, axis, factor, order=order)
        cpu[kind] = time.process_time() - started
        nib.save(nib.Nifti1Image(upsampled, thin_affine(thick_grid, axis, factor)), folder / kind / name)
    return cpu


def mni152_t1() -> tuple[Any, Any]:
    """The MNI152 T1 template that nilearn's wheel ships (ICBM 2009a symmetric, 1 mm, 197 x 233 x 189,
    RAS), read from the installed package: no download. Returns (volume, affine).

    Raises:
        SystemExit: nilearn is not installed (a benchmark-only dependency; says how to install it).
    """
    import numpy as np

    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as err:
        raise SystemExit("--mni152 reads the MNI152 T1 template from nilearn, which is not installed: "
                         "pip install -e '.[bench]' (or pip install nilearn)") from err
    image = load_mni152_template(resolution=1)
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)


def super_resolve(model: str, tracking: str, folder: Path, case_ids: list[str], tta: bool = False,
                  into: str = "sr") -> list[float]:
    """``medseg predict --measured`` (with ``--tta``: averaged over the model's in-plane flips) of every
    thick case into ``folder/<into>``; CPU seconds per volume."""
    import nibabel as nib

    import medseg

    predictor = medseg.Predictor.from_uri(model, "cpu", tracking_uri=tracking, measured=True, tta=tta)
    (folder / into).mkdir(exist_ok=True)
    cpu = []
    for case_id in case_ids:
        started = time.process_time()
        prediction = predictor.predict(folder / "thick" / f"{case_id}.nii.gz", case_id=case_id)
        cpu.append(time.process_time() - started)
        nib.save(nib.Nifti1Image(prediction.reconstruction, prediction.affine), folder / into / f"{case_id}.nii.gz")
    return cpu


def tta_passes(model_folder: str | Path) -> int:
    """Network passes per slice that ``--tta`` costs for the model in ``model_folder``: the identity and
    every combination of its contract's in-plane ``tta_axes`` (4 for both axes)."""
    from medseg.engine.model_format import read_model_folder
    from medseg.engine.tta import flip_combinations

    contract = read_model_folder(Path(model_folder)).contract
    return len(flip_combinations(int(contract["spatial_dims"]), True, contract.get("tta_axes")))


def write_pairs(folder: Path, case_ids: list[str], kinds: tuple[str, ...] = KINDS) -> Path:
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "kind", "image", "reference", "label"])
        for case_id in case_ids:
            for kind in kinds:
                writer.writerow([case_id, kind, f"{kind}/{case_id}.nii.gz", f"original/{case_id}.nii.gz",
                                 f"labels/{case_id}.nii.gz"])
    return path


def check_reused_run(run_dir: Path, overrides: list[str], minutes: float) -> None:
    """With ``--sr-run``, ``--set`` and ``--sr-minutes`` describe the run judged (they go into its entry):
    each must be what its ``resolved_config.yaml`` says it trained with.

    Raises:
        SystemExit: a value differs from the run's (Expected / Got / the file).
    """
    import yaml

    path = run_dir / "resolved_config.yaml"
    config = yaml.safe_load(path.read_text())
    wanted = [("train.max_minutes", minutes), *((k, yaml.safe_load(v)) for k, _, v in (o.partition("=") for o in overrides))]
    for key, value in wanted:
        got: Any = config
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if got != value:
            raise SystemExit(f"--sr-run {run_dir}: Expected {key}={value} (from --set / --sr-minutes, recorded in the "
                             f"entry as the run's setting). Got {key}={got} in {path}. Fix: give the run's own values")


def sr_model_for(args: argparse.Namespace, manifest: Path, scratch: Path, tracking: str, factor: int) -> dict[str, Any]:
    """The finished run of ``--sr-run``, or an SR model trained here on the hippocampus train split."""
    if args.sr_run:
        check_reused_run(Path(args.sr_run), args.set, args.sr_minutes)
        return {**sr_run_record(args.sr_run), "minutes_budget": args.sr_minutes, "reused": True}
    return train_sr(manifest, scratch, tracking, factor, args.sr_minutes, args.tiny, args.set)


def run_mni152(args: argparse.Namespace, manifest: Path, scratch: Path, tracking: str, factor: int) -> dict[str, Any]:
    """The MNI152 T1 at ``factor``: thick slices along S, SR (the hippocampus-trained model: out of
    its domain), trilinear and B-spline, PSNR/SSIM against the cropped template, CPU s per volume."""
    from medseg.tasks.segmentation.downstream import image_quality

    sr_model = sr_model_for(args, manifest, scratch, tracking, factor)
    folder = scratch / f"mni152_{factor}x"
    volume, affine = mni152_t1()
    cpu = write_case_inputs(MNI152_CASE, volume, affine, factor, folder)
    cpu["sr"] = super_resolve(sr_model["model_folder"], tracking, folder, [MNI152_CASE])[0]
    name = f"{MNI152_CASE}.nii.gz"
    kinds = {kind: {k: round(v, 5) for k, v in image_quality(folder / kind / name, folder / "original" / name).items()}
             for kind in MNI152_KINDS}
    return {"factor": factor, "shape": list(volume.shape), "sr_model": sr_model, "kinds": kinds,
            "cpu_s_per_volume": {k: round(v, 4) for k, v in cpu.items()}}


def run_factor(args: argparse.Namespace, manifest: Path, scratch: Path, tracking: str, segmenter: str,
               factor: int) -> dict[str, Any]:
    """One factor: train SR, simulate, super-resolve, judge downstream."""
    import medseg

    sr_model = sr_model_for(args, manifest, scratch, tracking, factor)
    cases = test_cases(manifest, args.cases)
    case_ids = [c["case_id"] for c in cases]
    folder = scratch / f"inputs_{factor}x"
    cpu = make_inputs(cases, factor, folder)
    cpu["sr"] = super_resolve(sr_model["model_folder"], tracking, folder, case_ids, args.tta)
    tta: dict[str, Any] = {"tta": args.tta}
    kinds_judged: tuple[str, ...] = KINDS
    if args.tta:  # the same model without TTA, timed and judged here too: what the flips cost and give, here and now
        cpu[PLAIN_SR] = super_resolve(sr_model["model_folder"], tracking, folder, case_ids, into=PLAIN_SR)
        tta["tta_passes"] = tta_passes(sr_model["model_folder"])
        kinds_judged = (*KINDS, PLAIN_SR)
    scores = medseg.evaluate_downstream(segmenter, write_pairs(folder, case_ids, kinds_judged), folder / "downstream",
                                        tracking_uri=tracking, device="cpu", experiment="bench-sr", progress=False)
    failed = [r for r in scores.rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"downstream scoring failed for {len(failed)} row(s): {failed[0]['error']}")
    kinds = {kind: {k: (None if v != v or abs(v) == float("inf") else round(v, 5)) for k, v in means.items()}
             for kind, means in scores.means.items()}
    return {"factor": factor, "cases": len(case_ids), "sr_model": sr_model, "kinds": kinds, **tta,
            "cpu_s_per_volume": {k: round(sum(v) / len(v), 4) for k, v in cpu.items()},
            "dice_sr_minus_original": round(kinds["sr"]["dice_mean"] - kinds["original"]["dice_mean"], 5),
            "downstream_run_id": scores.run_id}


def markdown(report: dict[str, Any]) -> str:
    """The results page from every factor in the report."""
    lines = ["# Super-resolution: thick-slice hippocampus MRI, judged by a frozen segmenter", "",
             f"Written by `benchmarks/bench_sr.py` on {report['host']}, one invocation per factor: each section "
             "names its command, what shared the host and the frozen segmenter that judged it (compare "
             "'SR - original' within a section: each is against that segmenter's Dice on the originals).", "",
             f"**Host**: {report['host_note']}", "",
             "Each test case's original is cropped to its whole thick slices; `thick` is simulated from it "
             "along S (Gaussian slice profile, FWHM = slice thickness, no gap); trilinear and B-spline "
             "interpolate it back onto the thin grid; SR is `medseg predict --measured` on the thick NIfTI "
             "(with `--tta` where a section says so). "
             "PSNR/SSIM: MONAI's, 3D, against the cropped original (data range its own); Dice: "
             "`medseg evaluate-downstream` (the code of `medseg evaluate`). The original's PSNR against itself "
             "is infinite (n/a).", "", *_goal_summary(report)]
    for key in sorted(report["factors"], key=_entry_order):
        f = report["factors"][key]
        m = f["sr_model"]
        variant = f" — {f['variant']}" if f.get("variant") else ""
        settings = f" SR overrides: `{' '.join(f['sr_overrides'])}`." if f.get("sr_overrides") else ""
        lines += [f"## {f['factor']}x through-plane{variant} ({f['cases']} test cases)", "",
                  f"Written by `{f['command']}` ({f['when']}{_load(f)}).{settings}", "",
                  *([f"Host: {f['host_note']}.", ""] if f.get("host_note") else []),
                  _segmenter_line(f["segmenter"], f["segmenter_origin"]), "",
                  f"SR model: `{m['model_uri']}` (run {m['run_id']}), trained {m['wall_minutes']} min wall with its "
                  f"evaluation (budget {m['minutes_budget']} min, {m['epochs']} epochs); its own test split "
                  f"(2D slices): PSNR {_f(m.get('test/psnr'), 2)} dB vs trilinear {_f(m.get('test/trilinear_psnr'), 2)}, "
                  f"SSIM {_f(m.get('test/ssim'))} vs {_f(m.get('test/trilinear_ssim'))}."
                  + (" Trained by an earlier invocation of this command without `--sr-run`, judged here from its run "
                     "directory (`--sr-run`)." if m.get("reused") else ""), "",
                  *_tta_lines(f),
                  "| input | Dice mean | Dice anterior | Dice posterior | PSNR dB | SSIM | CPU s / volume |",
                  "|---|---|---|---|---|---|---|"]
        for kind in [*KINDS, *([PLAIN_SR] if PLAIN_SR in f["kinds"] else [])]:
            k = f["kinds"][kind]
            cpu = f["cpu_s_per_volume"].get(kind)
            lines.append(f"| {kind} | {_f(k.get('dice_mean'))} | {_f(k.get('dice/anterior'))} | "
                         f"{_f(k.get('dice/posterior'))} | {_f(k.get('psnr'), 2)} | {_f(k.get('ssim'))} | "
                         f"{_f(cpu, 3)} |")
        goal = " (the issue's goal at 3x: within 0.01)" if f["factor"] == 3 else ""
        lines += ["", f"Dice SR - original: {f['dice_sr_minus_original']:+.4f}{goal}.", ""]
    return "\n".join(lines) + "\n"


def _tta_lines(entry: dict[str, Any]) -> list[str]:
    """What ``--tta`` did and cost in an entry (nothing for one predicted plainly)."""
    if not entry.get("tta"):
        return []
    cpu, passes = entry["cpu_s_per_volume"], entry["tta_passes"]
    plain = entry["kinds"].get(PLAIN_SR, {}).get("dice_mean")
    gain = "" if plain is None else (f" Dice SR {entry['kinds']['sr']['dice_mean']:.4f} with TTA vs {plain:.4f} "
                                     f"without ({entry['kinds']['sr']['dice_mean'] - plain:+.4f}).")
    return [f"SR predicted with `--tta` (`medseg predict --measured --tta`): each slice's output is the mean over "
            f"{passes} in-plane flips of it (the SR model's contract's `tta_axes`, those its training flipped), "
            f"flipped back. A test-time setting of the same model, nothing retrained: it costs {passes} network "
            f"passes per slice. Row `sr` is with TTA; row `{PLAIN_SR}` is the same model predicted without it, "
            f"judged and timed in this invocation: CPU s / volume of SR {_f(cpu.get('sr'), 3)} with TTA vs "
            f"{_f(cpu.get(PLAIN_SR), 3)} without.{gain}", ""]


def _prediction_cell(entry: dict[str, Any]) -> str:
    return f"TTA ({entry['tta_passes']} flips)" if entry.get("tta") else "plain"


def _goal_summary(report: dict[str, Any]) -> list[str]:
    """The 3x settings side by side against the issue's goal (SR within 0.01 Dice of the original),
    when there is more than one; the best one and what is left of the gap."""
    entries = [report["factors"][k] for k in sorted(report["factors"], key=_entry_order)
               if report["factors"][k]["factor"] == 3]
    if len(entries) < 2:
        return []
    lines = ["## 3x: every SR setting against the goal (SR within 0.01 Dice of the original)", "",
             "| SR setting | SR overrides | budget min | epochs | segmenter | Dice SR | Dice original | SR - original "
             "| PSNR dB | SSIM | prediction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in entries:
        m, sr = f["sr_model"], f["kinds"]["sr"]
        lines.append(f"| {f.get('variant') or 'plain (config as committed)'} | "
                     f"{' '.join(f.get('sr_overrides') or []) or '-'} | {m['minutes_budget']} | {m['epochs']} | "
                     f"{_segmenter_cell(f['segmenter'])} | {_f(sr['dice_mean'])} | "
                     f"{_f(f['kinds']['original']['dice_mean'])} | {f['dice_sr_minus_original']:+.4f} | "
                     f"{_f(sr.get('psnr'), 2)} | {_f(sr.get('ssim'))} | {_prediction_cell(f)} |")
    best = max(entries, key=lambda f: f["dice_sr_minus_original"])
    gap = best["dice_sr_minus_original"]
    verdict = "met" if gap >= -0.01 else f"not met: {-gap - 0.01:.4f} Dice short of it"
    lines += ["", "Segmenter: the frozen segmenter that judged the row (its own test Dice mean); 'Dice original' is "
              "that segmenter's Dice on the cropped originals and 'SR - original' its own gap, so rows judged by "
              "different segmenters differ in the judge as well as in the SR setting. Prediction: `plain` is one "
              "network pass per slice; `TTA (n flips)` is the same kind of model predicted with `--tta`, the mean "
              "over n in-plane flips (n passes per slice: its section gives the CPU time with and without).", "",
              f"Best: {best.get('variant') or 'plain'} (segmenter `{_short(best['segmenter'])}`"
              f"{', with --tta' if best.get('tta') else ''}), SR - original {gap:+.4f}; the goal is {verdict}.", ""]
    return lines


def _segmenter_line(seg: dict[str, Any], origin: str) -> str:
    own = (f" (run {seg['run_id']}, {seg.get('train/epochs')} epochs, its own test Dice mean {seg['test/dice_mean']:.4f})"
           if "test/dice_mean" in seg else "")
    return f"Frozen segmenter: `{seg['model_uri']}`{own}; {origin}."


def _segmenter_cell(seg: dict[str, Any]) -> str:
    """A table's name for a segmenter: its short name, with its own test Dice."""
    return f"`{_short(seg)}` ({seg['test/dice_mean']:.4f})" if "test/dice_mean" in seg else f"`{_short(seg)}`"


def _short(seg: dict[str, Any]) -> str:
    """A segmenter's model id cut to 10 characters (``m-b31bfac2``), as the sections' full URIs begin."""
    return seg["model_uri"].split("/")[-1][:10]


def read_report(path: Path) -> dict[str, Any]:
    """``path``'s report, each entry with the segmenter that judged it and the host note of its invocation:
    entries written before these were recorded per entry get the page's record (the segmenter and host of
    the invocation that last wrote the page, which judged them: each later invocation records its own)."""
    report = json.loads(path.read_text())
    for entry in report["factors"].values():
        entry.setdefault("segmenter", report["segmenter"])
        entry.setdefault("segmenter_origin", report["segmenter_origin"])
        entry.setdefault("host_note", report["host_note"])
    return report


def _load(entry: dict[str, Any]) -> str:
    load, end = entry.get("load_average_at_start"), entry.get("load_averages_at_end")
    return ("" if load is None else f", 1-minute load average {load} at its start") + (
        "" if end is None else f"; 1/5/15-minute load averages {'/'.join(map(str, end))} at its end")


def _entry_order(key: str) -> tuple[int, str]:
    """Entries by factor, the factor's plain entry ('3') before its variants ('3/<variant>')."""
    factor, _, variant = key.partition("/")
    return int(factor), variant


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main_mni152(args: argparse.Namespace, out: Path, scratch: Path, manifest: Path, tracking: str,
                command: str) -> None:
    """``--mni152``: each factor's entry into ``super_resolution_mni152.json`` (other factors' entries kept)
    and the page rewritten from all of them."""
    from medseg.io.atomic import atomic_write_text

    path = out / "super_resolution_mni152.json"
    host = f"{platform.node()} ({os.cpu_count()} CPUs)"
    for factor in (int(f) for f in args.factors.split(",")):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load = round(os.getloadavg()[0], 1)  # what the other sessions were doing when this factor started
        entry = {**run_mni152(args, manifest, scratch, tracking, factor), "command": command, "when": when,
                 "host": host, "load_average_at_start": load}
        report = json.loads(path.read_text()) if path.is_file() and not args.tiny else {"factors": {}}
        report["factors"][str(factor)] = entry
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "super_resolution_mni152.md", markdown_mni152(report))
        print(f"MNI152 {factor}x: {json.dumps(entry['kinds'])}", flush=True)


def markdown_mni152(report: dict[str, Any]) -> str:
    """The MNI152 page from every factor in the report."""
    lines = ["# Super-resolution on the MNI152 T1 template (image metrics only)", "",
             "The ICBM 2009a symmetric T1 template that nilearn's wheel ships (`nilearn.datasets."
             "load_mni152_template(resolution=1)`: 1 mm isotropic, 197 x 233 x 189, read from the installed "
             "package, no download), cropped along S to its whole thick slices; thick axial slices simulated "
             "along S with the Gaussian slice profile of `configs/sr_hippocampus_3x.yaml`; trilinear and "
             "B-spline interpolate them back; SR is `medseg predict --measured` on the thick NIfTI. PSNR/SSIM: "
             "MONAI's, 3D, against the cropped template (its own intensity range), the code of "
             "`medseg evaluate-downstream`.", "",
             "**No segmenter**: the template has no hippocampus labels and the frozen segmenter of "
             "`super_resolution.md` was trained on hippocampus crops, so there is no Dice here.", "",
             "**Out of domain**: the SR model is the hippocampus one (trained on the MSD hippocampus crops' "
             "sagittal slices, 64 x 48, never on a whole brain or on this template); the template is a test "
             "image it has never seen, of another contrast scale and field of view. No model was trained on "
             "any part of the template.", "",
             "**Host**: a 2-core host shared with up to five other sessions (their training and tests ran alongside; "
             "each entry gives the 1-minute load average when it started); 1 torch thread; CPU seconds of the "
             "benchmark's process per volume.", ""]
    for key in sorted(report["factors"], key=int):
        f = report["factors"][key]
        m = f["sr_model"]
        lines += [f"## {key}x through-plane", "",
                  f"Written by `{f['command']}` ({f['when']}, load average {f['load_average_at_start']}).", "",
                  f"SR model: `{m['model_uri']}` (run {m['run_id']}, {m['epochs']} epochs, budget "
                  f"{m['minutes_budget']} min), judged from its run directory.", "",
                  "| input | PSNR dB | SSIM | CPU s / volume |", "|---|---|---|---|"]
        for kind in MNI152_KINDS:
            k = f["kinds"][kind]
            lines.append(f"| {kind} | {_f(k.get('psnr'), 2)} | {_f(k.get('ssim'))} | "
                         f"{_f(f['cpu_s_per_volume'].get(kind), 3)} |")
        lines.append("")
    return "\n".join(lines)


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an SR config override for the model trained here (repeatable), e.g. loss.name=l1; with "
                        "--sr-run, the run's own settings, checked against its resolved_config.yaml")
    parser.add_argument("--variant", help="name of this SR setting: its entry is '<factor>/<variant>' beside the "
                        "factor's plain entry instead of replacing it")
    parser.add_argument("--host-note", default="a 2-core host shared with up to five other sessions (their training "
                        "and tests ran alongside)", help="what shared the host during this invocation (its entry's "
                        "host note)")
    parser.add_argument("--tta", action="store_true", help="super-resolve with medseg predict --tta (the mean over "
                        "the SR model's in-plane flips; a test-time setting, the same model): the entry records it and "
                        "the CPU time without it, timed in the same invocation")
    parser.add_argument("--mni152", action="store_true", help="judge SR on nilearn's MNI152 T1 template instead "
                        "(PSNR/SSIM and CPU time, no segmenter) -> super_resolution_mni152.{json,md}")
    add_tiny_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.tta and args.mni152:
        parser.error("--tta: judged on the hippocampus cases only; run --mni152 without it")
    import torch

    from medseg.io.atomic import atomic_write_text

    torch.set_num_threads(1)  # a shared host: one core for this benchmark
    out = results_folder(args)
    scratch = scratch_folder("medseg-bench-sr-", args, out)
    manifest = subset_manifest(MANIFEST, scratch / "hippocampus.csv", {"train": 4, "val": 2, "test": 2}) \
        if args.tiny else MANIFEST
    tracking = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_sr.py " + shlex.join(argv)  # --host-note has spaces
    load = round(os.getloadavg()[0], 1)  # what the other sessions were doing when this one started
    if args.mni152:
        main_mni152(args, out, scratch, manifest, tracking, command)
        return
    segmenter = args.segmenter or train_segmenter(manifest, scratch, tracking, args.segmenter_minutes, args.tiny)
    path = out / "super_resolution.json"
    report = read_report(path) if path.is_file() and not args.tiny else {"factors": {}}
    report.update(command=command,
                  host=f"{platform.node()} ({os.cpu_count()} CPUs)", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  host_note="a 2-core host shared with other sessions, each section says with what and the 1-minute "
                            "load average at its start; 1 torch thread; times are CPU seconds of this process",
                  segmenter=segmenter_record(segmenter, tracking),
                  segmenter_origin="given with --segmenter" if args.segmenter else
                  f"trained here for {args.segmenter_minutes} min with configs/msd_hippocampus.yaml")
    for factor in (int(f) for f in args.factors.split(",")):
        key = f"{factor}/{args.variant}" if args.variant else str(factor)
        entry = {**run_factor(args, manifest, scratch, tracking, segmenter, factor), "variant": args.variant,
                 "sr_overrides": args.set, "command": report["command"], "when": report["when"],
                 "load_average_at_start": load, "host_note": args.host_note,
                 # 1-, 5- and 15-minute: how busy the host was over the run's last stretch, not only at its start
                 "load_averages_at_end": [round(x, 1) for x in os.getloadavg()],
                 "segmenter": report["segmenter"], "segmenter_origin": report["segmenter_origin"]}
        if path.is_file() and not args.tiny:  # invocations running side by side keep each other's entries
            report["factors"] = read_report(path)["factors"]
        report["factors"][key] = entry
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "super_resolution.md", markdown(report))
        print(f"{key}: {json.dumps(entry['kinds'])}", flush=True)


if __name__ == "__main__":
    main()
