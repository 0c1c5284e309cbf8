"""Detection benchmark: lesions found by a detector against lesions found by segmenting, at one budget.

Data: the seeded synthetic CT lesion set of ``configs/detection_synthetic_ct.yaml`` (40 scans, 1-5
lesions each, 24 train / 8 val / 8 test), written once into a scratch folder.

Arms, each trained for the same ``--minutes`` on this machine (one ``medseg.train`` run each):

- **retinanet**: ``configs/detection_synthetic_ct.yaml``: MONAI's RetinaNet on patches; ``medseg
  predict`` then writes each held-out scan's boxes (sliding window, NMS).
- **segment_components**: a 3D U-Net (``task: segmentation``, lesion vs background, the same
  preprocessing, patch and augmentation); each held-out scan's predicted mask split into connected
  components, each a box scored by its highest lesion probability.

Both are scored the same way on the 8 test scans, on each scan's stored voxel grid: reference boxes
are the connected components of the reference label map (at least 10 mm³), and FROC (sensitivity at
1, 2 and 4 false positives per scan, hits at IoU 0.1) and mAP at IoU 0.1 and 0.5 come from
:mod:`medseg.tasks.detection.metrics`.

Each arm writes its entry into ``detection.json`` (arms run as separate invocations with ``--arms``)
and ``detection.md`` is rewritten from all entries. The host is shared: run with OMP_NUM_THREADS=1.

Usage: python benchmarks/bench_detection.py [--minutes 4] [--arms retinanet,segment_components] [--out DIR] [--tiny]

``--tiny`` (benchmarks/tiny.py): 5 small scans, one epoch per arm; for the test suite, never into
benchmarks/results.
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
MIN_VOLUME_MM3 = 10.0
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


def _segmentation_config(detection: dict[str, Any]) -> dict[str, Any]:
    """The U-Net arm: the detection config's data, preprocessing, patch, augmentation, optimiser and
    budget, with a segmentation network and loss."""
    tiny = detection["patch"]["size"] == [32, 32, 8]
    data = {k: v for k, v in detection["data"].items() if k not in ("boxes", "synthetic")}
    return {
        "task": "segmentation", "seed": detection["seed"], "output_dir": detection["output_dir"], "data": data,
        "preprocess": detection["preprocess"], "augment": detection["augment"],
        "patch": {"size": detection["patch"]["size"], "samples_per_volume": detection["patch"]["samples_per_volume"],
                  "sampler": "pos_neg", "pos_fraction": detection["patch"]["pos_fraction"]},
        "model": {"name": "unet", "spatial_dims": 3, "channels": [4, 8, 16] if tiny else [16, 32, 64, 128],
                  "strides": [2, 2] if tiny else [2, 2, [2, 2, 1]], "num_res_units": 1, "norm": "instance"},
        "loss": {"name": "dice_ce"}, "optim": detection["optim"], "train": detection["train"],
        "validation": {"overlap": 0.25, "calibrate": False}, "tracking": detection["tracking"],
    }


def _write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _test_scans(scratch: Path) -> list[tuple[str, Path, Path]]:
    """(case id, image, label) of the test split."""
    from medseg.data.manifest import read_manifest

    root = scratch / "data"
    return [(c.case_id, root / c.images[0], root / str(c.label)) for c in read_manifest(scratch / "lesions.csv").split("test")]


def _references(scans: list[tuple[str, Path, Path]]) -> list[Any]:
    """Each test scan's reference boxes on its stored grid: the label map's components."""
    import nibabel as nib
    import numpy as np

    from medseg.tasks.detection.boxes import boxes_from_label

    out = []
    for _, _, label_path in scans:
        label = nib.load(label_path)
        voxel = abs(float(np.linalg.det(label.affine[:3, :3])))
        out.append(boxes_from_label(np.asarray(label.dataobj), voxel, MIN_VOLUME_MM3, [1], str(label_path)))
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


def _component_boxes(result: Any, scans: list[tuple[str, Path, Path]]) -> list[Any]:
    """The U-Net's lesion components of each test scan as boxes scored by their highest lesion probability."""
    import numpy as np
    from scipy import ndimage

    import medseg
    from medseg.tasks.detection.boxes import Boxes

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=result.tracking_uri, backend="torch")
    out = []
    for _, image, _ in scans:
        prediction = predictor.predict(image)
        lesion = np.asarray(prediction.probabilities)[1]
        components, count = ndimage.label(np.asarray(prediction.label_map) == 1)
        regions = ndimage.find_objects(components)
        corners = np.array([[*(s.start for s in r), *(s.stop for s in r)] for r in regions],
                           dtype=np.float64).reshape(-1, 6)
        scores = np.asarray(ndimage.maximum(lesion, components, index=np.arange(1, count + 1)),
                            dtype=np.float64).reshape(-1)
        out.append(Boxes(corners, np.ones(count, dtype=np.int64), scores))
    return out


def run_arm(name: str, scratch: Path, minutes: float, tiny: bool) -> dict[str, Any]:
    """Train one arm, find the test scans' lesions with it and score them."""
    import medseg
    from medseg.tasks.detection.config import SyntheticLesionsConfig
    from medseg.tasks.detection.metrics import detection_scores
    from medseg.tasks.detection.synthetic import write_lesion_dataset

    detection = _detection_config(scratch, minutes, tiny)
    write_lesion_dataset(SyntheticLesionsConfig.model_validate(detection["data"]["synthetic"]), scratch / "data",
                         scratch / "lesions.csv")
    cfg = detection if name == "retinanet" else _segmentation_config(detection)
    result = medseg.train(_write_config(scratch / f"{name}.yaml", cfg), progress=False)
    assert result is not None and result.model_uri
    scans = _test_scans(scratch)
    found = _detector_boxes(result, scans, scratch) if name == "retinanet" else _component_boxes(result, scans)
    scores = detection_scores(found, _references(scans), [1], "test")
    patch = cfg["patch"]
    return {"epochs": result.metrics.get("train/epochs"), "train_minutes": result.metrics.get("train/minutes"),
            "patches_per_step": f"{cfg['train']['batch_size']} x {patch['samples_per_volume']} of "
                                f"{'x'.join(map(str, patch['size']))}",
            "test_scans": len(scans), **{k.removeprefix("test/"): v for k, v in scores.items()}}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    """``detection.md`` from every arm's entry."""
    lines = ["# Detection: RetinaNet against segment-then-components (synthetic CT lesions)", "",
             f"Command: `{results.get('command', 'python benchmarks/bench_detection.py')}` (one invocation per arm). "
             "Data: `configs/detection_synthetic_ct.yaml`'s seeded synthetic CT set, 40 scans (24 train / 8 val / 8 "
             "test), 1-5 lesions per scan of 3-8 mm radius and 15-60 HU contrast; scored on the 8 held-out test scans "
             "on each scan's stored grid against the reference label map's components (at least 10 mm³).", "",
             "| arm | budget (min) | epochs | patches per step | sensitivity @1 FP/scan | @2 | @4 | FROC (mean) | "
             "mAP@0.1 | mAP@0.5 | reference lesions | predicted boxes / scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in results["arms"].items():
        lines.append(f"| {name} | {a['minutes']} | {_fmt(a.get('epochs'))} | {a.get('patches_per_step', '-')}"
                     f" | {_fmt(a['sensitivity_at_1fp'])} | "
                     f"{_fmt(a['sensitivity_at_2fp'])} | {_fmt(a['sensitivity_at_4fp'])} | {_fmt(a['froc'])} | "
                     f"{_fmt(a['map_iou0.1'])} | {_fmt(a['map_iou0.5'])} | {_fmt(a['reference_boxes'])} | "
                     f"{_fmt(a['predicted_boxes_per_scan'])} |")
    if any("patches_per_step" not in a for a in results["arms"].values()):
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget of every arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
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
        entry = run_arm(name, scratch_folder(f"bench-detection-{name}-", args, out), args.minutes, args.tiny)
        entry = {**entry, "minutes": args.minutes, "wall_s": round(time.monotonic() - started, 1),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        _record(out, f"{name}, {args.minutes:g} min", entry, host)
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
