"""Detection benchmark: lesions found by a detector against lesions found by segmenting, at one budget.

Data (``--dataset``):

- ``synthetic`` (default): the seeded synthetic CT lesion set of ``configs/detection_synthetic_ct.yaml``
  (40 scans, 1-5 lesions each, 24 train / 8 val / 8 test), written once into a scratch folder.
- ``hippocampus``: MSD Task04 from ``../shared/data`` on the committed split of
  ``data_manifests/msd_hippocampus.csv`` (182 train / 26 val / 52 test): the anterior and posterior
  hippocampus as boxes, each the connected components of its label (at least
  :data:`HIPPOCAMPUS_MIN_VOLUME_MM3`), through the same label-map -> boxes path as training.

Arms, each trained for the same ``--minutes`` on this machine (one ``medseg.train`` run each):

- **retinanet**: ``configs/detection_synthetic_ct.yaml``: MONAI's RetinaNet on patches; ``medseg
  predict`` then writes each held-out scan's boxes (sliding window, NMS).
- **segment_components**: a 3D U-Net (``task: segmentation``, lesion vs background, the same
  preprocessing, patch and augmentation); each held-out scan's predicted mask split into connected
  components, each a box scored by its highest lesion probability.

Both are scored the same way on the test scans, on each scan's stored voxel grid: reference boxes
are the connected components of each class of the reference label map (at least 10 mm³ of lesion, or
:data:`HIPPOCAMPUS_MIN_VOLUME_MM3` of hippocampus), and FROC (sensitivity at 1, 2 and 4 false
positives per scan, hits at IoU 0.1 within a class) and mAP at IoU 0.1 and 0.5 come from
:mod:`medseg.tasks.detection.metrics`.

Each arm writes its entry into ``detection.json`` (arms run as separate invocations with ``--arms``)
and ``detection.md`` is rewritten from all entries. The host is shared: run with OMP_NUM_THREADS=1.

Usage: python benchmarks/bench_detection.py [--minutes 4] [--arms retinanet,segment_components]
[--dataset synthetic|hippocampus] [--out DIR] [--tiny]

``--tiny`` (benchmarks/tiny.py): 5 small scans (hippocampus: 4/2/2 cases of the split), one epoch per
arm; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "detection_synthetic_ct.yaml"
ARMS = ("retinanet", "segment_components")
DATASETS = ("synthetic", "hippocampus")
MIN_VOLUME_MM3 = 10.0
HIPPOCAMPUS = {"manifest": REPO / "data_manifests" / "msd_hippocampus.csv",
               "root": REPO.parent / "shared" / "data" / "msd_task04_hippocampus",
               "labels": {0: "background", 1: "anterior", 2: "posterior"}}
#: Smaller pieces of a hippocampus label are fragments, not a structure (the structures are 1-3 mL).
HIPPOCAMPUS_MIN_VOLUME_MM3 = 50.0
#: tiny mode: 5 scans of about 48 x 48 x 10 voxels at 1.6 x 1.6 x 4 mm, 32 x 32 x 8 patches
TINY_SYNTHETIC = {"cases": 5, "shape": [48, 48, 10], "spacing": [1.6, 1.6, 4.0], "lesions": [1, 3],
                  "radius_mm": [4.0, 7.0]}


def _detection_config(scratch: Path, minutes: float, tiny: bool) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["output_dir"] = str(scratch / "runs")
    cfg["tracking"] = {"uri": f"sqlite:///{scratch / 'mlflow.db'}", "experiment": "bench-detection"}
    cfg["data"].update(manifest=str(scratch / "lesions.csv"), root=str(scratch / "data"))
    cfg["train"].update(device="cpu", num_threads=1, max_minutes=None if tiny else minutes,
                        max_epochs=1 if tiny else None)
    if tiny:
        cfg["data"]["synthetic"].update(TINY_SYNTHETIC)
        cfg["patch"].update(size=[32, 32, 8], samples_per_volume=1)
        cfg["model"].update(channels=[8, 8, 16, 16], fpn_channels=8, anchor_shapes=[[4, 4, 2], [7, 7, 3]])
        cfg["train"].update(batch_size=2, iterations_per_epoch=2)
    return cfg


def _hippocampus_config(scratch: Path, minutes: float, tiny: bool) -> dict[str, Any]:
    """RetinaNet on MSD hippocampus (1 mm isotropic, about 35 x 51 x 35 voxels): the segmentation
    config's data, preprocessing and intensity augmentation (no flips: they would swap anterior and
    posterior), a stem strided on every axis and anchors spanning the structures' boxes (10th-90th
    percentile 17-24 x 15-25 x 12-23 voxels on 30 training cases)."""
    from tiny import subset_manifest

    manifest = HIPPOCAMPUS["manifest"]
    if tiny:
        manifest = subset_manifest(manifest, scratch / "hippocampus.csv", {"train": 4, "val": 2, "test": 2})
    return {
        "task": "detection", "seed": 0, "output_dir": str(scratch / "runs"),
        "data": {"manifest": str(manifest), "root": str(HIPPOCAMPUS["root"]), "channels": ["mri"],
                 "labels": HIPPOCAMPUS["labels"], "cache": "memory",
                 "boxes": {"min_volume_mm3": HIPPOCAMPUS_MIN_VOLUME_MM3}},
        "preprocess": {"orientation": "RAS", "spacing": None, "intensity": {"mode": "zscore"}},
        "augment": [{"name": "contrast", "prob": 0.3, "scale": 0.2, "shift": 0.1},
                    {"name": "gamma", "prob": 0.2, "gamma": [0.8, 1.25]}, {"name": "noise", "prob": 0.1, "std": 0.05}],
        "patch": {"size": [32, 48, 32], "samples_per_volume": 1 if tiny else 2, "pos_fraction": 0.67, "max_boxes": 8},
        "model": {"name": "retinanet", "spatial_dims": 3, "channels": [8, 8, 16, 16] if tiny else [16, 32, 64, 128],
                  "layers": [1, 1, 1, 1], "returned_layers": [1, 2], "stem_stride": [2, 2, 2],
                  "fpn_channels": 8 if tiny else 32, "anchor_shapes": [[16, 14, 12], [22, 18, 15], [22, 24, 20]]},
        "loss": {"name": "retinanet", "box_weight": 1.0, "negatives_per_image": 64, "positive_fraction": 0.3},
        "detect": {"overlap": 0.25, "score_threshold": 0.02, "nms_iou": 0.22, "max_boxes": 20},
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.00001, "schedule": "cosine", "warmup_fraction": 0.05},
        "train": {"max_epochs": 1 if tiny else None, "max_minutes": None if tiny else minutes, "batch_size": 2,
                  "iterations_per_epoch": 2 if tiny else None, "val_interval": 1, "device": "cpu", "precision": "fp32",
                  "num_threads": 1},
        "tracking": {"uri": f"sqlite:///{scratch / 'mlflow.db'}", "experiment": "bench-detection-hippocampus"},
    }


def _segmentation_config(detection: dict[str, Any]) -> dict[str, Any]:
    """The U-Net arm: the detection config's data, preprocessing, patch, augmentation, optimiser and
    budget, with a segmentation network and loss."""
    tiny = detection["train"].get("max_epochs") == 1
    isotropic = detection["model"].get("stem_stride") == [2, 2, 2]  # hippocampus: the U-Net of msd_hippocampus.yaml
    data = {k: v for k, v in detection["data"].items() if k not in ("boxes", "synthetic")}
    return {
        "task": "segmentation", "seed": detection["seed"], "output_dir": detection["output_dir"], "data": data,
        "preprocess": detection["preprocess"], "augment": detection["augment"],
        "patch": {"size": detection["patch"]["size"], "samples_per_volume": detection["patch"]["samples_per_volume"],
                  "sampler": "pos_neg", "pos_fraction": detection["patch"]["pos_fraction"]},
        "model": {"name": "unet", "spatial_dims": 3, "channels": [4, 8, 16] if tiny else [16, 32, 64, 128],
                  "strides": [2, 2] if tiny else [2, 2, 2] if isotropic else [2, 2, [2, 2, 1]], "num_res_units": 1,
                  "norm": "instance"},
        "loss": {"name": "dice_ce"}, "optim": detection["optim"], "train": detection["train"],
        "validation": {"overlap": 0.25, "calibrate": False}, "tracking": detection["tracking"],
    }


def _write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _test_scans(cfg: dict[str, Any]) -> list[tuple[str, Path, Path]]:
    """(case id, image, label) of the test split of the config's manifest."""
    from medseg.data.manifest import read_manifest

    root = Path(cfg["data"]["root"])
    return [(c.case_id, root / c.images[0], root / str(c.label)) for c in read_manifest(cfg["data"]["manifest"]).split("test")]


def _classes(cfg: dict[str, Any]) -> list[int]:
    return [int(v) for v in cfg["data"]["labels"] if int(v) != 0]


def _references(scans: list[tuple[str, Path, Path]], classes: list[int], min_volume_mm3: float) -> list[Any]:
    """Each test scan's reference boxes on its stored grid: each class's label-map components."""
    import nibabel as nib
    import numpy as np

    from medseg.tasks.detection.boxes import boxes_from_label

    out = []
    for _, _, label_path in scans:
        label = nib.load(label_path)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        out.append(boxes_from_label(np.asarray(label.dataobj), voxel, min_volume_mm3, classes, str(label_path)))
    return out


def _detector_boxes(result: Any, scans: list[tuple[str, Path, Path]], scratch: Path) -> list[Any]:
    """The trained detector's boxes of each test scan, read from ``medseg predict``'s JSON (stored grid)."""
    import numpy as np

    import medseg
    from medseg.tasks.detection.boxes import Boxes

    images = scratch / "test_images"
    images.mkdir(exist_ok=True)
    for case_id, image, _ in scans:
        link = images / f"{case_id}.nii.gz"
        if not link.exists():
            link.symlink_to(image)
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=result.tracking_uri, backend="torch")
    predictor.predict_folder(images, scratch / "boxes", progress=False)
    out = []
    for case_id, _, _ in scans:
        records = json.loads((scratch / "boxes" / f"{case_id}_boxes.json").read_text())["boxes"]
        corners = np.array([[*r["voxels"]["start"], *r["voxels"]["end"]] for r in records]).reshape(-1, 6)
        out.append(Boxes(corners, np.array([r["class"] for r in records], dtype=np.int64),
                         np.array([r["score"] for r in records], dtype=np.float64)))
    return out


def _component_boxes(result: Any, scans: list[tuple[str, Path, Path]], classes: list[int]) -> list[Any]:
    """The U-Net's components of each class in each test scan as boxes, each scored by its highest
    probability of that class."""
    import numpy as np
    from scipy import ndimage

    import medseg
    from medseg.tasks.detection.boxes import Boxes

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=result.tracking_uri, backend="torch")
    out = []
    for _, image, _ in scans:
        prediction = predictor.predict(image)
        corners, values, scores = [], [], []
        for value in classes:
            components, count = ndimage.label(np.asarray(prediction.label_map) == value)
            corners += [[*(s.start for s in r), *(s.stop for s in r)] for r in ndimage.find_objects(components)]
            scores += list(np.asarray(ndimage.maximum(np.asarray(prediction.probabilities)[value], components,
                                                      index=np.arange(1, count + 1)), dtype=np.float64).reshape(-1))
            values += [value] * count
        out.append(Boxes(np.array(corners, dtype=np.float64).reshape(-1, 6), np.array(values, dtype=np.int64),
                         np.array(scores, dtype=np.float64)))
    return out


def run_arm(name: str, scratch: Path, minutes: float, tiny: bool, dataset: str = "synthetic") -> dict[str, Any]:
    """Train one arm, find the test scans' lesions (or structures) with it and score them."""
    import medseg
    from medseg.tasks.detection.config import SyntheticLesionsConfig
    from medseg.tasks.detection.metrics import detection_scores
    from medseg.tasks.detection.synthetic import write_lesion_dataset

    if dataset == "hippocampus":
        detection = _hippocampus_config(scratch, minutes, tiny)
    else:
        detection = _detection_config(scratch, minutes, tiny)
        write_lesion_dataset(SyntheticLesionsConfig.model_validate(detection["data"]["synthetic"]), scratch / "data",
                             scratch / "lesions.csv")
    cfg = detection if name == "retinanet" else _segmentation_config(detection)
    result = medseg.train(_write_config(scratch / f"{name}.yaml", cfg), progress=False)
    assert result is not None and result.model_uri
    scans, classes = _test_scans(detection), _classes(detection)
    found = _detector_boxes(result, scans, scratch) if name == "retinanet" else _component_boxes(result, scans, classes)
    references = _references(scans, classes, detection["data"]["boxes"]["min_volume_mm3"] if dataset == "hippocampus"
                             else MIN_VOLUME_MM3)
    scores = detection_scores(found, references, classes, "test")
    patch = cfg["patch"]
    return {"epochs": result.metrics.get("train/epochs"), "train_minutes": result.metrics.get("train/minutes"),
            "patches_per_step": f"{cfg['train']['batch_size']} x {patch['samples_per_volume']} of "
                                f"{'x'.join(map(str, patch['size']))}",
            "test_scans": len(scans), **{k.removeprefix("test/"): v for k, v in scores.items()}}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    """``detection.md`` from every arm's entry."""
    synthetic = {k: a for k, a in results["arms"].items() if a.get("dataset", "synthetic") == "synthetic"}
    lines = ["# Detection: RetinaNet against segment-then-components (synthetic CT lesions)", "",
             f"Command: `{results.get('command', 'python benchmarks/bench_detection.py')}` (one invocation per arm). "
             "Data: `configs/detection_synthetic_ct.yaml`'s seeded synthetic CT set, 40 scans (24 train / 8 val / 8 "
             "test), 1-5 lesions per scan of 3-8 mm radius and 15-60 HU contrast; scored on the 8 held-out test scans "
             "on each scan's stored grid against the reference label map's components (at least 10 mm³).", "",
             "| arm | budget (min) | epochs | patches per step | sensitivity @1 FP/scan | @2 | @4 | FROC (mean) | "
             "mAP@0.1 | mAP@0.5 | reference lesions | predicted boxes / scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += _rows(synthetic)
    if any("patches_per_step" not in a for a in synthetic.values()):
        lines += ["", "Rows whose patches per step are not given were written before the benchmark recorded them, with "
                  "the config of commit d43663e: 4 scans x 2 patches of 64x64x16 per step."]
    lines += ["", "A hit is a predicted box matched one-to-one (greedily by score, MONAI's `matching_batch`) to a reference "
              "box at IoU 0.1 or more; every other box is a false positive. Sensitivity at k FP per scan is read off the "
              "FROC curve (MONAI's `compute_froc_score`); mAP is COCO's 101-point AP (MONAI's `COCOMetric`). The "
              "segmentation arm's boxes are the predicted mask's connected components, each scored by its highest "
              "lesion probability, so its FROC curve has as many operating points as it has components.", "",
              "Budgets are short on purpose: the host is a shared 2-core CPU machine with other sessions' jobs running "
              "(OMP_NUM_THREADS=1, one torch thread); these figures compare the two arms at equal budget on this host, "
              "they are not what either method reaches when trained to convergence.", "",
              "Host: " + results.get("host", "?"), ""]
    hippocampus = {k: a for k, a in results["arms"].items() if a.get("dataset") == "hippocampus"}
    if hippocampus:
        lines += _hippocampus_section(hippocampus)
    return "\n".join(lines)


def _rows(arms: dict[str, Any]) -> list[str]:
    return [f"| {name} | {a['minutes']} | {_fmt(a.get('epochs'))} | {a.get('patches_per_step', '-')}"
            f" | {_fmt(a['sensitivity_at_1fp'])} | "
            f"{_fmt(a['sensitivity_at_2fp'])} | {_fmt(a['sensitivity_at_4fp'])} | {_fmt(a['froc'])} | "
            f"{_fmt(a['map_iou0.1'])} | {_fmt(a['map_iou0.5'])} | {_fmt(a['reference_boxes'])} | "
            f"{_fmt(a['predicted_boxes_per_scan'])} |" for name, a in arms.items()]


def _hippocampus_section(arms: dict[str, Any]) -> list[str]:
    """The real-structure rows: MSD hippocampus's anterior and posterior structures as boxes."""
    hosts = sorted({a["host"] for a in arms.values() if a.get("host")})
    return ["## MSD hippocampus: anterior and posterior structures as boxes", "",
            "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_detection.py --dataset hippocampus --minutes <budget> "
            "--arms <arm>` (one invocation per arm). Data: MSD Task04 from `../shared/data` on the committed split of "
            "`data_manifests/msd_hippocampus.csv` (182 train / 26 val / 52 test, 1 mm isotropic); each scan's anterior "
            f"and posterior hippocampus are boxes, the connected components of each label of at least "
            f"{HIPPOCAMPUS_MIN_VOLUME_MM3:g} mm³, through the label-map -> boxes path training uses. Both arms use the "
            "same data, preprocessing (RAS, z-score), 32x48x32 patches and intensity augmentation (no flips: they would "
            "swap anterior and posterior); a hit must match a reference box of its own class. Scored on the "
            f"{max(a['test_scans'] for a in arms.values())} held-out test scans like the rows above.", "",
            "| arm | budget (min) | epochs | patches per step | sensitivity @1 FP/scan | @2 | @4 | FROC (mean) | "
            "mAP@0.1 | mAP@0.5 | reference boxes | predicted boxes / scan |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *_rows(arms), "",
            "Every scan holds exactly one structure of each class, so this is localisation more than detection: FROC "
            "and mAP@0.1 reach 1 as soon as each arm's best box of each class lands on its structure, and mAP@0.5 then "
            "says how closely the boxes fit. The figures are what a few minutes of training buy on this host, not "
            "what either arm reaches when trained to convergence.", "",
            "Host (shared with other sessions' jobs; OMP_NUM_THREADS=1, one torch thread): " + "; ".join(hosts), ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget of every arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic",
                        help="synthetic CT lesions, or MSD hippocampus's anterior and posterior structures as boxes")
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if sorted(set(arms) - set(ARMS)):
        raise SystemExit(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {list(ARMS)}")
    out = results_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    for name in arms:
        host = (f"{platform.node() or 'host'}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                f"load average {os.getloadavg()[0]:.1f} when the last arm started, shared with other sessions")
        started = time.monotonic()
        entry = run_arm(name, scratch_folder(f"bench-detection-{name}-", args, out), args.minutes, args.tiny,
                        args.dataset)
        entry = {**entry, "minutes": args.minutes, "wall_s": round(time.monotonic() - started, 1),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host}
        key = f"{name}, {args.minutes:g} min"
        if args.dataset != "synthetic":
            entry["dataset"] = args.dataset
            key = f"{args.dataset}: {key}"
        _record(out, key, entry, host)
        print(f"{name}: {json.dumps(entry)}", flush=True)


def _record(out: Path, key: str, entry: dict[str, Any], host: str) -> None:
    """Add one arm's entry to detection.json and rewrite detection.md, under a lock: arms may run at once."""
    import fcntl
    import hashlib
    import tempfile

    from medseg.io.atomic import atomic_write_text
    from medseg.io.locks import open_lock_file

    # the lock lives outside the results folder, which holds committed files only
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    fd = open_lock_file(Path(tempfile.gettempdir()) / f"medseg-bench-detection-{digest}.lock", f"the results in {out}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        json_path = out / "detection.json"
        results = json.loads(json_path.read_text()) if json_path.is_file() else {"arms": {}}
        if "dataset" not in entry:  # the synthetic rows' command and host; other datasets' entries keep their own
            results["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
                                  "benchmarks/bench_detection.py --minutes <budget> --arms <arm>")
            results["host"] = host
        results["arms"][key] = entry
        atomic_write_text(json_path, json.dumps(results, indent=2))
        atomic_write_text(out / "detection.md", markdown(results))
    finally:
        os.close(fd)  # releases the lock


if __name__ == "__main__":
    main()
