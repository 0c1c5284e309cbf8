"""The pretraining config: masked image modelling on every image, labelled or not, with the
segmentation U-Net or a classification network as the network, so that its weights start a
segmentation or classification run (``model.init_from``). Light on purpose (pydantic only):
``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

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
from medseg.config.image_model import ImageModelConfig

#: The networks pretraining trains: the segmentation task's U-Nets, built by its registry entry.
PRETRAINED_NETWORKS = ("unet", "dynunet")
#: The whole-image networks (classification, regression) whose feature extractor pretraining knows
#: (medseg.tasks.pretraining.image_encoder.FEATURE_STAGES); ``mlp`` has no feature map to pretrain.
PRETRAINED_IMAGE_NETWORKS = ("resnet18", "resnet34", "resnet50", "densenet121", "lenet", "alexnet", "vgg11",
                             "vgg11_bn", "vgg16", "vgg16_bn", "googlenet")


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

    size: tuple[int, ...] = Field(default=(64, 64, 64), description="U-Nets: patch size in voxels; smaller "
                                  "volumes are zero-padded to it; divisible by the product of model.strides. "
                                  "Classification networks: the classification run's preprocess.resize (every "
                                  "image is resized to it whole, the network input).")
    samples_per_volume: int = Field(default=2, ge=1)


class MaskingConfig(Section):
    """Masked image modelling: cubes of the patch are blanked and the network fills them in."""

    ratio: float = Field(default=0.6, gt=0.0, lt=1.0, description="Fraction of the patch's blocks masked.")
    block: tuple[int, ...] = Field(default=(8, 8, 8), description="Masked block size in voxels, per spatial axis.")
    transfer: Transfer = Field(
        default=Transfer.ENCODER, description="What the pretrained file holds for model.init_from: encoder (the "
        "contracting path and the bottleneck) or all (every tensor but the output head). A classification "
        "network hands on its feature extractor either way (its decoder is not the classifier's).")

    @field_validator("block")
    @classmethod
    def _positive(cls, block: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 for b in block):
            raise ValueError(f"masking.block {list(block)}: every side must be at least 1 voxel")
        return block


def _no_init_from(init_from: str | None) -> None:
    if init_from:
        raise ValueError("model.init_from does not apply to task: pretraining; pretraining starts from scratch "
                         "(resume a stopped pretraining run with --resume)")
    return None


class PretrainingModelConfig(UNetModelConfig):
    """The segmentation network to pretrain: give it exactly the fine-tuning run's model section
    (channels, strides, kernels, res units, norm), so that every tensor name and shape matches.
    A classification network (``name: resnet18``, resnet34, resnet50, densenet121, lenet, alexnet,
    vgg11, vgg11_bn, vgg16, vgg16_bn, googlenet) takes the classification run's model keys instead
    (widen_factor, stem, norm, activation...; see classification's model section)."""

    @field_validator("name")
    @classmethod
    def _segmentation_network(cls, name: str) -> str:
        if name not in PRETRAINED_NETWORKS:
            raise ValueError(_unknown_network(name))
        return name

    @field_validator("init_from")
    @classmethod
    def _no_init(cls, init_from: str | None) -> None:
        return _no_init_from(init_from)


class PretrainingImageModelConfig(ImageModelConfig):
    """The classification network to pretrain (its feature extractor, with a light decoder): give it
    exactly the fine-tuning run's model section (name, widen_factor, stem, norm, activation), so
    that every encoder tensor's name and shape matches."""

    @field_validator("name")
    @classmethod
    def _image_network(cls, name: str) -> str:
        if name not in PRETRAINED_IMAGE_NETWORKS:
            raise ValueError(_unknown_network(name))
        return name

    @field_validator("init_from")
    @classmethod
    def _no_init(cls, init_from: str | None) -> None:
        return _no_init_from(init_from)


def _unknown_network(name: str) -> str:
    return (f"model.name {name!r} cannot be pretrained yet. Expected: a segmentation U-Net "
            f"({', '.join(PRETRAINED_NETWORKS)}) or a classification network with a convolutional feature map "
            f"({', '.join(PRETRAINED_IMAGE_NETWORKS)}). Got: {name!r}. Fix: pretrain one of those, the same as "
            "the run it will initialise, or train that run from scratch")


def _network_kind(data: Any) -> str:
    """``unet`` for the U-Nets (and an unnamed model: the default), ``image`` for every other name,
    whose model section then reads as a whole-image network's."""
    name = data.get("name") if isinstance(data, dict) else getattr(data, "name", None)
    return "unet" if name is None or name in PRETRAINED_NETWORKS else "image"


PretrainingNetworkConfig = Annotated[
    Union[  # noqa: UP007 - pydantic discriminated unions read best spelled out
        Annotated[PretrainingModelConfig, Tag("unet")], Annotated[PretrainingImageModelConfig, Tag("image")]
    ],
    Discriminator(_network_kind),
]


def is_image_network(model: Any) -> TypeGuard[PretrainingImageModelConfig]:
    """The model section names a whole-image (classification) network, not a U-Net."""
    return isinstance(model, PretrainingImageModelConfig)


class PretrainingLossConfig(LossConfig):
    name: ReconstructionLoss = Field(default=ReconstructionLoss.L1, description="Error on the masked voxels only.")


class PretrainingConfig(RunConfig):
    """``task: pretraining``: a masked autoencoder on every image, whose weights start a segmentation or a
    classification run."""

    task: Literal["pretraining"] = "pretraining"
    output_dir: Path = Field(default=Path("runs/pretraining"))
    data: PretrainingDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv"}])
    patch: PretrainingPatchConfig = PretrainingPatchConfig()
    masking: MaskingConfig = MaskingConfig()
    model: PretrainingNetworkConfig = Field(default_factory=PretrainingModelConfig, description="The network of the "
                                            "run to initialise: a U-Net (unet, dynunet) or a classification "
                                            "network (resnet18, ...), with that run's model section.")
    loss: PretrainingLossConfig = PretrainingLossConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _dims_agree(self) -> PretrainingConfig:
        dims = self.model.spatial_dims
        check_spatial_length("patch.size", self.patch.size, dims)
        check_spatial_length("masking.block", self.masking.block, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        for i, stride in enumerate(getattr(self.model, "strides", None) or ()):
            if not isinstance(stride, int):
                check_spatial_length(f"model.strides.{i}", stride, dims)
        if any(b > p for b, p in zip(self.masking.block, self.patch.size)):
            raise ValueError(f"masking.block {list(self.masking.block)} is larger than patch.size "
                             f"{list(self.patch.size)} on some axis; use blocks a fraction of the patch")
        return self
