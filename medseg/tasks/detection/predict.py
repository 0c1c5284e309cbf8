"""Detection of one scan with a loaded model: the contract's preprocessing, MONAI's sliding-window
detector on the preprocessed grid (NMS within a prediction), the predictions of every ensemble member
and TTA flip fused into one list (``detect.fusion``: weighted boxes fusion or NMS, on the preprocessed
grid the members share; :mod:`medseg.tasks.detection.fusion`), and every box given back twice: in
world millimetres (RAS, the frame medseg's affines are in) and in voxel indices of the input as stored.

Each case writes ``<case>_boxes.json`` (every box, best first: class, score, ``world_mm`` min/max
corners, ``voxels`` start/end (end exclusive), the preprocessed grid's too); ``predictions.csv``
has its path, the box count, the count scoring 0.5 or more and the best score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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

#: A box scoring this much or more counts as confident in the report's ``confident_boxes``.
CONFIDENT = 0.5


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


class DetectionPredictor:
    """The boxes of the scans of a folder or in memory."""

    output_columns: tuple[str, ...] = ("boxes",)
    value_columns: tuple[str, ...] = ("n_boxes", "confident_boxes", "max_score")

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
        self._chains = {load: preprocessing_from_contract(contract, load=load, allow_constant=options.allow_constant)
                        for load in (True, False)}

    def boxes(self, image: str | Path | Sequence[str] | MetaTensor, case_id: str) -> tuple[Boxes, np.ndarray, np.ndarray]:
        """Boxes on the preprocessed grid (every member's and flip's, fused), that grid's affine and the
        input's (both RAS)."""
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
        return boxes, grid, stored

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        boxes, _, stored = self.boxes(image, case_id)
        return Prediction(case_id, "detection", stored, metrics=self._values(boxes))

    @staticmethod
    def _values(boxes: Boxes) -> dict[str, float]:
        scores = boxes.scores if boxes.scores is not None and len(boxes) else np.zeros(0)
        return {"n_boxes": float(len(boxes)), "confident_boxes": float((scores >= CONFIDENT).sum()),
                "max_score": float(scores.max()) if len(scores) else float("nan")}

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return output_paths(output_dir, case.case_id, {"boxes": "_boxes.json"})

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        boxes, grid, stored = self.boxes(case.source, case.case_id)
        records = box_records(boxes, grid, stored, self.class_names)
        path = self.expected_outputs(case, output_dir)["boxes"]
        atomic_write_text(path, json.dumps({"case_id": case.case_id, "frame": "RAS", "units": "mm",
                                            "voxel_convention": "start inclusive, end exclusive, array index order",
                                            "boxes": records}, indent=1))
        return CaseResult(case.case_id, str(case.path), "ok", outputs={"boxes": str(path)},
                          values=self._values(boxes))

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        """A finished case's values, read back from its boxes JSON."""
        records = json.loads(Path(outputs["boxes"]).read_text()).get("boxes", [])
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        return self._values(Boxes(np.zeros((len(scores), 2 * self.model_cfg.spatial_dims)),
                                  np.ones(len(scores), dtype=np.int64), scores))

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        """Boxes per scan over the batch (summary JSON and MLflow metrics)."""
        counts = [float(r.values["n_boxes"]) for r in results if r.status == "ok" and "n_boxes" in r.values]
        confident = [float(r.values["confident_boxes"]) for r in results
                     if r.status == "ok" and "confident_boxes" in r.values]
        means = {"boxes_per_scan": float(np.mean(counts)) if counts else None,
                 "confident_boxes_per_scan": float(np.mean(confident)) if confident else None}
        return {"means": means}, {f"predict/{k}": v for k, v in means.items() if v is not None}
