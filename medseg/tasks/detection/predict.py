"""Detection of one scan with a loaded model: the contract's preprocessing, MONAI's sliding-window
detector on the preprocessed grid (NMS within a prediction), the predictions of every ensemble member
and TTA flip fused into one list (``detect.fusion``: weighted boxes fusion or NMS, on the preprocessed
grid the members share; :mod:`medseg.tasks.detection.fusion`), and every box given back twice: in
world millimetres (RAS, the frame medseg's affines are in) and in voxel indices of the input as stored.

Each case writes ``<case>_boxes.json`` (every box, best first: class, score, ``world_mm`` min/max
corners, ``voxels`` start/end (end exclusive), the preprocessed grid's too; the input's shape);
``predictions.csv`` has its path, the box count, the count scoring 0.5 or more, the best score, the
confident boxes touching the image's edge and the QC flag with its reasons (:mod:`.qc`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.data.transforms import preprocessing_from_contract
from medseg.engine.case_io import preprocess_case
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.tta import flip_combinations, flip_spatial, tta_axes
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import InputCase
from medseg.io.naming import output_paths
from medseg.tasks.detection.boxes import Boxes, spatial_affine, voxel_to_world, world_to_voxel
from medseg.tasks.detection.config import DetectConfig, DetectionModelConfig
from medseg.tasks.detection.detect import detect_boxes
from medseg.tasks.detection.fusion import fuse_boxes, unflip_boxes
from medseg.tasks.detection.qc import CONFIDENT, box_quality, edge_boxes, qc_thresholds


def box_records(boxes: Boxes, grid_affine: np.ndarray, input_affine: np.ndarray,
                class_names: dict[str, str]) -> list[dict[str, Any]]:
    """Every box as JSON: world mm corners, voxel indices of the input and of the preprocessed grid."""
    world = voxel_to_world(boxes.corners, grid_affine)
    on_input = world_to_voxel(world, input_affine)
    scores = boxes.scores if boxes.scores is not None else np.ones(len(boxes))
    dims = boxes.dims
    return [{"class": int(c), "class_name": class_names.get(str(int(c)), str(int(c))), "score": round(float(s), 6),
             "world_mm": {"min": _round(w[:dims]), "max": _round(w[dims:])},
             "voxels": {"start": _round(v[:dims]), "end": _round(v[dims:])},
             "preprocessed_voxels": {"start": _round(g[:dims]), "end": _round(g[dims:])}}
            for c, s, w, v, g in zip(boxes.classes, scores, world, on_input, boxes.corners)]


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in values]


@dataclass(frozen=True)
class ScanBoxes:
    """One scan's fused boxes on the preprocessed grid, that grid's affine and the input's (both RAS),
    and the input's spatial shape (None when the input does not say)."""

    boxes: Boxes
    grid: np.ndarray
    stored: np.ndarray
    shape: tuple[int, ...] | None


class DetectionPredictor:
    """The boxes of the scans of a folder or in memory."""

    output_columns: tuple[str, ...] = ("boxes",)
    value_columns: tuple[str, ...] = ("n_boxes", "confident_boxes", "max_score", "edge_boxes", "qc_flag", "qc_reason")

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model, self.options, self.device = model, options, device
        contract = model.contract
        self.model_cfg = DetectionModelConfig.model_validate(contract["model"])
        self.detect = DetectConfig.model_validate(contract["detect"])
        # every member searches with its own window; the flips are those its training flipped
        self.members = [(network, tuple(int(s) for s in member.get("window", contract["window"])))
                        for network, member in model.members()]
        self.flips = flip_combinations(self.model_cfg.spatial_dims, options.tta,
                                       tta_axes(contract, options.tta, f"model {model.uri}"))
        self.class_names: dict[str, str] = dict(contract.get("box_classes", {}))
        self.qc = qc_thresholds(contract, options.qc)
        self._chains = {load: preprocessing_from_contract(contract, load=load, allow_constant=options.allow_constant)
                        for load in (True, False)}

    def boxes(self, image: str | Path | Sequence[str] | MetaTensor, case_id: str) -> ScanBoxes:
        """The scan's boxes (every member's and flip's, fused) and its grids."""
        volume, _ = preprocess_case(self._chains, image, case_id, self.model.contract)
        dims = self.model_cfg.spatial_dims
        scan = volume.as_tensor()
        found = []
        for network, window in self.members:
            for flip in self.flips:
                flipped = detect_boxes(network, flip_spatial(scan, flip, dims), self.model_cfg, len(self.class_names),
                                       self.detect, window, self.device)
                found.append(unflip_boxes(flipped, flip, scan.shape[1:]))
        boxes = fuse_boxes(found, self.detect.fusion, self.detect.fusion_iou, self.detect.max_boxes)
        grid = spatial_affine(np.asarray(volume.affine, dtype=np.float64), dims)
        stored = spatial_affine(np.asarray(volume.meta.get("original_affine", volume.affine), dtype=np.float64), dims)
        shape = volume.meta.get("spatial_shape")
        return ScanBoxes(boxes, grid, stored, None if shape is None else tuple(int(n) for n in np.asarray(shape)[:dims]))

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        found = self.boxes(image, case_id)
        records = box_records(found.boxes, found.grid, found.stored, self.class_names)
        values = self._values(records, found.shape)
        return Prediction(case_id, "detection", found.stored,
                          metrics={k: v for k, v in values.items() if isinstance(v, float)},
                          qc={k: values[k] for k in ("qc_flag", "qc_reason")})

    def _values(self, records: Sequence[dict[str, Any]], shape: Sequence[int] | None) -> dict[str, Any]:
        """The report's values of one scan's box records (as its JSON holds them) and its QC."""
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        values = {"n_boxes": float(len(scores)), "confident_boxes": float((scores >= CONFIDENT).sum()),
                  "max_score": float(scores.max()) if len(scores) else float("nan"), "edge_boxes": float("nan")}
        if shape is not None:
            dims = self.model_cfg.spatial_dims
            starts = np.array([r["voxels"]["start"] for r in records], dtype=np.float64).reshape(-1, dims)
            ends = np.array([r["voxels"]["end"] for r in records], dtype=np.float64).reshape(-1, dims)
            values["edge_boxes"] = float(edge_boxes(starts, ends, scores, shape))
        return {**values, **box_quality(values, self.qc)}

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return output_paths(output_dir, case.case_id, {"boxes": "_boxes.json"})

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        found = self.boxes(case.source, case.case_id)
        records = box_records(found.boxes, found.grid, found.stored, self.class_names)
        path = self.expected_outputs(case, output_dir)["boxes"]
        atomic_write_text(path, json.dumps({"case_id": case.case_id, "frame": "RAS", "units": "mm",
                                            "voxel_convention": "start inclusive, end exclusive, array index order",
                                            "input_shape": None if found.shape is None else list(found.shape),
                                            "boxes": records}, indent=1))
        return CaseResult(case.case_id, str(case.path), "ok", outputs={"boxes": str(path)},
                          values=self._values(records, found.shape))

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        """A finished case's values and QC, read back from its boxes JSON."""
        written = json.loads(Path(outputs["boxes"]).read_text())
        return self._values(written.get("boxes", []), written.get("input_shape"))

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        """Boxes per scan over the batch (summary JSON and MLflow metrics)."""
        counts = [float(r.values["n_boxes"]) for r in results if r.status == "ok" and "n_boxes" in r.values]
        confident = [float(r.values["confident_boxes"]) for r in results
                     if r.status == "ok" and "confident_boxes" in r.values]
        means = {"boxes_per_scan": float(np.mean(counts)) if counts else None,
                 "confident_boxes_per_scan": float(np.mean(confident)) if confident else None}
        return {"means": means}, {f"predict/{k}": v for k, v in means.items() if v is not None}
