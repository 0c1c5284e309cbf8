"""The classification config: whole images resized to the network input, ResNet / DenseNet /
LeNet / MLP networks, cross-entropy-family losses, calibration and t-SNE at validation. Light on
purpose (pydantic only): ``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medseg.config import (
    CalibratedValidationConfig,
    LabelledDataConfig,
    LossConfig,
    PreprocessConfig,
    RunConfig,
    StrEnum,
    check_spatial_length,
)
from medseg.config.image_model import ImageModelConfig


class ClassificationLoss(StrEnum):
    CE = "ce"  # cross-entropy, optional class weights and label smoothing
    FOCAL = "focal"
    HINGE = "hinge"  # multi-class SVM hinge (Weston-Watkins), torch MultiMarginLoss
    ORDINAL = "ordinal"  # cumulative-link: K-1 "label > k" logits (CORAL-style), for ordered grades


class ClassificationDataConfig(LabelledDataConfig):
    labels: dict[int, str] = Field(examples=[{0: "normal", 1: "pneumonia"}],
                                   description="Class index -> name, from 0.")
    ordinal: bool = Field(default=False, description="The classes are ordered grades (adds MAE and "
                          "quadratic-weighted kappa; allows loss.name: ordinal).")


class ClassificationPreprocessConfig(PreprocessConfig):
    resize: tuple[int, ...] = Field(
        examples=[[28, 28]], description="Resize every image to this spatial size, the network's input.")


class ClassificationModelConfig(ImageModelConfig):
    freeze: list[str] = Field(
        default_factory=list, description="Parameter-name prefixes to keep fixed (e.g. [conv1, layer1]); "
        "'backbone' freezes everything but the classification head.")


class ClassificationLossConfig(LossConfig):
    name: ClassificationLoss = ClassificationLoss.CE
    class_weights: Literal["balanced"] | list[float] | None = Field(
        default=None, description="Per-class loss weights, or 'balanced' (inverse training frequency, "
        "scikit-learn's definition).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    focal_gamma: float = Field(default=2.0, ge=0.0)
    hinge_margin: float = Field(default=1.0, gt=0.0)


class ClassificationValidationConfig(CalibratedValidationConfig):
    calibration_bins: int = Field(default=10, ge=2, description="Bins of the reliability diagram / ECE.")
    tsne: bool = Field(default=True, description="t-SNE map of the penultimate layer on the test split.")


class ClassificationConfig(RunConfig):
    """``task: classification``: one class per image, from the whole (resized) image."""

    task: Literal["classification"] = "classification"
    data: ClassificationDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv",
                                                      "labels": {0: "normal", 1: "pneumonia"}}])
    preprocess: ClassificationPreprocessConfig = Field(examples=[{"resize": [28, 28]}])
    model: ClassificationModelConfig = ClassificationModelConfig()
    loss: ClassificationLossConfig = ClassificationLossConfig()
    validation: ClassificationValidationConfig = ClassificationValidationConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> ClassificationConfig:
        dims = self.model.spatial_dims
        check_spatial_length("preprocess.resize", self.preprocess.resize, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        if self.loss.name == ClassificationLoss.ORDINAL and not self.data.ordinal:
            raise ValueError("loss.name: ordinal needs ordered classes: set data.ordinal: true")
        weights = self.loss.class_weights
        if isinstance(weights, list) and len(weights) != len(self.data.labels):
            raise ValueError(f"loss.class_weights has {len(weights)} values for {len(self.data.labels)} classes "
                             "in data.labels")
        return self
