"""Regression benchmark: a quantity read off the image directly, against the ways medseg already had.

Arms, each trained for the same ``--minutes`` on this machine (one ``medseg.train`` run each):

- **hippocampus_regression**: ``configs/hippocampus_volume_regression.yaml``: a 3D ResNet-18 regresses
  each MSD hippocampus case's anterior and posterior volume (mL) from the MRI alone.
- **hippocampus_segmentation**: segment-then-measure: ``configs/msd_hippocampus.yaml`` (the U-Net),
  then ``medseg predict`` on the test images and each structure's predicted volume.
  Both are scored on the committed test split (52 cases) against the volumes measured from the
  reference labels (``data_manifests/msd_hippocampus_volumes.csv``): MAE in mL and R².
- **retina_regression**: RetinaMNIST's 0-4 grade as an ordinal quantity (2D ResNet-18 at 28 px, L1
  loss); MAE, quadratic-weighted kappa and the accuracy of the rounded grade on the official test split.
- **retina_classification**: the classification head on the same images (``loss.name: ordinal``,
  ``data.ordinal: true``): the same three figures.

Each arm writes its entry into ``regression.json`` (the arms run as separate invocations, ``--arms``,
so no process outlives a host's limits) and ``regression.md`` is rewritten from all entries.

Usage: python benchmarks/bench_regression.py [--minutes 4] [--arms A,B] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 4/2/2 hippocampus cases and 16/8/8 RetinaMNIST images, one epoch per
arm; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
HIPPO_MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
HIPPO_VOLUMES = REPO / "data_manifests" / "msd_hippocampus_volumes.csv"
RETINA = REPO.parent / "shared" / "data" / "medmnist" / "retinamnist.npz"
STRUCTURES = ("anterior", "posterior")
ARMS = ("hippocampus_regression", "hippocampus_segmentation", "retina_regression", "retina_classification")
#: MedMNIST v2 (Sci Data 2023) RetinaMNIST test ACC of ResNet-18 (28), as ../shared/data/README.md lists it
#: (a recalled row there, "confirm against the paper"); MedMNIST publishes AUC and ACC, not MAE or kappa.
PUBLISHED_RESNET18_28_ACC = 0.524


def _common(scratch: Path, minutes: float, tiny: bool) -> list[str]:
    budget = ["train.max_epochs=1", "train.max_minutes=null"] if tiny else [f"train.max_minutes={minutes}",
                                                                           "train.max_epochs=null"]
    return [f"output_dir={scratch / 'runs'}", f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", "train.device=cpu",
            *budget]


def _hippocampus_manifest(scratch: Path, tiny: bool) -> Path:
    return subset_manifest(HIPPO_MANIFEST, scratch / "hippocampus.csv", {"train": 4, "val": 2, "test": 2}) \
        if tiny else HIPPO_MANIFEST


def _volume_scores(predicted: dict[str, list[float]], case_ids: list[str]) -> dict[str, float]:
    """MAE (mL) and R² per structure of ``predicted`` (case -> volumes) against the reference volumes."""
    import numpy as np

    from medseg.data.targets import read_targets
    from medseg.tasks.regression.metrics import mae, r2

    truth = read_targets(HIPPO_VOLUMES, [f"{s}_ml" for s in STRUCTURES]).array(case_ids)
    guess = np.asarray([predicted[c] for c in case_ids], dtype=float)
    out: dict[str, float] = {"cases": float(len(case_ids))}
    for j, name in enumerate(STRUCTURES):
        out[f"mae_ml/{name}"] = mae(guess[:, j], truth[:, j])
        out[f"r2/{name}"] = r2(guess[:, j], truth[:, j])
    return out


def hippocampus_regression(scratch: Path, minutes: float, tiny: bool, extra: list[str]) -> dict[str, Any]:
    import medseg

    manifest = _hippocampus_manifest(scratch, tiny)
    overrides = [*_common(scratch, minutes, tiny), f"data.manifest={manifest}", f"data.root={HIPPOCAMPUS}",
                 f"data.targets.file={HIPPO_VOLUMES}", *extra]
    result = medseg.train(REPO / "configs" / "hippocampus_volume_regression.yaml", overrides=overrides, progress=False)
    assert result is not None
    with open(result.run_dir / "evaluation" / "test_cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    predicted = {r["case_id"]: [float(r[f"predicted_{s}_ml"]) for s in STRUCTURES] for r in rows}
    return {"config": "configs/hippocampus_volume_regression.yaml", "epochs": result.metrics.get("train/epochs"),
            **_volume_scores(predicted, sorted(predicted))}


def hippocampus_segmentation(scratch: Path, minutes: float, tiny: bool, extra: list[str]) -> dict[str, Any]:
    import medseg
    from medseg.data.manifest import read_manifest

    manifest = _hippocampus_manifest(scratch, tiny)
    overrides = [*_common(scratch, minutes, tiny), f"data.manifest={manifest}", f"data.root={HIPPOCAMPUS}", *extra]
    result = medseg.train(REPO / "configs" / "msd_hippocampus.yaml", overrides=overrides, progress=False)
    assert result is not None and result.model_uri
    images = scratch / "test_images"
    images.mkdir()
    for case in read_manifest(manifest).split("test"):
        (images / Path(case.images[0]).name).symlink_to(HIPPOCAMPUS / case.images[0])
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=result.tracking_uri)
    report = predictor.predict_folder(images, scratch / "masks", progress=False).report
    with open(report, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    predicted = {r["case_id"]: [float(r[f"volume_ml_{s}"]) for s in STRUCTURES] for r in rows}
    return {"config": "configs/msd_hippocampus.yaml, then medseg predict", "epochs": result.metrics.get("train/epochs"),
            "test_dice_mean": result.metrics.get("test/dice_mean"), **_volume_scores(predicted, sorted(predicted))}


def _retina(scratch: Path, tiny: bool) -> tuple[Path, Path]:
    """RetinaMNIST imported with its official split (the first 16/8/8 images with ``tiny``)."""
    import numpy as np

    from medseg.data.medmnist import import_medmnist

    source = RETINA
    if tiny:
        with np.load(RETINA) as arrays:
            counts = {"train": 16, "val": 8, "test": 8}
            subset = {f"{s}_{k}": arrays[f"{s}_{k}"][:n] for s, n in counts.items() for k in ("images", "labels")}
        source = scratch / RETINA.name
        np.savez(source, **subset)
    manifest, root = scratch / "retina.csv", scratch / "retina"
    import_medmnist(source, manifest, root, progress=False)
    return manifest, root


RETINA_CONFIG = REPO / "configs" / "medmnist_retina_regression.yaml"


def _retina_config(scratch: Path, task: str, manifest: Path, root: Path) -> Path:
    """``configs/medmnist_retina_regression.yaml`` on ``manifest``; for ``classification`` the same
    network, input, augmentation and optimiser with the ordinal classification head instead."""
    import yaml

    config = yaml.safe_load(RETINA_CONFIG.read_text())
    config["data"].update({"manifest": str(manifest), "root": str(root)})
    if task == "classification":
        del config["data"]["targets"]
        config["data"].update({"labels": {k: f"grade_{k}" for k in range(5)}, "ordinal": True})
        config["preprocess"]["resize"] = config["preprocess"].pop("size")
        config.update({"task": "classification", "loss": {"name": "ordinal"}, "validation": {"tsne": False}})
    path = scratch / f"retina_{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _retina_arm(scratch: Path, minutes: float, tiny: bool, task: str, extra: list[str]) -> dict[str, Any]:
    import medseg

    manifest, root = _retina(scratch, tiny)
    overrides = [*_common(scratch, minutes, tiny), *(["train.batch_size=8"] if tiny else []), *extra]
    result = medseg.train(_retina_config(scratch, task, manifest, root), overrides=overrides, progress=False)
    assert result is not None
    metrics = result.metrics
    source = "configs/medmnist_retina_regression.yaml" + ("" if task == "regression" else
                                                          ", its head swapped for loss.name: ordinal")
    return {"config": source, "epochs": metrics.get("train/epochs"), "mae": metrics.get("test/mae"),
            "qwk": metrics.get("test/qwk"), "acc": metrics.get("test/acc"), "cases": metrics.get("test/cases"),
            "published_resnet18_28_acc": PUBLISHED_RESNET18_28_ACC}


def retina_regression(scratch: Path, minutes: float, tiny: bool, extra: list[str]) -> dict[str, Any]:
    return _retina_arm(scratch, minutes, tiny, "regression", extra)


def retina_classification(scratch: Path, minutes: float, tiny: bool, extra: list[str]) -> dict[str, Any]:
    return _retina_arm(scratch, minutes, tiny, "classification", extra)


RUNNERS = {"hippocampus_regression": hippocampus_regression, "hippocampus_segmentation": hippocampus_segmentation,
           "retina_regression": retina_regression, "retina_classification": retina_classification}


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """``regression.md`` from every arm recorded in ``regression.json``."""
    arms = results.get("arms", {})
    lines = ["# Regression: a quantity from the image", "",
             "Written by `python benchmarks/bench_regression.py` (each arm a separate `--arms` invocation). "
             "**The host was shared** with other sessions' work while these ran: timings and the epochs a "
             "budget bought are not comparable with other results files, and the short budgets make every "
             "figure a floor, not what the methods reach.", "",
             "## Hippocampus volume (MSD Task04, committed test split)", "",
             "| arm | budget (min) | epochs | MAE anterior (mL) | MAE posterior (mL) | R² anterior | R² posterior | "
             "test cases |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(n for n in arms if n.startswith("hippocampus_")):
        a = arms[name]
        lines.append(f"| {name} | {a['minutes']} | {a.get('epochs') or '-'} | {_fmt(a['mae_ml/anterior'])} | "
                     f"{_fmt(a['mae_ml/posterior'])} | {_fmt(a['r2/anterior'])} | {_fmt(a['r2/posterior'])} | "
                     f"{int(a['cases'])} |")
    lines += ["", "Targets: each structure's volume measured from the reference label map (voxel count x voxel volume, "
              "`data_manifests/msd_hippocampus_volumes.csv`). Segment-then-measure counts the predicted mask's voxels. "
              "An arm named with `[KEY=VALUE]` ran with that override of its config (`--set`).",
              "", "## RetinaMNIST grade (official test split)", "",
              "| head | budget (min) | epochs | MAE (grades) | quadratic-weighted kappa | ACC | published ResNet-18 (28) ACC |",
              "|---|---|---|---|---|---|---|"]
    for name in sorted(n for n in arms if n.startswith("retina_")):
        a = arms[name]
        lines.append(f"| {name} | {a['minutes']} | {a.get('epochs') or '-'} | {_fmt(a['mae'])} | {_fmt(a['qwk'])} | "
                     f"{_fmt(a['acc'])} | {a['published_resnet18_28_acc']} |")
    lines += ["", "The published figure is MedMNIST v2's test ACC of ResNet-18 at 28 px as `../shared/data/README.md` lists "
              "it (a row marked there as recalled, to confirm against the paper); MedMNIST publishes no MAE or kappa. "
              "The regression head's ACC is that of its prediction rounded to the nearest grade.", "",
              "Host: " + results.get("host", "?"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget of every arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the arms run (recorded: the arm's row is named with it)")
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    from medseg.io.atomic import atomic_write_text

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    out = results_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "regression.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"arms": {}}
    results["host"] = (f"{platform.node() or 'host'}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
                       f", load average {os.getloadavg()[0]:.1f} when the last arm started, shared with other sessions")
    for name in arms:
        scratch = scratch_folder(f"bench-regression-{name}-", args, out) if args.tiny else Path(
            tempfile.mkdtemp(prefix=f"bench-regression-{name}-"))
        started = time.monotonic()
        entry = RUNNERS[name](scratch, args.minutes, args.tiny, list(args.set))
        if args.set:
            name = f"{name} [{', '.join(args.set)}]"
        results["arms"][name] = {**entry, "minutes": args.minutes, "wall_s": round(time.monotonic() - started, 1),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        atomic_write_text(json_path, json.dumps(results, indent=2))
        atomic_write_text(out / "regression.md", markdown(results))
        print(f"{name}: {json.dumps(results['arms'][name])}", flush=True)


if __name__ == "__main__":
    main()
