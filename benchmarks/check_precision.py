"""Do medseg's speed choices change a trained model's Dice? fp32 against bf16 autocast, and
contiguous against channels-last, on the MSD Hippocampus validation split.

It trains ``configs/msd_hippocampus.yaml`` for ``--minutes`` (a real run: verify, train,
evaluate, package, MLflow) unless ``--run-dir`` names a finished one, then scores the best
checkpoint on the validation cases under each setting with medseg's own evaluate stage
(sliding window, whole volumes) and writes ``precision.json`` / ``precision.md``.

Usage: python benchmarks/check_precision.py [--minutes 6] [--run-dir RUNS/msd_hippocampus/<run>] [--tiny]

``--tiny`` (benchmarks/tiny.py): the same stages on 3 training, 2 validation and 1 test case, 1
epoch of a U-Net of 4-32 channels, no temperature fit, mirroring, HD95 or figures; the 0.005 Dice gate is reported, not enforced (an untrained model's scores are nearly tied).
For the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
#: --tiny: a narrow U-Net, the evaluate stage without its slow extras (temperature fit, mirroring, HD95, figures)
TINY_VALIDATION = ("model.channels=[4,8,16,32]", "validation.calibrate=false", "validation.tta=false", "validation.hd95=false",
                   "validation.overlays=0")
SETTINGS = {  # name -> overrides of the trained config
    "fp32, contiguous": ["train.precision=fp32", "train.channels_last=false"],
    "fp32, channels-last (medseg's CPU default)": ["train.precision=fp32", "train.channels_last=true"],
    "bf16 autocast, channels-last": ["train.precision=bf16", "train.channels_last=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget when no --run-dir is given")
    parser.add_argument("--run-dir", type=Path, help="a finished medseg run of msd_hippocampus.yaml")
    add_tiny_arguments(parser)
    args = parser.parse_args()
    out = results_folder(args)

    from medseg import validate_config
    from medseg.config import read_config_file
    from medseg.data.manifest import read_manifest
    from medseg.engine.runner import PipelineContext
    from medseg.tasks.segmentation import TASK
    from medseg.tracking.mlflow_tracker import NullTracker

    run_dir = args.run_dir
    if run_dir is None:
        work = scratch_folder("check_precision_", args, out)
        budget = ["--set", f"train.max_minutes={args.minutes}"]
        if args.tiny:
            manifest = subset_manifest(REPO / "data_manifests" / "msd_hippocampus.csv", work / "tiny.csv",
                                       {"train": 3, "val": 2, "test": 1})
            budget = ["--set", "train.max_minutes=null", "--set", "train.max_epochs=1", "--set", f"data.manifest={manifest}",
                      *[a for key in TINY_VALIDATION for a in ("--set", key)]]
        subprocess.run([sys.executable, "-m", "medseg", "run", "configs/msd_hippocampus.yaml", "--no-progress",
                        "--set", f"data.root={HIPPO}", *budget,
                        "--set", f"output_dir={work / 'runs'}", "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"],
                       check=True, cwd=REPO)
        run_dir = next((work / "runs").iterdir())
    checkpoint = run_dir / "checkpoints" / "best.safetensors"
    rows = {}
    for name, overrides in SETTINGS.items():
        # absolute paths; an older run's relative ones started at the repository (validate_config: the cwd)
        cfg = validate_config(read_config_file(run_dir / "resolved_config.yaml", overrides))
        started = time.perf_counter()
        ctx = PipelineContext(cfg, REPO / cfg.data.manifest, HIPPO, scratch_folder("evaluate_", args, out), NullTracker(),
                              progress=False)
        metrics = TASK.evaluate(ctx, checkpoint, "val", "val")
        rows[name] = {"seconds": time.perf_counter() - started,
                      **{k: v for k, v in metrics.items() if k.startswith("val/dice")}}
        print(name, json.dumps(rows[name]), flush=True)
    reference = rows["fp32, contiguous"]
    names = [k for k in reference if k.startswith("val/dice/")]
    table = ["| setting | " + " | ".join(n.split("/")[-1] for n in names) + " | mean Dice | Δ mean vs fp32 | s |",
             "|---|" + "---|" * (len(names) + 3)]
    for name, row in rows.items():
        table.append(f"| {name} | " + " | ".join(f"{row[n]:.4f}" for n in names)
                     + f" | {row['val/dice_mean']:.4f} | {row['val/dice_mean'] - reference['val/dice_mean']:+.4f} "
                     f"| {row['seconds']:.1f} |")
    history = (run_dir / "history.csv").read_text().strip().splitlines()
    validation = len(read_manifest(REPO / cfg.data.manifest).split("val"))
    text = "\n".join(table) + f"\n\nModel: {run_dir} ({len(history) - 1} epochs), {validation} validation cases.\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"run_dir": str(run_dir), "rows": rows}, indent=2))
    (out / "precision.md").write_text(text)
    print(text)
    worst = max(abs(row["val/dice_mean"] - reference["val/dice_mean"]) for row in rows.values())
    if args.tiny:
        print(f"--tiny: the largest change of mean Dice, {worst:.4f}, is not held to 0.005 (untrained model)")
    elif worst > 0.005:
        raise SystemExit(f"a setting moved the mean validation Dice by {worst:.4f} (> 0.005)")


if __name__ == "__main__":
    main()
