"""The segmentation config: training patches, U-Net family networks, Dice losses, sliding-window
validation and post-processing. Light on purpose (pydantic only): ``medseg validate`` and the
registry import it without torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medseg.config import (
    CalibratedValidationConfig,
    LabelledDataConfig,
    LossConfig,
    PatchConfig,
    Rot90Aug,
    RunConfig,
    Section,
    StrEnum,
    UNetModelConfig,
    check_spatial_length,
)


class SegmentationLoss(StrEnum):
    DICE_CE = "dice_ce"
    DICE = "dice"
    DICE_FOCAL = "dice_focal"


class SegmentationLossConfig(LossConfig):
    name: SegmentationLoss = SegmentationLoss.DICE_CE
    lambda_dice: float = 1.0
    lambda_ce: float = Field(default=1.0, description="Weight of the cross-entropy (dice_ce) or focal "
                             "(dice_focal) term.")


class SegmentationValidationConfig(CalibratedValidationConfig):
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    hd95: bool = True
    overlays: int = Field(default=3, ge=0, description="Cases drawn as overlay figures.")
    tta: bool | None = Field(
        default=None, description="Score the evaluate stage's splits (val, test) with mirroring TTA over the axes "
        "training flipped, as nnU-Net's final validation does. null (auto): on when the augmentation flips every "
        "spatial axis (planned configs), off otherwise. Validation during training never mirrors.")


class PostprocessConfig(Section):
    keep_largest_component: bool = Field(
        default=False, description="Keep only the largest connected component of each foreground label."
    )
    min_component_size: dict[str, int] = Field(
        default_factory=dict, examples=[{"enhancing": 20, "edema": 50}],
        description="Label name -> voxels of the network's grid: predicted components (face-connected) of that "
        "label smaller than this are removed, each taking the label most common around it (background if that is "
        "mostly background). Where search_min_component_size runs, its choice replaces this.")
    search_min_component_size: list[int] | None = Field(
        default=None, examples=[[10, 50, 200, 1000]],
        description="Sizes (voxels) tried per label on the validation split after training; a label keeps the one "
        "with the best mean per-case Dice if it beats no removal by more than 0.002 (written to postprocess.json, "
        "applied to the test split and stored in the model). Skipped when the validation cases are trained on.")

    @field_validator("min_component_size")
    @classmethod
    def _sizes_not_negative(cls, sizes: dict[str, int]) -> dict[str, int]:
        negative = {name: size for name, size in sizes.items() if size < 0}
        if negative:
            raise ValueError(f"postprocess.min_component_size {negative}: a size is a voxel count >= 0 (0 removes "
                             "nothing); leave the label out to keep all its components")
        return sizes

    @field_validator("search_min_component_size")
    @classmethod
    def _candidates_valid(cls, candidates: list[int] | None) -> list[int] | None:
        if candidates is None:
            return None
        if not any(c > 0 for c in candidates):
            raise ValueError(f"postprocess.search_min_component_size {candidates} has no size > 0 to try (no removal "
                             "is always tried); list sizes in voxels, e.g. [10, 50, 200], or leave it out (null)")
        negative = [c for c in candidates if c < 0]
        if negative:
            raise ValueError(f"postprocess.search_min_component_size has negative sizes {negative}; a size is a "
                             "voxel count >= 0")
        return sorted(set(candidates))


def check_postprocess_labels(postprocess: PostprocessConfig, labels: Mapping[int, str]) -> None:
    """Every label ``postprocess.min_component_size`` names is a foreground label of ``labels``.

    Raises:
        ValueError: an unknown name or the background, with the nearest foreground name.
    """
    foreground = [name for value, name in sorted(labels.items()) if value != 0]
    for name in postprocess.min_component_size:
        if name in foreground:
            continue
        if name == labels.get(0):
            raise ValueError(f"postprocess.min_component_size names {name!r}, the background (label 0); removal "
                             f"applies to foreground labels {foreground}, so remove that entry")
        close = difflib.get_close_matches(name, foreground, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"postprocess.min_component_size names {name!r}, which is not a label of data.labels; "
                         f"{hint}use label names (not values) of {foreground}")


#: A region's name becomes part of an MLflow metric key (``val/dice_region/<name>``): no slash.
_REGION_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RegionConfig(Section):
    """One region of nnU-Net's region-based training: a union of label values learned as one
    sigmoid output channel (BraTS: whole tumour = [1, 2, 3], tumour core = [1, 3], enhancing = [3])."""

    name: str = Field(examples=["whole_tumour"], description="Metric key of the region: val/dice_region/<name>.")
    labels: tuple[int, ...] = Field(min_length=1, examples=[[1, 2, 3]],
                                    description="Label values (keys of data.labels) the region is the union of.")


def region_paint_labels(regions: Sequence[RegionConfig]) -> list[int]:
    """The label value each region paints when a prediction is decoded: the one value of its labels
    that no later region holds (nnU-Net's ``regions_class_order``). Regions painted later overwrite
    earlier ones, so a voxel ends with the value of the last region it lies in.

    Raises:
        ValueError: a region whose labels all appear in later regions, or leave more than one value.
    """
    paint = []
    for i, region in enumerate(regions):
        later = {v for r in regions[i + 1:] for v in r.labels}
        own = sorted(set(region.labels) - later)
        if len(own) != 1:
            held = "every one of them is in a later region" if not own else f"{own} are in no later region"
            raise ValueError(
                f"regions.{i} ({region.name!r}, labels {list(region.labels)}): a region must leave exactly one "
                f"label value that no later region holds (the value it paints when decoding), but {held}; list "
                "regions from the largest to the smallest, each one adding exactly one value to the ones after it")
        paint.append(own[0])
    return paint


def check_regions(regions: Sequence[RegionConfig], labels: Mapping[int, str]) -> None:
    """The rules a region list must follow to be learned and decoded back into ``labels``.

    Raises:
        ValueError: the first broken rule, with the region and the fix.
    """
    names = [r.name for r in regions]
    for i, region in enumerate(regions):
        if not _REGION_NAME.match(region.name):
            raise ValueError(f"regions.{i}.name {region.name!r} must be letters, digits, '_', '-' or '.' (it becomes "
                             f"the metric key val/dice_region/<name>); e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', region.name)!r}")
        if names.count(region.name) > 1:
            raise ValueError(f"regions.{i}.name {region.name!r} is used by {names.count(region.name)} regions; "
                             "give each region its own name")
        unknown = sorted(v for v in set(region.labels) if v not in labels)
        if unknown:
            raise ValueError(f"regions.{i} ({region.name!r}) has label values {unknown} that data.labels does not "
                             f"define; use values of data.labels {sorted(labels)}")
        if 0 in region.labels:
            raise ValueError(f"regions.{i} ({region.name!r}) holds 0, the background; a region is a union of "
                             "foreground labels (the background is what no region covers), so remove 0")
        if len(set(region.labels)) != len(region.labels):
            raise ValueError(f"regions.{i} ({region.name!r}) lists a label value twice: {list(region.labels)}")
    covered = {v for r in regions for v in r.labels}
    missing = [v for v in sorted(labels) if v != 0 and v not in covered]
    if missing:
        raise ValueError(f"no region holds label values {missing} ({', '.join(labels[v] for v in missing)}), so a "
                         "prediction could never paint them; add each to a region (nnU-Net: the first, outermost one "
                         "holds every foreground label)")
    region_paint_labels(regions)


class SegmentationConfig(RunConfig):
    """``task: segmentation``: label maps from patches, predicted by sliding window."""

    task: Literal["segmentation"] = "segmentation"
    data: LabelledDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv",
                                                "labels": {0: "background", 1: "tumour"}}])
    patch: PatchConfig = Field(examples=[{"size": [96, 96, 96]}], description="Training patches.")
    model: UNetModelConfig = UNetModelConfig()
    loss: SegmentationLossConfig = SegmentationLossConfig()
    validation: SegmentationValidationConfig = SegmentationValidationConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    regions: list[RegionConfig] | None = Field(
        default=None, examples=[[{"name": "whole_tumour", "labels": [1, 2, 3]}, {"name": "tumour_core", "labels": [1, 3]},
                                 {"name": "enhancing", "labels": [3]}]],
        description="Region-based training (nnU-Net, BraTS): one sigmoid output per region, Dice + BCE on the "
        "region masks; listed largest first, the order predictions are painted back into label values.")
    pretrain: Path | None = Field(
        default=None, examples=["plan.pretrain.yaml"],
        description="A task: pretraining config that `medseg run` runs first (what `medseg plan --unlabelled` writes); "
        "its weights start this run (model.init_from), unless model.init_from is given.")

    @model_validator(mode="after")
    def _regions_valid(self) -> SegmentationConfig:
        if self.regions is not None:
            if not self.regions:
                raise ValueError("regions is an empty list; leave it out (null) for softmax training, or list the "
                                 "regions, e.g. [{name: whole, labels: [1, 2]}, {name: core, labels: [2]}]")
            check_regions(self.regions, self.data.labels)
        return self

    @model_validator(mode="after")
    def _postprocess_labels_known(self) -> SegmentationConfig:
        check_postprocess_labels(self.postprocess, self.data.labels)
        return self

    @model_validator(mode="after")
    def _dims_agree(self) -> SegmentationConfig:
        dims = self.model.spatial_dims
        check_spatial_length("patch.size", self.patch.size, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        ratios = self.patch.class_ratios
        if ratios is not None and len(ratios) != len(self.data.labels):
            raise ValueError(f"patch.class_ratios has {len(ratios)} values but data.labels has {len(self.data.labels)} "
                             f"labels; give one ratio per label value, background first")
        for i, stride in enumerate(self.model.strides or ()):
            if not isinstance(stride, int):
                check_spatial_length(f"model.strides.{i}", stride, dims)
        for i, kernel in enumerate(self.model.kernels or ()):
            check_spatial_length(f"model.kernels.{i}", kernel, dims)
        for i, aug in enumerate(self.augment):
            if isinstance(aug, Rot90Aug):
                a, b = aug.axes
                if max(a, b) >= dims or self.patch.size[a] != self.patch.size[b]:
                    raise ValueError(
                        f"augment.{i} (rot90) turns spatial axes {a} and {b}, so patch.size must be equal on both "
                        f"(got {list(self.patch.size)}); set augment.{i}.axes to two axes of equal patch size"
                    )
        return self
