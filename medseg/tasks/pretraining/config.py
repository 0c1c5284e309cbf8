"""The pretraining config: masked image modelling on every image, labelled or not, with the
segmentation U-Net as the network, so that its weights start a segmentation run (``model.init_from``).
Light on purpose (pydantic only): ``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medseg.config import (
    DataConfig,
    LossConfig,
    RunConfig,
    Section,
    StrEnum,
    UNetModelConfig,
    ValidationConfig,
    check_spatial_length,
)

#: The networks pretraining trains: the segmentation task's U-Nets, built by its registry entry.
PRETRAINED_NETWORKS = ("unet", "dynunet")


class ReconstructionLoss(StrEnum):
    L1 = "l1"
    L2 = "l2"


class Transfer(StrEnum):
    ENCODER = "encoder"  # the contracting path and the bottleneck
    ALL = "all"  # every tensor but the output head (encoder and decoder)


class PretrainingDataConfig(DataConfig):
    """Every case of the manifest is an image to learn from, whatever its split; labels are not read."""

    @field_validator("labels")
    @classmethod
    def _no_labels(cls, labels: dict[int, str] | None) -> None:
        if labels is not None:
            raise ValueError("data.labels does not apply to task: pretraining (it learns from the images alone and "
                             "ignores the manifest's label column); remove it")
        return None


class PretrainingPatchConfig(Section):
    """Training patches, drawn uniformly (there is no label to centre them on)."""

    size: tuple[int, ...] = Field(default=(64, 64, 64), description="Patch size in voxels; smaller volumes are "
                                  "zero-padded to it. Divisible by the product of model.strides.")
    samples_per_volume: int = Field(default=2, ge=1)


class MaskingConfig(Section):
    """Masked image modelling: cubes of the patch are blanked and the network fills them in."""

    ratio: float = Field(default=0.6, gt=0.0, lt=1.0, description="Fraction of the patch's blocks masked.")
    block: tuple[int, ...] = Field(default=(8, 8, 8), description="Masked block size in voxels, per spatial axis.")
    transfer: Transfer = Field(
        default=Transfer.ENCODER, description="What the pretrained file holds for model.init_from: encoder (the "
        "contracting path and the bottleneck) or all (every tensor but the output head).")

    @field_validator("block")
    @classmethod
    def _positive(cls, block: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 for b in block):
            raise ValueError(f"masking.block {list(block)}: every side must be at least 1 voxel")
        return block


class PretrainingModelConfig(UNetModelConfig):
    """The segmentation network to pretrain: give it exactly the fine-tuning run's model section
    (channels, strides, kernels, res units, norm), so that every tensor name and shape matches."""

    @field_validator("name")
    @classmethod
    def _segmentation_network(cls, name: str) -> str:
        if name not in PRETRAINED_NETWORKS:
            raise ValueError(f"model.name {name!r}: pretraining trains a segmentation U-Net; use one of "
                             f"{PRETRAINED_NETWORKS} (the same as the run it will initialise)")
        return name

    @field_validator("init_from")
    @classmethod
    def _no_init(cls, init_from: str | None) -> None:
        if init_from:
            raise ValueError("model.init_from does not apply to task: pretraining; pretraining starts from scratch "
                             "(resume a stopped pretraining run with --resume)")
        return None


class PretrainingLossConfig(LossConfig):
    name: ReconstructionLoss = Field(default=ReconstructionLoss.L1, description="Error on the masked voxels only.")


class PretrainingConfig(RunConfig):
    """``task: pretraining``: a masked autoencoder on every image, whose weights start a segmentation run."""

    task: Literal["pretraining"] = "pretraining"
    output_dir: Path = Field(default=Path("runs/pretraining"))
    data: PretrainingDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv"}])
    patch: PretrainingPatchConfig = PretrainingPatchConfig()
    masking: MaskingConfig = MaskingConfig()
    model: PretrainingModelConfig = PretrainingModelConfig()
    loss: PretrainingLossConfig = PretrainingLossConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _dims_agree(self) -> PretrainingConfig:
        dims = self.model.spatial_dims
        check_spatial_length("patch.size", self.patch.size, dims)
        check_spatial_length("masking.block", self.masking.block, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        for i, stride in enumerate(self.model.strides or ()):
            if not isinstance(stride, int):
                check_spatial_length(f"model.strides.{i}", stride, dims)
        if any(b > p for b, p in zip(self.masking.block, self.patch.size)):
            raise ValueError(f"masking.block {list(self.masking.block)} is larger than patch.size "
                             f"{list(self.patch.size)} on some axis; use blocks a fraction of the patch")
        return self
