"""The network section of the whole-image tasks (classification, regression): one backbone from
:mod:`medseg.engine.image_networks` with a linear head. Light on purpose (pydantic only), like
every config module, so ``medseg validate`` reads it without torch.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

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
    IMAGENET = "imagenet"  # 7x7 conv, stride 2, max pool (AlexNet: 11x11 stride 4): for 128 px and more


#: The classifier dropout of the lineage's originals, the default of ``model.dropout`` for them
#: (AlexNet and VGG: 0.5 before each hidden layer; GoogLeNet: 0.4 before the head).
ORIGINAL_DROPOUT = {"alexnet": 0.5, "vgg11": 0.5, "vgg16": 0.5, "vgg11_bn": 0.5, "vgg16_bn": 0.5, "googlenet": 0.4}


class ImageModelConfig(ModelConfig):
    """A whole-image network: MLP, LeNet, AlexNet, VGG-11/16, GoogLeNet, ResNet-18/34/50 or DenseNet-121, 2D or 3D."""

    name: str = "resnet18"
    norm: str = Field(default="batch", description="ResNet/DenseNet norm layers; vgg11_bn/vgg16_bn: the one after "
                      "every convolution.")
    activation: Activation = Activation.RELU
    widen_factor: float = Field(default=1.0, gt=0, description="Width multiplier: ResNet's 64-128-256-512; AlexNet's, "
                                "VGG's and GoogLeNet's every convolution and classifier hidden layer.")
    stem: Stem = Field(default=Stem.SMALL, description="ResNet/DenseNet/AlexNet/GoogLeNet first layers: small, "
                       "strided or imagenet (the paper's).")
    head_grid: int | None = Field(default=None, gt=0, description="AlexNet/VGG: the features are average-pooled to "
                                  "this many cells per axis before the fully connected classifier; null: the paper's "
                                  "(6 AlexNet, 7 VGG) in 2D, 2 in 3D.")
    local_response_norm: bool = Field(default=True, description="AlexNet/GoogLeNet: the papers' local response "
                                      "normalisation (false leaves it out, as later reimplementations do).")
    aux_classifiers: bool = Field(default=False, description="GoogLeNet: its two auxiliary classifiers (after 4a and "
                                  "4d), trained with 0.3 of the loss each and unused at prediction.")

    @model_validator(mode="before")
    @classmethod
    def _original_dropout(cls, data: Any) -> Any:
        """``model.dropout`` not given: the original's for AlexNet, VGG and GoogLeNet (0 for the others)."""
        if isinstance(data, dict) and "dropout" not in data and data.get("name") in ORIGINAL_DROPOUT:
            return {**data, "dropout": ORIGINAL_DROPOUT[data["name"]]}
        return data
