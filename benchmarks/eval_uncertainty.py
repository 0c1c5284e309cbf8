"""Do medseg's per-case uncertainty scores rank the cases to check first?

Predicts the held-out test split of the committed MSD hippocampus manifest twice: as the model
allows (TTA over the flips its training used; none for ``configs/msd_hippocampus.yaml``, whose
augmentation has no flip), and with all 8 axis flips forced (what ``--tta`` did before medseg
recorded the trained flip axes). Scores each case's mask against its label (mean Dice over the
foreground labels) and reports the Spearman correlation between each per-case score
(``mean_entropy``, ``agreement``) and the Dice, and the same scores for deliberately harmed copies
of some test scans: heavy noise, an axis flipped in the data (but not in the affine), and a scan
of another body part and modality (the TCIA brain MR series in ../shared/data). Writes
``benchmarks/results/uncertainty.{json,md}``.

Usage: python benchmarks/eval_uncertainty.py --model MODEL [--cases 52] [--harmed 6]
       [--data-root ../shared/data/msd_task04_hippocampus] [--out benchmarks/results]
MODEL is a model URI or folder trained with configs/msd_hippocampus.yaml.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
SCORES = ("mean_entropy", "agreement")


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
    args = parser.parse_args()

    import medseg
    from medseg.data.manifest import read_manifest
    from medseg.errors import MedsegError

    started = time.monotonic()
    plain = medseg.Predictor.from_uri(args.model, device="cpu", backend="torch", tracking_uri=args.tracking_uri)
    trained_axes = plain.contract.get("tta_axes")
    predictor = plain
    if trained_axes:  # TTA over the flips the model was trained with
        predictor = medseg.Predictor(plain.model, plain.task, plain.device, replace(plain.options, tta=True))
    everything = replace(plain.model, contract={**plain.model.contract, "tta_axes": None},
                         member_contracts=tuple({**c, "tta_axes": None} for c in plain.model.member_contracts))
    forced = medseg.Predictor(everything, plain.task, plain.device, replace(plain.options, tta=True))
    labels = [v for v in predictor.labels if v != 0]
    test = read_manifest(MANIFEST).split("test")[: args.cases]
    rows: list[dict[str, Any]] = []
    for case in test:
        image = case.image_paths(args.data_root)[0]
        truth = np.asarray(nib.load(args.data_root / str(case.label)).dataobj)
        prediction = predictor.predict(image, case_id=case.case_id)
        mirrored = forced.predict(image, case_id=case.case_id)
        rows.append({"case_id": case.case_id, "dice": dice(prediction.label_map, truth, labels),
                     **{k: prediction.uncertainty.get(k) for k in SCORES},
                     "dice_all_flips": dice(mirrored.label_map, truth, labels),
                     **{f"{k}_all_flips": mirrored.uncertainty.get(k) for k in SCORES}})
    correlations = {}
    for key in (*SCORES, *(f"{k}_all_flips" for k in SCORES)):
        target = "dice_all_flips" if key.endswith("_all_flips") else "dice"
        pairs = [(r[key], r[target]) for r in rows if r[key] is not None]
        if len(pairs) < 3:
            continue
        rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        correlations[key] = {"spearman_rho": float(rho), "p_value": float(p), "cases": len(pairs), "against": target}
    harmed_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case_id, harm, path in harmed_copies(test, args.data_root, Path(tmp), args.harmed, seed=0):
            try:
                prediction = predictor.predict(path, case_id=case_id)
                harmed_rows.append({"case_id": case_id, "harm": harm, "status": "ok",
                                    **{k: prediction.uncertainty.get(k) for k in SCORES}})
            except MedsegError as err:
                harmed_rows.append({"case_id": case_id, "harm": harm, "status": "refused", "error": str(err)[:300]})
    clean = {k: [r[k] for r in rows if r[k] is not None] for k in correlations}
    result = {
        "command": "python benchmarks/eval_uncertainty.py --model MODEL", "model": str(args.model),
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}", "trained_flip_axes": trained_axes,
        "test_cases": len(rows), "mean_dice": float(np.mean([r["dice"] for r in rows])),
        "mean_dice_all_flips": float(np.mean([r["dice_all_flips"] for r in rows])),
        "correlations": correlations,
        "clean_score_range": {k: [float(min(v)), float(np.median(v)), float(max(v))] for k, v in clean.items() if v},
        "cases": rows, "harmed": harmed_rows, "minutes": (time.monotonic() - started) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uncertainty.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Per-case uncertainty against per-case Dice (MSD hippocampus test split)", "",
             f"Written by `{result['command']}` on {result['date']} (commit {result['commit']}); model `{args.model}` "
             f"(flip axes in its training augmentation: {trained_axes}); {len(rows)} test cases. Mean Dice as the "
             f"model allows (TTA only over trained flips): **{result['mean_dice']:.3f}**; with all 8 axis flips "
             f"forced: **{result['mean_dice_all_flips']:.3f}**.", "",
             "| score | Spearman ρ with Dice | p | clean cases: min / median / max |", "|---|---|---|---|"]
    for key, c in correlations.items():
        low, mid, high = result["clean_score_range"].get(key, [float("nan")] * 3)
        lines.append(f"| {key} | {c['spearman_rho']:.3f} | {c['p_value']:.3g} | {low:.4f} / {mid:.4f} / {high:.4f} |")
    lines += ["", "Harmed inputs:", "", "| case | harm | status | mean_entropy | agreement |", "|---|---|---|---|---|"]
    for r in harmed_rows:
        fmt = (lambda v: "" if v is None else f"{v:.4f}")
        lines.append(f"| {r['case_id']} | {r['harm']} | {r['status']} | {fmt(r.get('mean_entropy'))} | "
                     f"{fmt(r.get('agreement'))} |")
    (args.out / "uncertainty.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
