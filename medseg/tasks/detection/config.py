"""The detection config: where the boxes come from (label-map components or a box file), the
RetinaNet (backbone, FPN levels, anchor shapes), training patches, and how detection runs on a
whole scan (sliding window, score threshold, NMS). Light on purpose (pydantic only):
``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medseg.config import (
    LabelledDataConfig,
    LossConfig,
    ModelConfig,
    PreprocessConfig,
    RunConfig,
    Section,
    StrEnum,
    check_spatial_length,
)


class WorldFrame(StrEnum):
    RAS = "ras"  # NIfTI, nibabel, medseg's affines
    LPS = "lps"  # DICOM, ITK, LUNA16's annotations.csv


class BoxesConfig(Section):
    file: Path | None = Field(
        default=None, description="CSV or JSON of reference boxes (case_id, class and world corners in mm, LUNA16 "
        "centre + diameter_mm, or voxel corners; see docs/how-to/detection.md); null: one box per connected "
        "component of each class of the manifest's label maps.")
    frame: WorldFrame = Field(default=WorldFrame.RAS, description="Frame of world coordinates in boxes.file.")
    min_volume_mm3: float = Field(default=0.0, ge=0, description="Label-map components smaller than this are not "
                                  "boxed (mm³; mm² in 2D).")


class SyntheticLesionsConfig(Section):
    """A seeded synthetic CT set with several small lesions per scan (written before training)."""

    cases: int = Field(default=24, ge=3, description="Scans; split 60/20/20 into train/val/test.")
    seed: int = 0
    shape: tuple[int, int, int] = Field(default=(96, 96, 20), description="Nominal (x, y, z) size in voxels.")
    spacing: tuple[float, float, float] = Field(default=(0.9, 0.9, 4.0), description="Voxel size in mm.")
    lesions: tuple[int, int] = Field(default=(1, 5), description="Lesions per scan, at least and at most.")
    radius_mm: tuple[float, float] = Field(default=(3.0, 8.0), description="Lesion radius range in mm.")
    contrast_hu: tuple[float, float] = Field(default=(-60.0, 60.0), description="Lesion minus organ HU, range "
                                             "(negative: hypodense).")
    folder: str = Field(default="synthetic_lesions", pattern=r"^[A-Za-z0-9_.-]+$",
                        description="Folder name under data.root (one name: the set lives inside the data root).")


class DetectionDataConfig(LabelledDataConfig):
    boxes: BoxesConfig = BoxesConfig()
    synthetic: SyntheticLesionsConfig | None = Field(
        default=None, description="Generate a synthetic lesion set under data.root and its manifest at data.manifest "
        "before training (null: the manifest's own data).")


class DetectionPatchConfig(Section):
    size: tuple[int, ...] = Field(examples=[[64, 64, 16]], description="Training patch (and sliding window) size; "
                                  "a multiple of the network's size divisor on every axis.")
    samples_per_volume: int = Field(default=2, ge=1)
    pos_fraction: float = Field(default=0.67, ge=0.0, le=1.0, description="Share of patches centred on a box.")
    max_boxes: int = Field(default=32, ge=1, description="Most boxes one patch may hold (the batch's box table "
                           "has this many rows).")


class DetectionModelConfig(ModelConfig):
    """MONAI's RetinaNet: a ResNet with a feature pyramid, classification and box-regression heads."""

    name: Literal["retinanet"] = "retinanet"
    channels: tuple[int, ...] = Field(default=(16, 32, 64, 128), min_length=4, max_length=4,
                                      description="ResNet block widths of its four layers.")
    layers: tuple[int, int, int, int] = Field(default=(1, 1, 1, 1), description="Residual blocks per layer "
                                              "(ResNet-10: 1, 1, 1, 1; ResNet-18: 2, 2, 2, 2).")
    returned_layers: tuple[int, ...] = Field(default=(1, 2), min_length=1, description="ResNet layers the "
                                             "pyramid takes (1..4); one more level is pooled from the last.")
    stem_stride: tuple[int, ...] | None = Field(default=None, description="Stride of the first convolution per "
                                                "axis; null: 2 in-plane, 1 along z (thick slices), 2 in 2D.")
    fpn_channels: int = Field(default=32, ge=8, multiple_of=8, description="Features of every pyramid level (the "
                              "heads group-normalise them in groups of 8).")
    anchor_shapes: tuple[tuple[float, ...], ...] = Field(
        default=((6.0, 6.0, 3.0), (10.0, 10.0, 4.0), (16.0, 16.0, 6.0)), min_length=1,
        description="Anchor sizes in voxels of the preprocessed grid at the finest level (doubling per level); "
        "`medseg plan --task detection` takes them from the boxes.")


class DetectionLossConfig(LossConfig):
    name: Literal["retinanet"] = "retinanet"
    box_weight: float = Field(default=1.0, gt=0, description="Weight of the box regression loss beside the "
                              "classification loss.")
    negatives_per_image: int = Field(default=64, ge=1, description="Hard negative sampler: anchors per image.")
    positive_fraction: float = Field(default=0.3, gt=0, lt=1)
    atss_candidates: int = Field(default=4, ge=1, description="ATSS matcher: candidate anchors per level and box.")


class BoxFusion(StrEnum):
    NMS = "nms"  # keep the best-scored box of each overlapping group
    WBF = "wbf"  # average each overlapping group into one box (weighted boxes fusion)


class DetectConfig(Section):
    """How a scan is searched: MONAI's sliding-window inference on the preprocessed grid, then NMS;
    several predictions of one scan (an ensemble's members, the flips of ``predict --tta``) fused."""

    window: tuple[int, ...] | None = Field(default=None, description="Sliding-window size; null: patch.size.")
    overlap: float = Field(default=0.25, ge=0, lt=1)
    score_threshold: float = Field(default=0.02, ge=0, le=1, description="Boxes scoring less are dropped "
                                   "(low: the FROC curve needs the unsure ones).")
    nms_iou: float = Field(default=0.22, gt=0, le=1, description="Non-maximum suppression: of boxes overlapping "
                           "more than this, the best-scored is kept.")
    max_boxes: int = Field(default=100, ge=1, description="Boxes kept per scan.")
    fusion: BoxFusion = Field(default=BoxFusion.WBF, description="How the boxes of several predictions of a scan "
                              "(an ensemble's members, the flips of predict --tta) become one list: wbf (weighted "
                              "boxes fusion: each overlapping group averaged, scored by how many predictions found "
                              "it) or nms (the best-scored box of each group kept).")
    fusion_iou: float = Field(default=0.55, gt=0, lt=1, description="Boxes overlapping more than this (IoU) are "
                              "one object when predictions are fused.")


class DetectionConfig(RunConfig):
    """``task: detection``: boxes and confidences for lesions, with MONAI's RetinaNet."""

    task: Literal["detection"] = "detection"
    data: DetectionDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv",
                                                 "labels": {0: "background", 1: "lesion"}}])
    preprocess: PreprocessConfig = PreprocessConfig()
    patch: DetectionPatchConfig = Field(examples=[{"size": [64, 64, 16]}])
    model: DetectionModelConfig = DetectionModelConfig()
    loss: DetectionLossConfig = DetectionLossConfig()
    detect: DetectConfig = DetectConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> DetectionConfig:
        dims = self.model.spatial_dims
        check_spatial_length("patch.size", self.patch.size, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        check_spatial_length("model.stem_stride", self.model.stem_stride, dims)
        check_spatial_length("detect.window", self.detect.window, dims)
        for shape in self.model.anchor_shapes:
            check_spatial_length("each of model.anchor_shapes", shape, dims)
        if max(self.model.returned_layers) > 4 or min(self.model.returned_layers) < 1:
            raise ValueError(f"model.returned_layers {list(self.model.returned_layers)}: each must be 1..4")
        spatial = {"affine", "elastic", "rot90"} & {a.name for a in self.augment}
        if spatial:
            raise ValueError(f"augment: {sorted(spatial)} would move the image without its boxes; detection takes "
                             "flip and the intensity augmentations (noise, gamma, contrast, bias_field, ...)")
        if self.data.synthetic is not None and dims != 3:
            raise ValueError("data.synthetic writes 3D CT scans: it needs model.spatial_dims: 3")
        return self
