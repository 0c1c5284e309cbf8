"""The segmentation config: training patches, U-Net family networks, Dice losses, sliding-window
validation and post-processing. Light on purpose (pydantic only): ``medseg validate`` and the
registry import it without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class PostprocessConfig(Section):
    keep_largest_component: bool = Field(
        default=False, description="Keep only the largest connected component of each foreground label."
    )


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
