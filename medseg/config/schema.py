"""The run configuration's schema: option enums, the sections every task shares and the base
:class:`RunConfig` (each task narrows it in ``medseg.tasks.<task>.config``, with ``extra="forbid"``
so an option of another task is refused)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from medseg.config.paths import PathKind
from medseg.errors import ConfigError

#: Environment variable that supplies ``data.root`` when the config leaves it empty.
DATA_ROOT_ENV = "MEDSEG_DATA_ROOT"


class StrEnum(str, Enum):
    """String enum that prints as its value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class CacheMode(StrEnum):
    MEMORY = "memory"
    DISK = "disk"
    NONE = "none"


class IntensityMode(StrEnum):
    ZSCORE = "zscore"
    CT_WINDOW = "ct_window"
    PERCENTILE = "percentile"
    CLIP_ZSCORE = "clip_zscore"  # nnU-Net's CT normalisation: clip to dataset percentiles, z-score with dataset stats
    NONE = "none"


class PatchSampler(StrEnum):
    POS_NEG = "pos_neg"
    PER_CLASS = "per_class"
    UNIFORM = "uniform"


class OptimizerName(StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class ScheduleName(StrEnum):
    COSINE = "cosine"
    POLY = "poly"
    CONSTANT = "constant"


class Precision(StrEnum):
    AUTO = "auto"  # fp16 autocast + GradScaler on CUDA, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast on CUDA or on CPUs with native bf16
    FP16 = "fp16"


# --------------------------------------------------------------------------------------- sections


class DataConfig(Section):
    """Where the cases are and how they are cached. Tasks that need a label map use
    :class:`LabelledDataConfig`, where ``labels`` is required."""

    manifest: Path = Field(examples=["data_manifests/cases.csv"])
    root: Path | None = Field(
        default=None, description=f"Folder the manifest's relative paths start from; else ${DATA_ROOT_ENV}."
    )
    labels: dict[int, str] | None = Field(
        default=None, description="Label value -> name; 0 is the background (segmentation) or the first class "
        "(classification).")
    channels: list[str] = Field(default_factory=lambda: ["image"], description="Names of input channels.")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    fold: int | None = Field(default=None, description="With fold-based manifests: this fold validates.")
    train_folds: Literal["others", "all"] = Field(
        default="others", description="With data.fold: 'others' trains on the other folds (cross-validation); 'all' "
        "trains on every fold, data.fold included (nnU-Net's final model on every case), so its validation scores "
        "only monitor training and the last weights are kept.")
    cache: CacheMode = Field(default=CacheMode.MEMORY, description="Where preprocessed volumes are kept: memory, "
                             "disk (uncompressed, memory-mapped, reused by later runs) or none.")
    cache_dir: Path | None = None
    augment_on_device: bool | None = Field(
        default=None, description="Keep the memory cache on the GPU and augment there; null: on when training "
        "on a GPU in-process and the cache takes under a quarter of its memory.")
    fingerprint: Path | None = Field(
        default=None, description="The dataset fingerprint `medseg plan` measured (JSON); the run logs it as an "
        "artifact and as an MLflow dataset pinned to the manifest's hash.")
    cross_split_duplicates: Literal["error", "warning"] = Field(
        default="error", description="An identical image file in two splits is a leak; 'warning' accepts it "
        "(e.g. to keep an official benchmark split that has a few, as PneumoniaMNIST and BreastMNIST do).")

    @field_validator("labels")
    @classmethod
    def _background_first(cls, labels: dict[int, str] | None) -> dict[int, str] | None:
        if labels is None:
            return None
        if 0 not in labels:
            raise ValueError("data.labels must map 0 to a name, e.g. {0: background, 1: tumour} or "
                             "{0: normal, 1: pneumonia}")
        if len(labels) < 2:
            raise ValueError("data.labels needs at least two entries (0 and one more)")
        expected = list(range(len(labels)))
        if sorted(labels) != expected:
            raise ValueError(f"data.labels keys must be consecutive from 0; got {sorted(labels)}, expected {expected}")
        if len(set(labels.values())) != len(labels):
            raise ValueError(f"data.labels names must be unique; got {list(labels.values())}")
        return labels

    @model_validator(mode="after")
    def _all_folds_need_a_fold(self) -> DataConfig:
        if self.train_folds == "all" and self.fold is None:
            raise ValueError("data.train_folds: all trains on every fold of a --folds manifest, so it needs data.fold "
                             "(the fold that is still validated on, e.g. data.fold: 0)")
        return self

    def seen_validation(self) -> bool:
        """True when the validation cases are trained on too (``train_folds: all``): their scores then
        monitor training but cannot select a checkpoint or fit a temperature."""
        return self.fold is not None and self.train_folds == "all"

    def resolved_root(self) -> Path:
        """Data root from config (absolute once validated), else the environment (a relative
        ``$MEDSEG_DATA_ROOT`` starts at the working directory).

        Raises:
            ConfigError: neither is set; the message says how to set one.
        """
        if self.root is not None:
            return self.root
        env = os.environ.get(DATA_ROOT_ENV)
        if env:
            return Path(env)
        raise ConfigError(
            f"No data root: set data.root in the config, pass --set data.root=/path/to/data, "
            f"or export {DATA_ROOT_ENV}=/path/to/data"
        )


class LabelledDataConfig(DataConfig):
    """Data of a task that learns from a label map: ``labels`` is required."""

    labels: dict[int, str] = Field(
        examples=[{0: "background", 1: "tumour"}], description="Label value -> name; 0 is the background "
        "(segmentation) or the first class (classification).")


class IntensityConfig(Section):
    mode: IntensityMode = IntensityMode.ZSCORE
    window: tuple[float, float] | None = Field(default=None, description="CT window [low, high] in HU.")
    percentiles: tuple[float, float] = (0.5, 99.5)
    nonzero: bool = Field(default=False, description="z-score over non-zero voxels only (skull-stripped MR).")
    clip: tuple[float, float] | None = Field(
        default=None, description="clip_zscore: clip to [low, high] (nnU-Net: the dataset's foreground 0.5 and 99.5 "
        "percentiles) ...")
    mean: float | None = Field(default=None, description="clip_zscore: ... then subtract this (foreground mean) ...")
    std: float | None = Field(default=None, gt=0, description="clip_zscore: ... and divide by this (foreground std).")

    @model_validator(mode="after")
    def _window_needed(self) -> IntensityConfig:
        if self.mode == IntensityMode.CT_WINDOW and self.window is None:
            raise ValueError("preprocess.intensity.window is required with mode: ct_window, e.g. [-160, 240]")
        if self.mode == IntensityMode.CLIP_ZSCORE and (self.clip is None or self.mean is None or self.std is None):
            raise ValueError("preprocess.intensity.clip, mean and std are required with mode: clip_zscore, e.g. "
                             "{mode: clip_zscore, clip: [-958, 327], mean: 82.9, std: 136.2} (medseg plan fills them "
                             "from the dataset fingerprint)")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError(f"preprocess.intensity.clip must be [low, high] with low < high; got {self.clip}")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"preprocess.intensity.window must be [low, high] with low < high; got {self.window}")
        return self


class PreprocessConfig(Section):
    orientation: str | None = "RAS"
    spacing: tuple[float, ...] | None = Field(default=None, description="Target spacing in mm; null keeps native.")
    intensity: IntensityConfig = IntensityConfig()
    crop_foreground: bool = False
    allow_constant: bool = Field(default=False, description="Accept images with one value everywhere; refused by "
                                 "default, since a blank export would get a confident-looking prediction.")


class _Aug(Section):
    prob: float = Field(default=0.5, ge=0.0, le=1.0)


class FlipAug(_Aug):
    name: Literal["flip"]
    axes: list[int] | None = Field(default=None, description="Spatial axes; null flips each axis independently.")


class Rot90Aug(_Aug):
    name: Literal["rot90"]
    max_k: int = 3
    axes: tuple[int, int] = (0, 1)


class AffineAug(_Aug):
    name: Literal["affine"]
    rotate_deg: float = 15.0
    scale: float = 0.1
    translate: float = 0.0


class ElasticAug(_Aug):
    name: Literal["elastic"]
    sigma: tuple[float, float] = (5.0, 8.0)
    magnitude: tuple[float, float] = (50.0, 150.0)


class NoiseAug(_Aug):
    name: Literal["noise"]
    std: float = 0.1


class GammaAug(_Aug):
    name: Literal["gamma"]
    gamma: tuple[float, float] = (0.7, 1.5)


class ContrastAug(_Aug):
    name: Literal["contrast"]
    scale: float = 0.25
    shift: float = 0.1


class BiasFieldAug(_Aug):
    name: Literal["bias_field"]
    coeff_range: tuple[float, float] = (0.0, 0.1)


class KSpaceSpikeAug(_Aug):
    name: Literal["kspace_spike"]
    intensity_range: tuple[float, float] = (0.95, 1.10)


class GibbsAug(_Aug):
    name: Literal["gibbs"]
    alpha: tuple[float, float] = (0.0, 0.6)


AugmentConfig = Annotated[
    Union[  # noqa: UP007 - pydantic discriminated unions read best spelled out
        FlipAug, Rot90Aug, AffineAug, ElasticAug, NoiseAug, GammaAug, ContrastAug, BiasFieldAug, KSpaceSpikeAug, GibbsAug
    ],
    Field(discriminator="name"),
]


class PatchConfig(Section):
    """Training patches (segmentation). Lives here because the data layer's samplers read it."""

    size: tuple[int, ...] = Field(examples=[[96, 96, 96]])
    samples_per_volume: int = Field(default=2, ge=1)
    sampler: PatchSampler = PatchSampler.POS_NEG
    pos_fraction: float = Field(default=0.67, ge=0.0, le=1.0)
    class_ratios: tuple[float, ...] | None = Field(
        default=None, description="per_class sampler: relative frequency of patch centres in each label value "
        "(background first); null: equal, which already oversamples rare classes.")


class ModelConfig(Section):
    """What every task's network section has; each task narrows it to its own class."""

    name: str
    spatial_dims: Literal[2, 3] = 3
    channels: tuple[int, ...] = Field(
        default=(16, 32, 64, 128), description="U-Net: features per level; lenet: conv features per stage; "
        "mlp: hidden units per layer.")
    norm: str = "instance"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_from: Annotated[str | None, PathKind.MODEL] = Field(
        default=None, description="Start training from this model's weights (runs:/<id>/model, "
        "models:/<name>/<version>, models:/<name>@<alias>, a model folder, or a .safetensors checkpoint or state "
        "dict); tensors whose name or shape differs (e.g. another class count) start fresh. A resumed run "
        "continues from its own checkpoint instead.")


class UNetModelConfig(ModelConfig):
    """The U-Net family's options, shared by the segmentation and reconstruction networks."""

    name: str = "unet"
    strides: tuple[int | tuple[int, ...], ...] | None = Field(
        default=None, description="One per downsampling step: an int (every axis) or one per spatial axis "
        "([2, 2, 1] keeps the thick-slice axis); default 2 between every level.")
    kernels: tuple[tuple[int, ...], ...] | None = Field(
        default=None, description="dynunet: per level, the convolution kernel per spatial axis ([3, 3, 1] on "
        "thick slices, nnU-Net's rule); default 3 everywhere.")
    num_res_units: int = 1


class LossConfig(Section):
    """Every task's loss section has a name; each task narrows it to its own enum and options."""

    name: str


class OptimConfig(Section):
    name: OptimizerName = OptimizerName.ADAMW
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = 1e-5
    momentum: float = 0.99
    schedule: ScheduleName = ScheduleName.COSINE
    warmup_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    min_lr_fraction: float = 0.01
    l1: float = Field(default=0.0, ge=0.0, description="L1 penalty on weights (not biases or norms), added to the loss.")
    l2: float = Field(default=0.0, ge=0.0, description="L2 penalty (sum of squares) on the same weights; "
                      "weight_decay is the decoupled alternative.")
class TrainConfig(Section):
    max_epochs: int | None = Field(
        default=100, ge=1, description="Epoch cap; null: none, the wall-clock budget (max_minutes) alone ends "
        "training and the LR schedule follows the clock (what `medseg plan` writes: a budget is a promise).")
    max_minutes: float | None = Field(default=None, gt=0, description="Wall-clock budget for training, validations "
                                      "included: the last one is foreseen, so training ends on time.")
    batch_size: int = Field(default=2, ge=1)
    folds: int | None = Field(
        default=None, ge=2, description="Train a K-fold cross-validation ensemble (nnU-Net's final model): one child "
        "run per fold 0..K-1 of a --folds manifest, each on the other folds, predicted as their average; "
        "max_minutes is each member's. Same as `medseg run --folds K`; null: one run.")
    iterations_per_epoch: int | None = Field(default=None, ge=1)
    val_interval: int = Field(default=1, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1, description="In validations, not epochs.")
    device: str = "auto"
    precision: Precision = Precision.AUTO
    channels_last: bool | None = Field(
        default=None, description="Channels-last memory order for the network and its batches; null: on for 3D "
        "networks (faster convolutions on CPUs and GPUs), off for 2D.")
    num_workers: int | None = Field(default=None, ge=0, description="null picks from the core count.")
    num_threads: int | None = Field(default=None, ge=1, description="Intra-op CPU threads of each training process; "
                                    "null: OMP_NUM_THREADS where set, else the cores shared between the processes on "
                                    "this machine.")
    grad_clip: float | None = 12.0
    deterministic: bool = Field(
        default=False, description="Deterministic algorithms and a step-based LR schedule: reruns give identical "
        "curves (same machine, same thread count). Slower on GPUs.")
    checkpoint_interval_minutes: float = Field(
        default=10.0, ge=0, description="Also save checkpoints/last.safetensors mid-epoch this often (0: every iteration), "
        "so a crash loses at most this much work.")

    @model_validator(mode="after")
    def _something_ends_training(self) -> TrainConfig:
        if self.max_epochs is None and self.max_minutes is None:
            raise ValueError("train.max_epochs and train.max_minutes are both null, so nothing would end training; "
                             "set a budget (e.g. train.max_minutes: 30) or an epoch count (train.max_epochs: 100)")
        if self.deterministic and self.max_epochs is None:
            raise ValueError("train.deterministic follows steps, not the clock, so it needs train.max_epochs (got "
                             "null); set an epoch count or turn deterministic off")
        return self


class ValidationConfig(Section):
    """Every task validates; what it can be told about it is the task's (see its config class)."""


class CalibratedValidationConfig(ValidationConfig):
    """Validation of a task whose network outputs class probabilities."""

    calibrate: bool = Field(
        default=True, description="Fit a temperature on the validation split after training (temperature scaling: "
        "probabilities that mean what they say); the model stores it and predict applies it. Segmentation and "
        "softmax classifiers; ECE before and after is logged.")


class TrackingConfig(Section):
    uri: Annotated[str, PathKind.TRACKING] = Field(
        default="sqlite:///runs/mlflow.db", description="The MLflow store: sqlite:///<file>.db (a relative file "
        "like any other path), a folder, or a server's http://host:port.")
    experiment: str = "medseg"
    run_name: str | None = None
    register_model_as: str | None = None
    model_alias: str | None = Field(
        default=None, description="Set this alias (e.g. champion) on the registered version, so "
        "models:/<register_model_as>@<alias> names it; needs register_model_as.")
    system_metrics: bool = Field(
        default=True, description="Sample CPU, memory, disk, network and (with nvidia-ml-py installed) GPU use "
        "into system/... metrics while the run lasts: the MLflow run page's System metrics tab.")
    system_metrics_interval_s: float = Field(
        default=10.0, gt=0, description="Seconds between two system metric samples.")

    @model_validator(mode="after")
    def _alias_needs_a_name(self) -> TrackingConfig:
        if self.model_alias and not self.register_model_as:
            raise ValueError("tracking.model_alias needs tracking.register_model_as (the registered model to alias)")
        return self


class RunConfig(Section):
    """The sections every task has. A task's config class subclasses it, sets ``task`` to
    ``Literal["<name>"]``, narrows ``data``, ``preprocess``, ``model``, ``loss`` and ``validation`` to
    its own section classes and adds its own sections; the task registry picks the class."""

    task: str
    seed: int = 0
    output_dir: Path = Path("runs/medseg")
    data: DataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv"}])
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: list[AugmentConfig] = Field(default_factory=list)
    model: ModelConfig = Field(examples=[{"name": "unet"}])
    loss: LossConfig = Field(examples=[{"name": "dice_ce"}])
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    tracking: TrackingConfig = TrackingConfig()


def check_spatial_length(key: str, values: Sequence[Any] | None, spatial_dims: int) -> None:
    """For a task's cross-section validator: a per-axis setting needs one value per spatial axis.

    Raises:
        ValueError: ``values`` is given and its length is not ``spatial_dims``.
    """
    if values is not None and len(values) != spatial_dims:
        raise ValueError(f"{key} has {len(values)} values but model.spatial_dims is {spatial_dims}")
