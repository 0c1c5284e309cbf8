"""Does temperature scaling make medseg's probabilities honest, and leave the rankings alone?

Trains the hand-tuned PneumoniaMNIST and BreastMNIST configs (``--seeds`` seeds each, every run a
real ``medseg run``: the temperature is fitted on the validation split, stored in the model and
scored once on the official test split) and reports, per run, the test ECE and NLL before and
after the temperature, and the test AUC before and after (which must not change). With
``--hippocampus-run RUN_DIR`` it also calibrates a finished MSD hippocampus run folder
(``medseg model calibrate``: nothing retrained) and reports its voxel ECE on the test split,
measured in the box around each labelled or predicted structure.

Writes ``benchmarks/results/calibration.{json,md}``.

Usage: python benchmarks/eval_calibration.py [--seeds 3] [--hippocampus-run RUN_DIR] [--out benchmarks/results]
Run ``make medmnist`` first (imports the MedMNIST files into data/ and data_manifests/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"PneumoniaMNIST": "configs/medmnist_pneumonia.yaml", "BreastMNIST": "configs/medmnist_breast.yaml"}
KEYS = ("calibration/temperature", "test/ece_uncalibrated", "test/ece", "test/nll_uncalibrated", "test/nll",
        "test/auc_uncalibrated", "test/auc", "test/acc")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def train_runs(name: str, config: str, seeds: int, work: Path, progress: bool) -> list[dict[str, Any]]:
    import medseg

    result = medseg.train(REPO / config, overrides=[f"output_dir={work / name}",
                                                    f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                                                    ],
                          progress=progress, seeds=seeds if seeds > 1 else None)
    if result is None:
        raise SystemExit(f"{config}: no result (a distributed run?)")
    children = result.children or ({"name": "seed-0", "run_id": result.run_id, "metrics": result.metrics},)
    return [{"dataset": name, "config": config, "run": child["name"], "run_id": child["run_id"],
             **{k: child["metrics"].get(k) for k in KEYS}} for child in children]


def calibrate_hippocampus(run_dir: Path) -> dict[str, Any]:
    import medseg

    result = medseg.calibrate_run(run_dir, progress=False)
    keep = (*KEYS, "test/dice_mean", "best_val/ece_uncalibrated", "best_val/ece")
    return {"dataset": "MSD Hippocampus (voxels near structures)", "run_dir": str(run_dir), "run_id": result.run_id,
            "model_uri": result.model_uri, **{k: result.metrics.get(k) for k in keep}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hippocampus-run", type=Path, help="a finished msd_hippocampus run folder to calibrate")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="train only these datasets")
    parser.add_argument("--work", type=Path, help="run folders and MLflow store (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="eval_calibration_"))
    runs: list[dict[str, Any]] = []
    for name, config in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        runs += train_runs(name, config, args.seeds, work, args.progress)
    hippocampus = calibrate_hippocampus(args.hippocampus_run) if args.hippocampus_run else None
    import torch

    result = {
        "command": "python benchmarks/eval_calibration.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
                   + (" --hippocampus-run RUN_DIR" if hippocampus else ""),
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO).stdout.strip(),
        "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "runs": runs, "hippocampus": hippocampus, "minutes": (time.monotonic() - started) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Temperature scaling: test-split calibration before and after", "",
             f"Written by `{result['command']}` on {result['date']} (commit {result['commit']}), {result['machine']}; "
             f"{result['minutes']:.0f} min in all. Each MedMNIST row is one `medseg run` of the hand-tuned config: "
             "the temperature T is fitted on the validation split after training, then the official test split is "
             "scored once with T = 1 (before) and with T (after). ECE: 10 equal-width bins of the top-class "
             "probability.", "",
             "| dataset | runs | T | test ECE before | test ECE after | test NLL before | test NLL after | "
             "test AUC before | test AUC after |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        mine = [r for r in runs if r["dataset"] == name]
        if not mine:
            continue
        cells = [mean_std([float(r[k]) for r in mine if r.get(k) is not None]) for k in
                 ("calibration/temperature", "test/ece_uncalibrated", "test/ece", "test/nll_uncalibrated", "test/nll",
                  "test/auc_uncalibrated", "test/auc")]
        lines.append(f"| {name} (`{mine[0]['config']}`) | {len(mine)} | " + " | ".join(cells) + " |")
    if hippocampus:
        h = hippocampus
        lines += ["", f"MSD Hippocampus, `medseg model calibrate {h['run_dir']}` (nothing retrained; "
                  "voxels in the box around each labelled or predicted structure, 52 test cases):", "",
                  "| T | test voxel ECE before | after | test NLL before | after | test Dice (unchanged) |",
                  "|---|---|---|---|---|---|",
                  f"| {h['calibration/temperature']:.3f} | {h['test/ece_uncalibrated']:.4f} | {h['test/ece']:.4f} | "
                  f"{h['test/nll_uncalibrated']:.4f} | {h['test/nll']:.4f} | {h['test/dice_mean']:.4f} |"]
    lines += ["", "Per run:", "", "| dataset | run | T | ECE before | ECE after | AUC before | AUC after | ACC |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:  # T = 1 (nothing to fit) leaves no temperature and no AUC before: the same figures
        t = r["calibration/temperature"]
        auc_before = r["test/auc_uncalibrated"] if r["test/auc_uncalibrated"] is not None else r["test/auc"]
        lines.append(f"| {r['dataset']} | {r['run']} | {1.0 if t is None else t:.3f} | "
                     f"{r['test/ece_uncalibrated']:.4f} | {r['test/ece']:.4f} | {auc_before:.4f} | "
                     f"{r['test/auc']:.4f} | {r['test/acc']:.4f} |")
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
