"""Do medseg's per-case uncertainty scores and QC flags pick the results to check first?

Predicts the held-out test split of the committed MSD hippocampus manifest with ``medseg predict``'s
own path (``Predictor.predict_folder``: TTA over the flips the model was trained with, the model's
temperature, its QC thresholds), scores each mask against its label (mean Dice over the foreground
labels) and reports:

- the Spearman correlation between each per-case score (``mean_entropy``, ``agreement``, the largest
  ``|volume_z|``) and the Dice;
- the mean Dice of the cases ``qc_flag`` marks against the rest;
- the same scores and flags for deliberately harmed copies of some test scans (heavy noise, an axis
  flipped in the data but not in the affine) and scans of another body part and modality (the TCIA
  brain MR series in ../shared/data): they should be flagged;
- for reference, the Dice without TTA and with all 8 axis flips forced (what ``--tta`` did before
  medseg recorded the flips a model was trained with).

Writes ``benchmarks/results/uncertainty.{json,md}``; with ``--keep DIR`` the predict output folders
(masks, ``predictions.csv``, ``review.html``) stay in DIR.

Usage: python benchmarks/eval_uncertainty.py --model MODEL [--cases 52] [--harmed 6] [--keep DIR]
       [--data-root ../shared/data/msd_task04_hippocampus] [--out benchmarks/results]
MODEL is a model URI or folder trained on the hippocampus manifest (e.g. configs/msd_hippocampus.yaml
with a left-right flip in its augmentation, so TTA has a flip to average over).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
SCORES = ("mean_entropy", "agreement", "max_abs_volume_z")


def dice(pred: np.ndarray, label: np.ndarray, values: list[int]) -> float:
    scores = []
    for v in values:
        a, b = pred == v, label == v
        size = int(a.sum()) + int(b.sum())
        scores.append(1.0 if size == 0 else 2.0 * int((a & b).sum()) / size)
    return float(np.mean(scores))


def harmed_copies(cases: list[Any], root: Path, folder: Path, count: int, seed: int) -> list[tuple[str, str, Path]]:
    """(case id, harm, path) for noisy and axis-flipped copies of test scans, and a brain MR series."""
    rng = np.random.default_rng(seed)
    out = []
    for case in cases[:count]:
        img = nib.load(case.image_paths(root)[0])
        data = np.asarray(img.dataobj, dtype=np.float32)
        noisy = data + rng.normal(0.0, 3.0 * float(data.std()), data.shape).astype(np.float32)
        path = folder / f"{case.case_id}_noise.nii.gz"
        nib.save(nib.Nifti1Image(noisy, img.affine), path)
        out.append((case.case_id, "heavy noise (σ = 3 × the image's std)", path))
        path = folder / f"{case.case_id}_flipped.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data[:, :, ::-1]), img.affine), path)
        out.append((case.case_id, "axis flipped in the data, not in the affine", path))
    tcia = REPO.parent / "shared" / "data" / "tcia_brain_tumor_progression_pgbm001"
    for series in sorted(p for p in tcia.glob("*") if p.is_dir())[:2]:
        out.append((series.name, "another modality and body part (brain MR series)", series))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    parser.add_argument("--cases", type=int, default=52)
    parser.add_argument("--harmed", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--keep", type=Path, help="keep the predict output folders (masks, review.html) here")
    args = parser.parse_args()

    import medseg
    from medseg.data.manifest import read_manifest
    from medseg.io.readers import strip_volume_suffix

    started = time.monotonic()
    kept = args.keep or Path(tempfile.mkdtemp(prefix="eval_uncertainty_"))
    test = read_manifest(MANIFEST).split("test")[: args.cases]
    # the test scans, as a user would point predict at them: a folder of files
    scans = kept / "test_scans"
    scans.mkdir(parents=True, exist_ok=True)
    for case in test:
        link = scans / case.image_paths(args.data_root)[0].name
        if not link.exists():
            link.symlink_to(case.image_paths(args.data_root)[0].resolve())
    plain = medseg.Predictor.from_uri(args.model, device="cpu", backend="torch", tracking_uri=args.tracking_uri)
    trained_axes = plain.contract.get("tta_axes")
    predictor = medseg.Predictor.from_uri(args.model, device="cpu", backend="torch", tracking_uri=args.tracking_uri,
                                          tta=bool(trained_axes))
    labels = [v for v in plain.labels if v != 0]
    report = predictor.predict_folder(scans, kept / "test_predicted", overwrite=True, progress=False)
    by_id = {r.case_id: r for r in report.results}

    everything = replace(plain.model, contract={**plain.model.contract, "tta_axes": None},
                         member_contracts=tuple({**c, "tta_axes": None} for c in plain.model.member_contracts))
    forced = medseg.Predictor(everything, plain.task, plain.device, replace(plain.options, tta=True))
    rows: list[dict[str, Any]] = []
    for case in test:
        image = case.image_paths(args.data_root)[0]
        truth = np.asarray(nib.load(args.data_root / str(case.label)).dataobj)
        result = by_id[strip_volume_suffix(image.name)]
        if result.status != "ok":
            raise SystemExit(f"{case.case_id}: predict failed: {result.error}")
        mask = np.asarray(nib.load(result.outputs["output"]).dataobj)
        values = result.values
        z = [abs(float(v)) for k, v in values.items() if k.startswith("volume_z_") and v not in (None, "")]
        rows.append({"case_id": case.case_id, "dice": dice(mask, truth, labels),
                     "dice_no_tta": dice(plain.predict(image, case_id=case.case_id).label_map, truth, labels),
                     "dice_all_flips": dice(forced.predict(image, case_id=case.case_id).label_map, truth, labels),
                     "mean_entropy": values.get("mean_entropy"), "agreement": values.get("agreement"),
                     "max_abs_volume_z": max(z) if z else None,
                     "qc_flag": bool(values.get("qc_flag")), "qc_reason": values.get("qc_reason") or ""})
    correlations = {}
    for key in SCORES:
        pairs = [(r[key], r["dice"]) for r in rows if r[key] is not None]
        if len(pairs) < 3:
            continue
        rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        correlations[key] = {"spearman_rho": float(rho), "p_value": float(p), "cases": len(pairs)}
    flagged = [r["dice"] for r in rows if r["qc_flag"]]
    rest = [r["dice"] for r in rows if not r["qc_flag"]]

    harmed_dir = kept / "harmed_scans"
    harmed_dir.mkdir(parents=True, exist_ok=True)
    harms = harmed_copies(test, args.data_root, harmed_dir, args.harmed, seed=0)
    for case_id, _, path in harms:  # the brain MR series are folders elsewhere: copy them in
        if path.parent != harmed_dir and not (harmed_dir / case_id).exists():
            shutil.copytree(path, harmed_dir / case_id)
    truths = {case.case_id: np.asarray(nib.load(args.data_root / str(case.label)).dataobj) for case in test}
    harmed_report = predictor.predict_folder(harmed_dir, kept / "harmed_predicted", overwrite=True, progress=False)
    harmed_by_id = {r.case_id: r for r in harmed_report.results}
    harmed_rows = []
    for case_id, harm, path in harms:
        key = strip_volume_suffix(path.name) if path.parent == harmed_dir else case_id
        result = harmed_by_id.get(key)
        if result is None or result.status != "ok":
            harmed_rows.append({"case_id": key, "harm": harm, "status": "refused" if result else "missing",
                                "qc_flag": True, "error": (result.error if result else "")[:300]})
            continue
        values = result.values
        z = [abs(float(v)) for k, v in values.items() if k.startswith("volume_z_") and v not in (None, "")]
        truth = truths.get(case_id)  # a harmed copy's label: the scan's own, flipped with it
        if truth is not None and "flipped" in harm:
            truth = np.ascontiguousarray(truth[:, :, ::-1])
        mask = np.asarray(nib.load(result.outputs["output"]).dataobj)
        harmed_rows.append({"case_id": key, "harm": harm, "status": "ok",
                            "dice": dice(mask, truth, labels) if truth is not None else None,
                            "mean_entropy": values.get("mean_entropy"),
                            "agreement": values.get("agreement"), "max_abs_volume_z": max(z) if z else None,
                            "qc_flag": bool(values.get("qc_flag")), "qc_reason": values.get("qc_reason") or ""})
    clean = {k: [r[k] for r in rows if r[k] is not None] for k in correlations}
    # the test cases and the harmed copies that have a label, together
    mixed = [*rows, *(r for r in harmed_rows if r.get("dice") is not None)]
    mixed_correlations = {}
    for key in SCORES:
        pairs = [(r[key], r["dice"]) for r in mixed if r.get(key) is not None]
        if len(pairs) >= 3:
            rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
            mixed_correlations[key] = {"spearman_rho": float(rho), "p_value": float(p), "cases": len(pairs)}
    mixed_flagged = [r["dice"] for r in mixed if r["qc_flag"]]
    mixed_rest = [r["dice"] for r in mixed if not r["qc_flag"]]
    result_json = {
        "command": "python benchmarks/eval_uncertainty.py --model MODEL", "model": str(args.model),
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}", "trained_flip_axes": trained_axes,
        "temperature": (plain.contract.get("calibration") or {}).get("temperature"),
        "qc_thresholds": plain.contract.get("qc"),
        "test_cases": len(rows), "mean_dice": float(np.mean([r["dice"] for r in rows])),
        "mean_dice_no_tta": float(np.mean([r["dice_no_tta"] for r in rows])),
        "mean_dice_all_flips": float(np.mean([r["dice_all_flips"] for r in rows])),
        "correlations": correlations,
        "flagged": {"cases": len(flagged), "mean_dice": float(np.mean(flagged)) if flagged else None,
                    "rest_cases": len(rest), "rest_mean_dice": float(np.mean(rest)) if rest else None},
        "harmed_flagged": sum(1 for r in harmed_rows if r["qc_flag"]), "harmed_total": len(harmed_rows),
        "mixed_correlations": mixed_correlations,
        "mixed_flagged": {"cases": len(mixed_flagged), "mean_dice": float(np.mean(mixed_flagged)) if mixed_flagged else None,
                          "rest_cases": len(mixed_rest),
                          "rest_mean_dice": float(np.mean(mixed_rest)) if mixed_rest else None},
        "clean_score_range": {k: [float(min(v)), float(np.median(v)), float(max(v))] for k, v in clean.items() if v},
        "cases": rows, "harmed": harmed_rows, "minutes": (time.monotonic() - started) / 60,
    }
    write_results(args.out, result_json)


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_results(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "uncertainty.json").write_text(json.dumps(result, indent=2) + "\n")
    flagged = result["flagged"]
    lines = ["# Per-case uncertainty and QC flags against per-case Dice (MSD hippocampus test split)", "",
             f"Written by `{result['command']}` on {result['date']} (commit {result['commit']}); model "
             f"`{result['model']}` (flip axes in its training augmentation: {result['trained_flip_axes']}; "
             f"temperature {result['temperature']}; QC thresholds from its contract: {result['qc_thresholds']}); "
             f"{result['test_cases']} test cases, predicted by `Predictor.predict_folder` with TTA over the trained "
             f"flips.", "",
             f"Mean Dice with TTA: **{result['mean_dice']:.3f}**; without TTA: {result['mean_dice_no_tta']:.3f}; "
             f"with all 8 axis flips forced: {result['mean_dice_all_flips']:.3f}.", "",
             "Uncertainty scores should fall as Dice rises (ρ < 0); `agreement` is a certainty (ρ > 0 is "
             "the good direction).", "",
             "| score | Spearman ρ with Dice | p | clean cases: min / median / max |", "|---|---|---|---|"]
    for key, c in result["correlations"].items():
        low, mid, high = result["clean_score_range"].get(key, [float("nan")] * 3)
        lines.append(f"| {key} | {c['spearman_rho']:.3f} | {c['p_value']:.3g} | {low:.4f} / {mid:.4f} / {high:.4f} |")
    lines += ["", f"QC-flagged test cases: **{flagged['cases']}** of {result['test_cases']}, mean Dice "
              f"**{fmt(flagged['mean_dice'])}** against **{fmt(flagged['rest_mean_dice'])}** for the other "
              f"{flagged['rest_cases']}.", ""]
    mixed = result["mixed_flagged"]
    lines += [f"Harmed inputs flagged: **{result['harmed_flagged']} of {result['harmed_total']}**.", "",
              f"Test cases and the labelled harmed copies together ({mixed['cases'] + mixed['rest_cases']} cases): "
              f"flagged {mixed['cases']}, mean Dice **{fmt(mixed['mean_dice'])}** against "
              f"**{fmt(mixed['rest_mean_dice'])}** for the other {mixed['rest_cases']}.", "",
              "| score | Spearman ρ with Dice, test + harmed | p | cases |", "|---|---|---|---|"]
    for key, c in result["mixed_correlations"].items():
        lines.append(f"| {key} | {c['spearman_rho']:.3f} | {c['p_value']:.3g} | {c['cases']} |")
    lines += ["", "| case | harm | status | Dice | mean_entropy | agreement | max abs volume z | qc_flag | reason |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["harmed"]:
        lines.append(f"| {r['case_id']} | {r['harm']} | {r['status']} | {fmt(r.get('dice'))} | {fmt(r.get('mean_entropy'))} | "
                     f"{fmt(r.get('agreement'))} | {fmt(r.get('max_abs_volume_z'))} | {r['qc_flag']} | "
                     f"{r.get('qc_reason') or r.get('error', '')} |")
    lines += ["", "Flagged test cases:", "", "| case | Dice | mean_entropy | agreement | reason |", "|---|---|---|---|---|"]
    for r in result["cases"]:
        if r["qc_flag"]:
            lines.append(f"| {r['case_id']} | {r['dice']:.3f} | {fmt(r['mean_entropy'])} | {fmt(r['agreement'])} | "
                         f"{r['qc_reason']} |")
    (out / "uncertainty.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
