"""The regression config: one or several continuous targets per image (a structure's volume, a
grade), read from the manifest or a CSV, normalised for training; whole images fitted to the
network input; a whole-image backbone with a linear head; L1 / L2 / Huber / log-cosh losses.
Light on purpose (pydantic only): ``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medseg.config import (
    DataConfig,
    LossConfig,
    PreprocessConfig,
    RunConfig,
    Section,
    StrEnum,
    check_spatial_length,
)
from medseg.config.image_model import ImageModelConfig


class RegressionLoss(StrEnum):
    L1 = "l1"  # mean absolute error: the median's loss, robust to outlying targets
    L2 = "l2"  # mean squared error: the mean's loss
    HUBER = "huber"  # L2 within loss.huber_delta, L1 beyond
    LOGCOSH = "logcosh"  # log(cosh(error)): smooth like L2 near zero, grows like L1 far out


class TargetNormalisation(StrEnum):
    ZSCORE = "zscore"  # (target - training mean) / training standard deviation, per target
    NONE = "none"


class InputFit(StrEnum):
    RESIZE = "resize"  # resample to preprocess.size: shape kept, physical size lost
    PAD_OR_CROP = "pad_or_crop"  # centre pad or crop to preprocess.size: voxel size kept (sizes, volumes)


class TargetsConfig(Section):
    file: Path | None = Field(
        default=None, description="CSV with case_id and the target columns; null: the manifest's own columns "
        "(named target or target_<name>).")
    columns: list[str] = Field(default_factory=lambda: ["target"], min_length=1,
                               description="The target columns, one network output each.")
    normalisation: TargetNormalisation = Field(
        default=TargetNormalisation.ZSCORE, description="How targets are scaled for training; the training "
        "split's statistics travel in the model's contract, so predictions come back in the targets' units.")
    ordinal: bool = Field(default=False, description="The targets are integer grades (adds quadratic-weighted kappa "
                          "on predictions rounded to the training range).")
    units: str | None = Field(default=None, examples=["mL"], description="Units of the targets, for reports.")

    @model_validator(mode="after")
    def _distinct(self) -> TargetsConfig:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"data.targets.columns {self.columns} names a column twice")
        return self


class RegressionDataConfig(DataConfig):
    targets: TargetsConfig = TargetsConfig()


class RegressionPreprocessConfig(PreprocessConfig):
    size: tuple[int, ...] = Field(examples=[[40, 56, 40]], description="The network input's spatial size.")
    fit: InputFit = Field(default=InputFit.RESIZE, description="How an image reaches preprocess.size: resize, or "
                          "pad_or_crop where the physical size is the answer (a volume).")


class RegressionLossConfig(LossConfig):
    name: RegressionLoss = RegressionLoss.L1
    huber_delta: float = Field(default=1.0, gt=0, description="Huber: where L2 turns into L1, in normalised units.")


class RegressionConfig(RunConfig):
    """``task: regression``: one or several continuous values per image, from the whole image."""

    task: Literal["regression"] = "regression"
    data: RegressionDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv",
                                                  "targets": {"columns": ["target"]}}])
    preprocess: RegressionPreprocessConfig = Field(examples=[{"size": [28, 28]}])
    model: ImageModelConfig = ImageModelConfig()
    loss: RegressionLossConfig = RegressionLossConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> RegressionConfig:
        dims = self.model.spatial_dims
        check_spatial_length("preprocess.size", self.preprocess.size, dims)
        check_spatial_length("preprocess.spacing", self.preprocess.spacing, dims)
        if self.data.labels:
            raise ValueError("data.labels does not apply to task: regression (its outputs are data.targets.columns)")
        return self
