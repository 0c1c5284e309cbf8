"""The network section of the whole-image tasks (classification, regression): one backbone from
:mod:`medseg.engine.image_networks` with a linear head. Light on purpose (pydantic only), like
every config module, so ``medseg validate`` reads it without torch.
"""

from __future__ import annotations

from pydantic import Field

from medseg.config.schema import ModelConfig, StrEnum


class Activation(StrEnum):
    RELU = "relu"
    LEAKYRELU = "leakyrelu"
    PRELU = "prelu"
    ELU = "elu"
    SWISH = "swish"


class Stem(StrEnum):
    SMALL = "small"  # 3x3 conv, stride 1, no max pool: MedMNIST's choice for 28 px inputs
    STRIDED = "strided"  # 3x3 conv, stride 2, no max pool: a quarter (2D) / eighth (3D) of the FLOPs
    IMAGENET = "imagenet"  # 7x7 conv, stride 2, max pool: for inputs of 128 px and more


class ImageModelConfig(ModelConfig):
    """A whole-image network: MLP, LeNet, ResNet-18/34/50 or DenseNet-121, 2D or 3D."""

    name: str = "resnet18"
    norm: str = "batch"
    activation: Activation = Activation.RELU
    widen_factor: float = Field(default=1.0, gt=0, description="ResNet: width multiplier of 64-128-256-512.")
    stem: Stem = Field(default=Stem.SMALL, description="ResNet/DenseNet first layers: small, strided or imagenet.")
