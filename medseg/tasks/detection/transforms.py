"""Detection's MONAI chains: the shared preprocessing, then the case's reference boxes on the
preprocessed grid (label-map components, or a box file's boxes moved onto it), cached; for
training, MONAI's box-aware patch sampler and flips, and the boxes packed into one fixed-size
table per patch, so that the engine's loader stacks them as it stacks label patches.

A packed table is ``(patch.max_boxes, 2 * dims + 1)`` float32: a box's corners (voxels of the
patch, end exclusive) then its class value; unused rows hold class -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.transforms.dictionary import RandCropBoxByPosNegLabeld, RandFlipBoxd
from monai.transforms import Compose, EnsureTyped, MapTransform

from medseg.config import AugmentConfig
from medseg.data.transforms import IMAGE, LABEL, augmentation, preprocessing
from medseg.errors import ManifestError
from medseg.tasks.detection.box_files import BoxRow, boxes_on_grid
from medseg.tasks.detection.boxes import boxes_from_label, spatial_affine
from medseg.tasks.detection.config import DetectionConfig

BOXES, BOX_CLASSES = "boxes", "box_classes"
#: Class value of an unused row of a packed box table.
NO_BOX = -1.0


class ReferenceBoxesd(MapTransform):
    """The case's reference boxes on the image's (preprocessed) grid: ``boxes`` (N, 2 * dims) and
    ``box_classes`` (N,); the label map, if any, is dropped once boxed.

    Args:
        table: case id -> box-file rows; None: boxes from the label map's components.
        frame: ``ras`` or ``lps``, the box file's world frame.
        min_volume_mm3: smallest component that is boxed.
        class_values: the label values that are boxed (``data.labels`` less the background).
        source: the box file, for messages.
    """

    def __init__(self, table: dict[str, list[BoxRow]] | None, frame: str, min_volume_mm3: float,
                 class_values: Sequence[int], source: str = ""):
        super().__init__(keys=[IMAGE])
        self.table, self.frame, self.min_volume_mm3 = table, frame, min_volume_mm3
        self.class_values, self.source = list(class_values), source

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        image = d[IMAGE]
        dims = image.ndim - 1
        affine = spatial_affine(np.asarray(image.affine, dtype=np.float64), dims)
        case_id = str(d.get("case_id", "?"))
        if self.table is not None:
            stored = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
            boxes = boxes_on_grid(self.table.get(case_id, []), affine, spatial_affine(stored, dims),
                                  image.shape[1:], self.frame, f"{self.source} ({case_id})")
        elif LABEL in d:
            label = np.asarray(d.pop(LABEL))
            boxes = boxes_from_label(label, abs(float(np.linalg.det(affine[:dims, :dims]))), self.min_volume_mm3,
                                     self.class_values, source=f"label map of case {case_id}")
        else:
            raise ManifestError(f"case {case_id}: Expected a label map (the manifest's label column) or boxes.file. "
                                "Got neither. Add the label map, or set boxes.file to a box CSV/JSON.")
        d[BOXES] = boxes.corners.astype(np.float32)
        d[BOX_CLASSES] = boxes.classes
        return d


class PackBoxesd(MapTransform):
    """A patch's boxes and classes as one ``(max_boxes, 2 * dims + 1)`` table in ``label``."""

    def __init__(self, max_boxes: int):
        super().__init__(keys=[BOXES])
        self.max_boxes = max_boxes

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        boxes = np.asarray(d.pop(BOXES), dtype=np.float32)
        classes = np.asarray(d.pop(BOX_CLASSES), dtype=np.float32)
        if len(boxes) > self.max_boxes:
            raise ManifestError(f"case {d.get('case_id', '?')}: Expected at most patch.max_boxes={self.max_boxes} "
                                f"boxes in a training patch. Got {len(boxes)}. Raise patch.max_boxes.")
        width = boxes.shape[1] + 1 if boxes.ndim == 2 and boxes.shape[1] else 2 * (d[IMAGE].ndim - 1) + 1
        table = np.full((self.max_boxes, width), NO_BOX, dtype=np.float32)
        if len(boxes):
            table[: len(boxes)] = np.concatenate([boxes, classes[:, None]], axis=1)
        d[LABEL] = torch.from_numpy(table)
        return d


def unpack_boxes(table: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A batch's packed tables ``(B, max_boxes, 2 * dims + 1)`` as MONAI's detector targets:
    per image ``boxes`` (N, 2 * dims) and ``labels`` (N,), class index = class value - 1."""
    targets = []
    for rows in table:
        used = rows[:, -1] != NO_BOX
        targets.append({"boxes": rows[used, :-1].float(), "labels": (rows[used, -1] - 1).long()})
    return targets


def reference_boxes(cfg: DetectionConfig) -> ReferenceBoxesd:
    """The config's source of reference boxes as a transform (the box file read once, here)."""
    from medseg.tasks.detection.box_files import read_box_file

    boxes = cfg.data.boxes
    table = read_box_file(boxes.file, cfg.model.spatial_dims) if boxes.file is not None else None
    return ReferenceBoxesd(table, str(boxes.frame), boxes.min_volume_mm3,
                           [v for v in sorted(cfg.data.labels) if v != 0], str(boxes.file or ""))


def _flips(augment: Sequence[AugmentConfig], dims: int) -> list[Any]:
    """The config's flips, moving the boxes with the image (MONAI's RandFlipBoxd)."""
    return [RandFlipBoxd(image_keys=[IMAGE], box_keys=[BOXES], box_ref_image_keys=IMAGE, prob=a.prob,
                         spatial_axis=axis)
            for a in augment if a.name == "flip" for axis in (a.axes if a.axes is not None else range(dims))]


def training_transforms(cfg: DetectionConfig) -> Compose:
    """Preprocessing and reference boxes (cached), then box-centred or random patches with their
    boxes cut to the patch (MONAI's RandCropBoxByPosNegLabeld), flips, intensity augmentation,
    and the packed box table."""
    dims, patch = cfg.model.spatial_dims, cfg.patch
    keys = (IMAGE,) if cfg.data.boxes.file is not None else (IMAGE, LABEL)
    chain: list[Any] = preprocessing(cfg.preprocess, keys=keys, min_size=patch.size)
    chain.append(reference_boxes(cfg))
    chain.append(EnsureTyped(keys=IMAGE, track_meta=False))
    chain.append(RandCropBoxByPosNegLabeld(
        image_keys=[IMAGE], box_keys=BOXES, label_keys=[BOX_CLASSES], spatial_size=list(patch.size),
        whole_box=True, num_samples=patch.samples_per_volume, pos=patch.pos_fraction, neg=1.0 - patch.pos_fraction))
    chain.extend(_flips(cfg.augment, dims))
    chain.extend(augmentation([a for a in cfg.augment if a.name != "flip"], dims, keys=(IMAGE,)))
    chain.append(EnsureTyped(keys=IMAGE, track_meta=False))
    chain.append(PackBoxesd(patch.max_boxes))
    return Compose(chain)


def validation_transforms(cfg: DetectionConfig) -> Compose:
    """Whole scans, preprocessed, with their reference boxes on the preprocessed grid."""
    keys = (IMAGE,) if cfg.data.boxes.file is not None else (IMAGE, LABEL)
    return Compose([*preprocessing(cfg.preprocess, keys=keys), reference_boxes(cfg)])
