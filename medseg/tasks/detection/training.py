"""Detection stages' pieces: every scan of a split searched with the network as predict searches
it (sliding window, NMS), scored by FROC and mAP against its reference boxes; the evaluate stage's
per-case rows; and the contract inference reads.

The loop itself (budgets, checkpoints, exact resume, DDP) is :func:`medseg.engine.loop.fit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medseg.data.transforms import IMAGE
from medseg.engine import distributed
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.loop import Previewer, Validator, base_contract
from medseg.tasks.detection.boxes import Boxes
from medseg.tasks.detection.config import DetectionConfig
from medseg.tasks.detection.detect import detect_boxes, window_of
from medseg.tasks.detection.metrics import MATCH_IOU, detection_scores
from medseg.tasks.detection.transforms import BOX_CLASSES, BOXES


def detect_dataset(network: nn.Module, dataset: Iterable[dict[str, Any]], cfg: DetectionConfig,
                   device: torch.device, amp_dtype: torch.dtype | None, progress: bool = False,
                   desc: str = "detect") -> tuple[list[str], list[Boxes], list[Boxes]]:
    """Case ids, predicted boxes and reference boxes of every item (preprocessed scans)."""
    case_ids: list[str] = []
    predicted: list[Boxes] = []
    reference: list[Boxes] = []
    num_classes = len(cfg.data.labels) - 1
    for item in tqdm(dataset, desc=desc, disable=not progress, leave=False, unit="scan"):
        predicted.append(detect_boxes(network, item[IMAGE], cfg.model, num_classes, cfg.detect, window_of(cfg),
                                      device, amp_dtype))
        reference.append(Boxes(np.asarray(item[BOXES], dtype=np.float64).reshape(-1, 2 * cfg.model.spatial_dims),
                               np.asarray(item[BOX_CLASSES], dtype=np.int64)))
        case_ids.append(str(item.get("case_id", len(case_ids))))
    return case_ids, predicted, reference


def class_values(cfg: DetectionConfig) -> list[int]:
    return [v for v in sorted(cfg.data.labels) if v != 0]


def validation(cfg: DetectionConfig) -> tuple[Validator, Previewer]:
    """FROC and mAP of the validation split, over every process's share of its scans; and pictures of
    the first scans' boxes (:mod:`medseg.tasks.detection.previews`)."""
    from medseg.tasks.detection.previews import previewer


    def validate(network: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> dict[str, float]:
        _, predicted, reference = detect_dataset(network, dataset, cfg, device, amp_dtype, show, "val")
        shares = distributed.current().gather((predicted, reference))
        return detection_scores([p for s in shares for p in s[0]], [r for s in shares for r in s[1]],
                                class_values(cfg), "val")

    return validate, previewer(cfg)


def per_case_rows(case_ids: list[str], predicted: list[Boxes],
                  reference: list[Boxes]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``<split>_cases.csv``: reference and predicted boxes per scan, the hits at
    IoU 0.1 among the predictions scoring 0.5 or more, and the best score."""
    from monai.data.box_utils import box_iou

    fields = ["case_id", "reference_boxes", "predicted_boxes", "confident_boxes", "confident_hits", "max_score"]
    rows = []
    for case_id, pred, ref in zip(case_ids, predicted, reference):
        scores = pred.scores if pred.scores is not None else np.zeros(len(pred))
        confident = pred.corners[scores >= 0.5]
        hits = int((np.asarray(box_iou(ref.corners, confident)) >= MATCH_IOU).any(axis=1).sum()) \
            if len(ref) and len(confident) else 0
        rows.append({"case_id": case_id, "reference_boxes": len(ref), "predicted_boxes": len(pred),
                     "confident_boxes": len(confident), "confident_hits": hits,
                     "max_score": f"{scores.max():.4f}" if len(scores) else ""})
    return fields, rows


def score_split(cfg: DetectionConfig, ev: Evaluator) -> SplitScores:
    """A checkpoint scored on a split: FROC, mAP and a row per scan."""
    case_ids, predicted, reference = detect_dataset(ev.network, ev.dataset, cfg, ev.device, ev.amp_dtype,
                                                    ev.progress, f"evaluate {ev.split}")
    fields, rows = per_case_rows(case_ids, predicted, reference)
    return SplitScores(detection_scores(predicted, reference, class_values(cfg), ev.prefix), fields, rows)


def model_contract(cfg: DetectionConfig) -> dict[str, Any]:
    """What inference needs: the preprocessing, the network's config, the window, the NMS settings
    and the class names."""
    return {
        **base_contract(cfg),
        "patch_size": list(cfg.patch.size),
        "window": list(window_of(cfg)),
        "model": cfg.model.model_dump(mode="json"),
        "detect": cfg.detect.model_dump(mode="json"),
        "box_classes": {str(v): cfg.data.labels[v] for v in class_values(cfg)},
        "output_activation": "sigmoid",
    }
