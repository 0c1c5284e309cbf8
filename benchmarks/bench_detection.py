"""Detection benchmark: lesions found by a detector against lesions found by segmenting, at one budget.

Data (``--dataset``):

- ``synthetic`` (default): the seeded synthetic CT lesion set of ``configs/detection_synthetic_ct.yaml``
  (40 scans, 1-5 lesions each, 24 train / 8 val / 8 test), written once into a scratch folder.
- ``hippocampus``: MSD Task04 from ``../shared/data`` on the committed split of
  ``data_manifests/msd_hippocampus.csv`` (182 train / 26 val / 52 test): the anterior and posterior
  hippocampus as boxes, each the connected components of its label (at least
  :data:`HIPPOCAMPUS_MIN_VOLUME_MM3`), through the same label-map -> boxes path as training.
- ``brain_tumour``: real tumours: the three post-contrast T1 brain MR scans with tumour masks in
  ``../shared/data`` (PyRadiomics' brain1 and brain2 as NRRD, TCIA's PGBM-001 as two DICOM series),
  read through medseg's reader registry like any input. Three scans make a leave-one-case-out
  benchmark: each arm trains three times, on two scans, and is scored on the third; the figures pool
  the three held-out scans (each fold's are in the JSON). Tumours are the mask's components of at
  least :data:`BRAIN_TUMOUR_MIN_VOLUME_MM3`; ``--minutes`` is then each fold's budget.

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
[--dataset synthetic|hippocampus|brain_tumour] [--tracking-uri URI] [--out DIR] [--tiny]

``--tracking-uri`` keeps the arms' MLflow runs in a store of the user's (each entry then names its run,
per fold for brain_tumour) to compare them in the MLflow UI; by default each arm's store sits in its
scratch folder and goes with it.

``--tiny`` (benchmarks/tiny.py): 5 small scans (hippocampus: 4/2/2 cases of the split; brain_tumour:
the fold that holds PGBM-001 out, on a 3 mm grid), one epoch per arm; for the test suite, never into
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
DATASETS = ("synthetic", "hippocampus", "brain_tumour")
MIN_VOLUME_MM3 = 10.0
HIPPOCAMPUS = {"manifest": REPO / "data_manifests" / "msd_hippocampus.csv",
               "root": REPO.parent / "shared" / "data" / "msd_task04_hippocampus",
               "labels": {0: "background", 1: "anterior", 2: "posterior"}}
#: Smaller pieces of a hippocampus label are fragments, not a structure (the structures are 1-3 mL).
HIPPOCAMPUS_MIN_VOLUME_MM3 = 50.0
BRAIN_TUMOUR = {
    "root": REPO.parent / "shared" / "data",
    # case id -> (image, tumour mask) under the root: post-contrast T1 MR, 0.69-0.78 mm in-plane, 6.5 mm slices
    "cases": {"brain1": ("pyradiomics_testcases/imagesTr/brain1.nrrd", "pyradiomics_testcases/labelsTr/brain1.nrrd"),
              "brain2": ("pyradiomics_testcases/imagesTr/brain2.nrrd", "pyradiomics_testcases/labelsTr/brain2.nrrd"),
              "PGBM-001": ("tcia_brain_tumor_progression_pgbm001/T1post",
                           "tcia_brain_tumor_progression_pgbm001/MaskTumor")},
    "labels": {0: "background", 1: "tumour"}}
#: PGBM-001's mask has 60 specks of 1-17 voxels (at most 52 mm³) beside its 20 mL tumour: not lesions.
#: The smallest tumour kept, brain2's, is 1.8 mL; brain1's satellite is 2.4 mL.
BRAIN_TUMOUR_MIN_VOLUME_MM3 = 100.0
#: 1.5 mm in-plane (about half the stored resolution: a 4x cheaper CPU step), the 6.5 mm slices kept
BRAIN_TUMOUR_SPACING = [1.5, 1.5, 6.5]
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


def _brain_tumour_manifest(held_out: str, path: Path) -> Path:
    """One leave-one-case-out fold's manifest: ``held_out`` is the test scan; the other two train, as
    folds 0 and 1, so that ``train_folds: all`` trains on both (fold 0's validation only monitors)."""
    from medseg.data.manifest import Case, sha256_of, write_manifest

    root, cases = BRAIN_TUMOUR["root"], []
    for case_id, (image, label) in BRAIN_TUMOUR["cases"].items():
        missing = [str(root / p) for p in (image, label) if not (root / p).exists()]
        if missing:
            raise SystemExit(f"--dataset brain_tumour: Expected the scan and tumour mask of {case_id} under {root}. "
                             f"Got no {', '.join(missing)}. Fix: put the shared data kit at {root} (see its README.md).")
        fold = None if case_id == held_out else sum(c.split == "train" for c in cases)
        cases.append(Case(case_id, (image,), label, "test" if fold is None else "train", fold,
                          image_sha256=(sha256_of(root / image),), label_sha256=sha256_of(root / label)))
    return write_manifest(cases, path)


def _brain_tumour_config(scratch: Path, fold: Path, manifest: Path, minutes: float, tiny: bool) -> dict[str, Any]:
    """RetinaNet on two of the three brain tumour scans (one fold, its files in ``fold``). The slices
    are 6.5 mm, 8-9x the in-plane spacing: resampled to 1.5 mm in-plane (the CPU budget's choice;
    nnU-Net would keep 0.78 mm) with the slices kept, never interpolated; 64 x 64 x 16 patches (96 x
    96 x 104 mm: twice the largest tumour box, PGBM-001's 31 x 28 x 8 voxels, rounded up to the
    network's size divisor, as the detection planner sizes them; the 23-25 slices leave the crop room
    along z); the default stem (stride 2 in-plane, 1 along z: the planner's for slices this thick)
    and anchors for tumours of 10 x 8 x 3 (brain2) to 31 x 28 x 8 voxels on that grid. Flips left-right and
    front-back, and intensity augmentation: two training scans need all the variety they can get."""
    return {
        "task": "detection", "seed": 0, "output_dir": str(fold / "runs"),
        "data": {"manifest": str(manifest), "root": str(BRAIN_TUMOUR["root"]), "channels": ["t1c"],
                 "labels": BRAIN_TUMOUR["labels"], "cache": "memory", "fold": 0, "train_folds": "all",
                 "boxes": {"min_volume_mm3": BRAIN_TUMOUR_MIN_VOLUME_MM3}},
        "preprocess": {"orientation": "RAS", "spacing": [3.0, 3.0, 6.5] if tiny else BRAIN_TUMOUR_SPACING,
                       "intensity": {"mode": "zscore"}},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]},
                    {"name": "contrast", "prob": 0.3, "scale": 0.2, "shift": 0.1},
                    {"name": "gamma", "prob": 0.2, "gamma": [0.8, 1.25]}, {"name": "noise", "prob": 0.1, "std": 0.05}],
        "patch": {"size": [32, 32, 8] if tiny else [64, 64, 16], "samples_per_volume": 1 if tiny else 2,
                  "pos_fraction": 0.67, "max_boxes": 8},
        "model": {"name": "retinanet", "spatial_dims": 3, "channels": [8, 8, 16, 16] if tiny else [16, 32, 64, 128],
                  "layers": [1, 1, 1, 1], "returned_layers": [1, 2], "fpn_channels": 8 if tiny else 32,
                  "anchor_shapes": [[4, 4, 2], [7, 7, 3]] if tiny else [[10, 10, 3], [14, 14, 4], [20, 20, 5]]},
        "loss": {"name": "retinanet", "box_weight": 1.0, "negatives_per_image": 64, "positive_fraction": 0.3},
        "detect": {"overlap": 0.25, "score_threshold": 0.02, "nms_iou": 0.22, "max_boxes": 20},
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.00001, "schedule": "cosine", "warmup_fraction": 0.05},
        # validation (fold 0, a training scan) only monitors: once, at the end, so the budget goes to training
        "train": {"max_epochs": 1 if tiny else None, "max_minutes": None if tiny else minutes, "batch_size": 2,
                  "iterations_per_epoch": 2 if tiny else 20, "val_interval": 1000, "device": "cpu",
                  "precision": "fp32", "num_threads": 1},
        "tracking": {"uri": f"sqlite:///{scratch / 'mlflow.db'}", "experiment": "bench-detection-brain-tumour"},
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
    """Each test scan's reference boxes on its stored grid: each class's label-map components. The label
    is read through medseg's reader registry (NIfTI, NRRD, a DICOM series folder), as ``medseg predict``
    reads its input, so both index the same array."""
    import numpy as np

    from medseg.io.readers import load_volume
    from medseg.tasks.detection.boxes import boxes_from_label

    out = []
    for _, _, label_path in scans:
        label = load_volume(label_path)
        voxel = abs(float(np.linalg.det(np.asarray(label.affine, dtype=np.float64)[:3, :3])))
        out.append(boxes_from_label(np.asarray(label[0]), voxel, min_volume_mm3, classes, str(label_path)))
    return out


def _detector_boxes(result: Any, scans: list[tuple[str, Path, Path]], scratch: Path) -> list[Any]:
    """The trained detector's boxes of each test scan, read from ``medseg predict``'s JSON (stored grid);
    one scan (a file or a DICOM series folder) a batch, so that its JSON is the batch's only one."""
    import numpy as np

    import medseg
    from medseg.tasks.detection.boxes import Boxes

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=result.tracking_uri, backend="torch")
    out = []
    for case_id, image, _ in scans:
        [case] = predictor.predict_paths([image], scratch / "boxes" / case_id).results
        if case.status != "ok":
            raise RuntimeError(f"{image}: medseg predict did not find its boxes ({case.status}: {case.error})")
        records = json.loads(Path(case.outputs["boxes"]).read_text())["boxes"]
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


def run_arm(name: str, scratch: Path, minutes: float, tiny: bool, dataset: str = "synthetic",
            tracking_uri: str | None = None) -> dict[str, Any]:
    """Train one arm, find the test scans' lesions (or structures) with it and score them; its runs are
    logged to ``tracking_uri`` (default: a store in ``scratch``)."""
    from medseg.tasks.detection.config import SyntheticLesionsConfig
    from medseg.tasks.detection.synthetic import write_lesion_dataset

    if dataset == "brain_tumour":
        return _brain_tumour_arm(name, scratch, minutes, tiny, tracking_uri)
    if dataset == "hippocampus":
        detection, min_volume = _hippocampus_config(scratch, minutes, tiny), HIPPOCAMPUS_MIN_VOLUME_MM3
    else:
        detection, min_volume = _detection_config(scratch, minutes, tiny), MIN_VOLUME_MM3
        write_lesion_dataset(SyntheticLesionsConfig.model_validate(detection["data"]["synthetic"]), scratch / "data",
                             scratch / "lesions.csv")
    found, references, run = _train_and_find(name, detection, scratch, min_volume, tracking_uri)
    return {**run, **_scores(found, references, _classes(detection))}


def _train_and_find(name: str, detection: dict[str, Any], scratch: Path, min_volume_mm3: float,
                    tracking_uri: str | None = None) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Train one arm on ``detection``'s data: the test scans' found and reference boxes, and the run's
    epochs, minutes, patches and MLflow run."""
    import medseg

    if tracking_uri:  # a store that outlives the scratch folder, to compare the arms' runs in the MLflow UI
        detection = {**detection, "tracking": {**detection["tracking"], "uri": tracking_uri}}
    cfg = detection if name == "retinanet" else _segmentation_config(detection)
    result = medseg.train(_write_config(scratch / f"{name}.yaml", cfg), progress=False)
    assert result is not None and result.model_uri
    scans, classes = _test_scans(detection), _classes(detection)
    found = _detector_boxes(result, scans, scratch) if name == "retinanet" else _component_boxes(result, scans, classes)
    patch = cfg["patch"]
    return found, _references(scans, classes, min_volume_mm3), {
        "epochs": result.metrics.get("train/epochs"), "train_minutes": result.metrics.get("train/minutes"),
        "patches_per_step": f"{cfg['train']['batch_size']} x {patch['samples_per_volume']} of "
                            f"{'x'.join(map(str, patch['size']))}", "test_scans": len(scans),
        **({"run_id": result.run_id, "tracking_uri": result.tracking_uri} if tracking_uri else {})}


def _scores(found: list[Any], references: list[Any], classes: list[int]) -> dict[str, float]:
    from medseg.tasks.detection.metrics import detection_scores

    return {k.removeprefix("test/"): v for k, v in detection_scores(found, references, classes, "test").items()}


def _brain_tumour_arm(name: str, scratch: Path, minutes: float, tiny: bool,
                      tracking_uri: str | None = None) -> dict[str, Any]:
    """Leave-one-case-out: one fold per scan (tiny: PGBM-001's only), each arm trained on the other two
    for ``minutes``; scored on the held-out scans pooled (FP per scan over all three) and per fold."""
    cases = list(BRAIN_TUMOUR["cases"])
    classes = [int(v) for v in BRAIN_TUMOUR["labels"] if int(v) != 0]
    found: list[Any] = []
    references: list[Any] = []
    folds: dict[str, dict[str, Any]] = {}
    for held_out in cases[-1:] if tiny else cases:
        fold = scratch / held_out
        fold.mkdir(parents=True, exist_ok=True)
        detection = _brain_tumour_config(scratch, fold, _brain_tumour_manifest(held_out, fold / "cases.csv"),
                                         minutes, tiny)
        fold_found, fold_references, run = _train_and_find(name, detection, fold, BRAIN_TUMOUR_MIN_VOLUME_MM3,
                                                           tracking_uri)
        found += fold_found
        references += fold_references
        folds[held_out] = {"trained_on": [c for c in cases if c != held_out], **run,
                           **_scores(fold_found, fold_references, classes)}
        print(f"{name}, {held_out} held out: {json.dumps(folds[held_out])}", flush=True)
    runs = list(folds.values())
    return {"epochs": [r["epochs"] for r in runs], "train_minutes": [r["train_minutes"] for r in runs],
            "patches_per_step": runs[0]["patches_per_step"], "test_scans": len(references),
            **_scores(found, references, classes), "folds": folds}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


#: How every section is scored.
SCORING = ("A hit is a predicted box matched one-to-one (greedily by score, MONAI's `matching_batch`) to a reference "
           "box at IoU 0.1 or more; every other box is a false positive. Sensitivity at k FP per scan is read off the "
           "FROC curve (MONAI's `compute_froc_score`); mAP is COCO's 101-point AP (MONAI's `COCOMetric`). The "
           "segmentation arm's boxes are the predicted mask's connected components, each scored by its highest "
           "lesion probability, so its FROC curve has as many operating points as it has components.")


def markdown(results: dict[str, Any]) -> str:
    """``detection.md`` from every arm's entry: the synthetic rows (or, without them, how boxes are scored),
    then each real dataset's section."""
    synthetic = {k: a for k, a in results["arms"].items() if a.get("dataset", "synthetic") == "synthetic"}
    lines = ["# Detection: RetinaNet against segment-then-components (synthetic CT lesions)", ""]
    lines += _synthetic_section(results, synthetic) if synthetic else [SCORING, ""]
    hippocampus = {k: a for k, a in results["arms"].items() if a.get("dataset") == "hippocampus"}
    if hippocampus:
        lines += _hippocampus_section(hippocampus)
    tumours = {k: a for k, a in results["arms"].items() if a.get("dataset") == "brain_tumour"}
    if tumours:
        lines += _brain_tumour_section(tumours)
    return "\n".join(lines)


def _synthetic_section(results: dict[str, Any], synthetic: dict[str, Any]) -> list[str]:
    lines = [f"Command: `{results.get('command', 'python benchmarks/bench_detection.py')}` (one invocation per arm). "
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
    return lines + ["", SCORING, "",
                    "Budgets are short on purpose: the host is a shared 2-core CPU machine with other sessions' jobs "
                    "running (OMP_NUM_THREADS=1, one torch thread); these figures compare the two arms at equal budget "
                    "on this host, they are not what either method reaches when trained to convergence.", "",
                    "Host: " + results.get("host", "?"), ""]


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


def _brain_tumour_section(arms: dict[str, Any]) -> list[str]:
    """The real-tumour rows: leave-one-case-out over three post-contrast T1 brain scans, pooled and per fold."""
    hosts = sorted({a["host"] for a in arms.values() if a.get("host")})
    return ["## Real tumours: three post-contrast T1 brain MR scans, leave-one-case-out", "",
            "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_detection.py --dataset brain_tumour --minutes "
            "<budget per fold> --arms <arm>` (one invocation per arm, one arm after the other). Data, from the kit in "
            "`../shared/data` (its README.md gives the provenance): **brain1** and **brain2**, PyRadiomics' test cases "
            "(AIM-Harvard/pyradiomics @ 8ed5793, `data/`; BSD-3-Clause, the repository's only licence; brain1 is TCIA "
            "TCGA-GBM patient TCGA-02-0003, pre-operative, its label a binarised FSL clustering; brain2's origin is not "
            "stated), NRRD, 256x256x25 and 256x256x23 voxels of 0.78x0.78x6.5 mm; and **PGBM-001**, TCIA "
            "Brain-Tumor-Progression (via udacity/nd320-c3-3d-med-imaging @ cdf9ad8; CC BY 3.0 as TCIA lists the "
            "collection, which the kit could not re-check offline): its T1post DICOM series and its Mask_Tumor DICOM "
            "series on the same oblique grid, 260x320x24 voxels of 0.69x0.69 mm, 6.5 mm apart. Cite van Griethuysen "
            "et al., Cancer Research 77(21):e104-e107 (2017) (PyRadiomics); Scarpace et al., TCGA-GBM, TCIA (2016), "
            "doi:10.7937/K9/TCIA.2016.RNYFUYE9 (brain1; the DOI is the kit's recollection); Schmainda and Prah, "
            "Brain-Tumor-Progression, TCIA (2018), doi:10.7937/K9/TCIA.2018.15quzvnb (PGBM-001); and Clark et al., "
            "J Digit Imaging 26:1045-1057 (2013) (TCIA). Every file is read by medseg's reader registry (the NRRD "
            "and DICOM-folder readers `medseg predict` uses).", "",
            "Three scans make three folds: each arm trains on two scans for the budget and is scored on the third; "
            "fold 0 of the two validates but only monitors (`train_folds: all`, the last weights kept), so nothing is "
            "selected on the held-out scan. Reference tumours are each mask's connected components of at least "
            f"{BRAIN_TUMOUR_MIN_VOLUME_MM3:g} mm³ (PGBM-001's mask has 60 specks of 1-17 voxels beside its tumour), "
            "through the label-map -> boxes path training uses. Both arms: RAS, resampled to "
            f"{'x'.join(f'{v:g}' for v in BRAIN_TUMOUR_SPACING)} mm (the 6.5 mm slices kept, in-plane coarsened for "
            "the CPU budget), z-score, 64x64x16 patches (96x96x104 mm), flips left-right and front-back and intensity "
            "augmentation. The table pools the three held-out scans (false positives per scan over all three); the "
            "second gives each fold.", "",
            "| arm | budget per fold (min) | epochs per fold | patches per step | sensitivity @1 FP/scan | @2 | @4 | "
            "FROC (mean) | mAP@0.1 | mAP@0.5 | reference tumours | predicted boxes / scan |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *_rows({k: {**a, "epochs": "/".join(_fmt(e) for e in a["epochs"])} for k, a in arms.items()}), "",
            "| arm | held-out scan | trained on | epochs | sensitivity @1 FP/scan | @2 | @4 | FROC (mean) | mAP@0.1 | "
            "mAP@0.5 | reference tumours | predicted boxes |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {name} | {scan} | {', '.join(f['trained_on'])} | {_fmt(f.get('epochs'))} | "
              f"{_fmt(f['sensitivity_at_1fp'])} | {_fmt(f['sensitivity_at_2fp'])} | {_fmt(f['sensitivity_at_4fp'])} | "
              f"{_fmt(f['froc'])} | {_fmt(f['map_iou0.1'])} | {_fmt(f['map_iou0.5'])} | {_fmt(f['reference_boxes'])} | "
              f"{_fmt(f['predicted_boxes_per_scan'])} |" for name, a in arms.items() for scan, f in a["folds"].items()],
            "", "With a handful of reference tumours in all, each is a large step of sensitivity, and a model trained "
            "on two scans for a few minutes on a shared CPU says little about either method at convergence: these rows "
            "show that both arms run on real scans and real masks through the same scoring, and where they stand at "
            "this budget, not a precise comparison.", "",
            "Host (shared with other sessions' jobs; OMP_NUM_THREADS=1, one torch thread): " + "; ".join(hosts), ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget of every arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic",
                        help="synthetic CT lesions, MSD hippocampus's anterior and posterior structures as boxes, or the "
                             "three brain tumour scans of ../shared/data, leave-one-case-out")
    parser.add_argument("--tracking-uri", help="MLflow store of the arms' runs (default: one in each arm's scratch "
                        "folder, gone with it)")
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
                        args.dataset, args.tracking_uri)
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
