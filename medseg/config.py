"""Typed run configuration: YAML in, validated pydantic objects out, at one boundary.

Everything downstream sees attributes, never string keys. Unknown keys are errors that
suggest the nearest valid key ("did you mean"), the way MONAI's ``look_up_option`` does.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError

#: Environment variable that supplies ``data.root`` when the config leaves it empty.
DATA_ROOT_ENV = "MEDSEG_DATA_ROOT"


class StrEnum(str, Enum):
    """String enum that prints as its value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Task(StrEnum):
    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    RECONSTRUCTION = "reconstruction"


class CacheMode(StrEnum):
    MEMORY = "memory"
    DISK = "disk"
    NONE = "none"


class IntensityMode(StrEnum):
    ZSCORE = "zscore"
    CT_WINDOW = "ct_window"
    PERCENTILE = "percentile"
    NONE = "none"


class PatchSampler(StrEnum):
    POS_NEG = "pos_neg"
    PER_CLASS = "per_class"
    UNIFORM = "uniform"


class LossName(StrEnum):
    # segmentation
    DICE_CE = "dice_ce"
    DICE = "dice"
    DICE_FOCAL = "dice_focal"
    # classification
    CE = "ce"  # cross-entropy, optional class weights and label smoothing
    FOCAL = "focal"
    HINGE = "hinge"  # multi-class SVM hinge (Weston-Watkins), torch MultiMarginLoss
    ORDINAL = "ordinal"  # cumulative-link: K-1 "label > k" logits (CORAL-style), for ordered grades
    # reconstruction (image regression)
    L1 = "l1"
    L2 = "l2"  # mean squared error
    HUBER = "huber"  # smooth L1: L2 below loss.huber_delta, L1 above
    LOG_COSH = "log_cosh"
    SSIM = "ssim"  # 1 - SSIM
    L1_SSIM = "l1_ssim"  # (1 - a) L1 + a (1 - SSIM), a = loss.ssim_weight (Zhao et al. 2017)


SEGMENTATION_LOSSES = (LossName.DICE_CE, LossName.DICE, LossName.DICE_FOCAL)
RECONSTRUCTION_LOSSES = (LossName.L1, LossName.L2, LossName.HUBER, LossName.LOG_COSH, LossName.SSIM, LossName.L1_SSIM)


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


#: Reconstruction networks: residual U-Net (FBPConvNet for CT), the same with a data-consistency
#: step, and an unrolled cascade of both (Schlemper et al. 2018).
RECON_MODELS = ("unet", "unet_dc", "cascade")


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


class DataConfig(_Strict):
    manifest: Path
    root: Path | None = Field(
        default=None, description=f"Folder the manifest's relative paths start from; else ${DATA_ROOT_ENV}."
    )
    labels: dict[int, str] | None = Field(
        default=None, description="Label value -> name; 0 is the background (segmentation) or the first class "
        "(classification). Required for both; reconstruction has none.")
    channels: list[str] = Field(default_factory=lambda: ["image"], description="Names of input channels.")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    fold: int | None = Field(default=None, description="With fold-based manifests: this fold validates.")
    cache: CacheMode = Field(default=CacheMode.MEMORY, description="Where preprocessed volumes are kept: memory, "
                             "disk (uncompressed, memory-mapped, reused by later runs) or none.")
    cache_dir: Path | None = None
    augment_on_device: bool | None = Field(
        default=None, description="Keep the memory cache on the GPU and augment there; null: on when training "
        "on a GPU in-process and the cache takes under a quarter of its memory.")
    cross_split_duplicates: Literal["error", "warning"] = Field(
        default="error", description="An identical image file in two splits is a leak; 'warning' accepts it "
        "(e.g. to keep an official benchmark split that has a few, as PneumoniaMNIST and BreastMNIST do).")
    ordinal: bool = Field(default=False, description="Classification: the classes are ordered grades (adds MAE "
                          "and quadratic-weighted kappa; allows loss.name: ordinal).")

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

    def resolved_root(self) -> Path:
        """Data root from config, else the environment; relative paths start at the working directory."""
        if self.root is not None:
            return self.root
        env = os.environ.get(DATA_ROOT_ENV)
        if env:
            return Path(env)
        raise ConfigError(
            f"No data root: set data.root in the config, pass --set data.root=/path/to/data, "
            f"or export {DATA_ROOT_ENV}=/path/to/data"
        )


class IntensityConfig(_Strict):
    mode: IntensityMode = IntensityMode.ZSCORE
    window: tuple[float, float] | None = Field(default=None, description="CT window [low, high] in HU.")
    percentiles: tuple[float, float] = (0.5, 99.5)
    nonzero: bool = Field(default=False, description="z-score over non-zero voxels only (skull-stripped MR).")

    @model_validator(mode="after")
    def _window_needed(self) -> IntensityConfig:
        if self.mode == IntensityMode.CT_WINDOW and self.window is None:
            raise ValueError("preprocess.intensity.window is required with mode: ct_window, e.g. [-160, 240]")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"preprocess.intensity.window must be [low, high] with low < high; got {self.window}")
        return self


class PreprocessConfig(_Strict):
    orientation: str | None = "RAS"
    spacing: tuple[float, ...] | None = Field(default=None, description="Target spacing in mm; null keeps native.")
    intensity: IntensityConfig = IntensityConfig()
    crop_foreground: bool = False
    resize: tuple[int, ...] | None = Field(
        default=None, description="Classification (required there): resize every image to this spatial size, "
        "the network's input.")


class _Aug(_Strict):
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


class PatchConfig(_Strict):
    size: tuple[int, ...]
    samples_per_volume: int = Field(default=2, ge=1)
    sampler: PatchSampler = PatchSampler.POS_NEG
    pos_fraction: float = Field(default=0.67, ge=0.0, le=1.0)


class ModelConfig(_Strict):
    name: str = "unet"
    spatial_dims: Literal[2, 3] = 3
    channels: tuple[int, ...] = Field(
        default=(16, 32, 64, 128), description="U-Net: features per level; lenet: conv features per stage; "
        "mlp: hidden units per layer.")
    strides: tuple[int, ...] | None = Field(default=None, description="Default: 2 between every level.")
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Activation = Activation.RELU
    widen_factor: float = Field(default=1.0, gt=0, description="ResNet: width multiplier of 64-128-256-512.")
    stem: Stem = Field(default=Stem.SMALL, description="ResNet/DenseNet first layers: small, strided or imagenet.")
    init_from: str | None = Field(
        default=None, description="Start from this model's weights (runs:/<id>/model, models:/<name>/<version>, "
        "a model folder or a .pt checkpoint); layers whose shape differs (e.g. another class count) start fresh.")
    freeze: list[str] = Field(
        default_factory=list, description="Parameter-name prefixes to keep fixed (e.g. [conv1, layer1]); "
        "'backbone' freezes everything but the classification head.")
    cascades: int = Field(default=3, ge=1, description="Reconstruction, model.name: cascade: unrolled (U-Net, data "
                          "consistency) stages.")


class LossConfig(_Strict):
    name: LossName = LossName.DICE_CE
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    class_weights: Literal["balanced"] | list[float] | None = Field(
        default=None, description="Classification: per-class loss weights, or 'balanced' (inverse training "
        "frequency, scikit-learn's definition).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    focal_gamma: float = Field(default=2.0, ge=0.0)
    hinge_margin: float = Field(default=1.0, gt=0.0)
    huber_delta: float = Field(default=0.05, gt=0.0, description="Reconstruction: where huber turns from L2 to L1 "
                               "(images are scaled to [0, 1]).")
    ssim_weight: float = Field(default=0.84, ge=0.0, le=1.0, description="l1_ssim: weight of the SSIM term.")


class OptimConfig(_Strict):
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


class TrainConfig(_Strict):
    max_epochs: int = Field(default=100, ge=1)
    max_minutes: float | None = Field(default=None, gt=0, description="Wall-clock budget for training.")
    batch_size: int = Field(default=2, ge=1)
    iterations_per_epoch: int | None = Field(default=None, ge=1)
    val_interval: int = Field(default=1, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1, description="In validations, not epochs.")
    device: str = "auto"
    precision: Precision = Precision.AUTO
    channels_last: bool | None = Field(
        default=None, description="Channels-last memory order for the network and its batches; null: on for 3D "
        "networks (faster convolutions on CPUs and GPUs), off for 2D.")
    num_workers: int | None = Field(default=None, ge=0, description="null picks from the core count.")
    num_threads: int | None = Field(default=None, ge=1)
    grad_clip: float | None = 12.0
    deterministic: bool = Field(
        default=False, description="Deterministic algorithms and a step-based LR schedule: reruns give identical "
        "curves (same machine, same thread count). Slower on GPUs.")
    checkpoint_interval_minutes: float = Field(
        default=10.0, ge=0, description="Also save checkpoints/last.pt mid-epoch this often (0: every iteration), "
        "so a crash loses at most this much work.")


class ValidationConfig(_Strict):
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    hd95: bool = True
    overlays: int = Field(default=3, ge=0)
    calibration_bins: int = Field(default=10, ge=2, description="Classification: bins of the reliability diagram/ECE.")
    tsne: bool = Field(default=True, description="Classification: t-SNE map of the penultimate layer on the test split.")


class PostprocessConfig(_Strict):
    keep_largest_component: bool = Field(
        default=False, description="Keep only the largest connected component of each foreground label."
    )


class ReconProblem(StrEnum):
    MRI = "mri"  # retrospective Cartesian undersampling of k-space
    CT = "ct"  # sparse-view parallel-beam CT, filtered back-projection as input
    DENOISE = "denoise"


class MaskKind(StrEnum):
    EQUISPACED = "equispaced"
    RANDOM = "random"


class NoiseKind(StrEnum):
    GAUSSIAN = "gaussian"
    RICIAN = "rician"


class PhantomConfig(_Strict):
    """Random-ellipse phantoms written by the pipeline (CT training data) and listed in data.manifest."""

    train: int = Field(default=800, ge=1)
    val: int = Field(default=40, ge=1)
    test: int = Field(default=60, ge=1)
    size: int = Field(default=128, ge=16, description="Phantom side in pixels.")
    ellipses: tuple[int, int] = Field(default=(4, 12), description="How many ellipses per phantom [min, max].")
    seed: int = Field(default=1234, description="Phantoms depend on this seed only (not on the run's seed).")


class ReconConfig(_Strict):
    """How measurements are simulated from the images (fully sampled ground truth) and what the network sees."""

    problem: ReconProblem = ReconProblem.MRI
    image_size: tuple[int, int] = Field(
        default=(64, 64), description="In-plane size of a training slice: smaller slices are zero-padded to it "
        "(centred), larger ones cropped at random. Evaluation pads each volume to at least this size.")
    slice_axis: int = Field(default=2, ge=0, le=2, description="Axis of the (oriented) volume that slices are taken "
                            "along; the network is 2D.")
    slices_per_volume: int = Field(default=4, ge=1, description="Training slices drawn per volume visit.")
    # MRI
    mask: MaskKind = MaskKind.EQUISPACED
    acceleration: float = Field(default=4.0, gt=1.0)
    center_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Fully sampled centre fraction; null: fastMRI's 0.08 at 4x, "
        "0.04 at 8x (0.32 / acceleration).")
    input: Literal["complex", "magnitude"] = Field(
        default="complex", description="MRI network input: the zero-filled image as 2 channels (real, imaginary) "
        "or its magnitude (data consistency needs complex).")
    # CT
    views: int = Field(default=60, ge=2, description="Projection angles, evenly spread over 180 degrees.")
    # denoising
    noise: NoiseKind = NoiseKind.GAUSSIAN
    noise_level: float = Field(default=0.05, gt=0.0, description="Noise standard deviation relative to the image "
                               "maximum (images are scaled to [0, 1]).")
    phantoms: PhantomConfig | None = Field(
        default=None, description="Generate random-ellipse phantoms into data.root and list them in data.manifest.")
    real_images: list[str] = Field(
        default_factory=list, description="Extra evaluation on real images (metrics prefixed real/): files or DICOM "
        "series folders, relative to data.root, or 'pydicom:<test file>' for images that ship with pydicom.")

    def resolved_center_fraction(self) -> float:
        return self.center_fraction if self.center_fraction is not None else 0.32 / self.acceleration


class TrackingConfig(_Strict):
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "medseg"
    run_name: str | None = None
    register_model_as: str | None = None


class RunConfig(_Strict):
    task: Task = Task.SEGMENTATION
    seed: int = 0
    output_dir: Path = Path("runs/medseg")
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: list[AugmentConfig] = Field(default_factory=list)
    patch: PatchConfig | None = Field(default=None, description="Segmentation: training patches (required there).")
    recon: ReconConfig | None = Field(default=None, description="Reconstruction: the simulated acquisition "
                                      "(required there).")
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """Defaults that depend on the task: a classification config without a loss or model
        name gets cross-entropy and ResNet-18 rather than the segmentation defaults."""
        task = str(raw.get("task", "")) if isinstance(raw, dict) else ""
        defaults = {
            Task.CLASSIFICATION.value: (("loss", "name", LossName.CE.value), ("model", "name", "resnet18"),
                                        ("model", "norm", "batch")),
            Task.RECONSTRUCTION.value: (("loss", "name", LossName.L1_SSIM.value), ("model", "spatial_dims", 2),
                                        ("recon", "problem", ReconProblem.MRI.value)),
        }
        if task == Task.RECONSTRUCTION.value:
            # reconstruction scales every volume to [0, 1] itself (min-max): no other normalisation
            pre = raw.get("preprocess") or {}
            if isinstance(pre, dict) and "intensity" not in pre:
                raw = {**raw, "preprocess": {**pre, "intensity": {"mode": IntensityMode.NONE.value}}}
        if task in defaults:
            for section, key, default in defaults[task]:
                value = raw.get(section)
                if value is None:
                    raw = {**raw, section: {key: default}}
                    continue
                elif isinstance(value, dict) and key not in value:
                    raw = {**raw, section: {**value, key: default}}
        return raw

    @model_validator(mode="after")
    def _task_sections(self) -> RunConfig:
        if self.task == Task.RECONSTRUCTION:
            return self._reconstruction_sections()
        if self.data.labels is None:
            raise ValueError(f"data.labels is required for task: {self.task}, e.g. {{0: background, 1: tumour}}")
        if self.recon is not None:
            raise ValueError(f"recon is for task: reconstruction, not {self.task}")
        seg = self.task == Task.SEGMENTATION
        if seg and self.patch is None:
            raise ValueError("patch is required for task: segmentation, e.g. patch: {size: [96, 96, 96]}")
        if not seg and self.preprocess.resize is None:
            raise ValueError(f"preprocess.resize is required for task: {self.task}: the network's input size, "
                             "e.g. [28, 28] (images of another size are resized to it)")
        if not seg and self.patch is not None:
            raise ValueError(f"patch is for segmentation; task: {self.task} takes whole images "
                             "(set preprocess.resize for the input size)")
        if seg != (self.loss.name in SEGMENTATION_LOSSES):
            names = [str(n) for n in LossName if (n in SEGMENTATION_LOSSES) == seg]
            raise ValueError(f"loss.name {self.loss.name} does not fit task: {self.task}; use one of {names}")
        if self.loss.name == LossName.ORDINAL and not self.data.ordinal:
            raise ValueError("loss.name: ordinal needs ordered classes: set data.ordinal: true")
        if isinstance(self.loss.class_weights, list) and len(self.loss.class_weights) != len(self.data.labels):
            raise ValueError(f"loss.class_weights has {len(self.loss.class_weights)} values for "
                             f"{len(self.data.labels)} classes in data.labels")
        if self.preprocess.resize is not None and len(self.preprocess.resize) != self.model.spatial_dims:
            raise ValueError(f"preprocess.resize has {len(self.preprocess.resize)} values but model.spatial_dims "
                             f"is {self.model.spatial_dims}")
        return self

    def _reconstruction_sections(self) -> RunConfig:
        recon = self.recon
        if recon is None:  # pragma: no cover - the before-validator always supplies one
            raise ValueError("recon is required for task: reconstruction")
        if self.patch is not None:
            raise ValueError("patch is for segmentation; reconstruction takes whole slices of recon.image_size")
        if self.loss.name not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"loss.name {self.loss.name} does not fit task: reconstruction; use one of "
                             f"{[str(n) for n in RECONSTRUCTION_LOSSES]}")
        if self.model.spatial_dims != 2:
            raise ValueError("reconstruction networks are 2D (slice by slice): set model.spatial_dims: 2")
        if self.model.name not in RECON_MODELS:
            raise ValueError(f"model.name {self.model.name!r} is not a reconstruction network; use one of {RECON_MODELS}")
        if self.model.name != "unet" and recon.problem != ReconProblem.MRI:
            raise ValueError(f"model.name {self.model.name} puts measured k-space back, so it needs recon.problem: "
                             f"mri (got {recon.problem}); use unet (FBPConvNet / residual denoiser)")
        if self.model.name != "unet" and recon.input != "complex":
            raise ValueError(f"model.name {self.model.name}: data consistency works on the complex image; "
                             "set recon.input: complex")
        if recon.problem == ReconProblem.MRI and recon.resolved_center_fraction() * recon.acceleration > 1:
            raise ValueError(f"recon.center_fraction {recon.resolved_center_fraction()} at acceleration "
                             f"{recon.acceleration}: the centre alone exceeds the line budget; lower one of them")
        if len(self.data.channels) != 1:
            raise ValueError("reconstruction takes single-channel images (data.channels: [image])")
        if self.preprocess.intensity.mode != IntensityMode.NONE:
            raise ValueError("reconstruction scales every volume to [0, 1] itself; set preprocess.intensity.mode: "
                             "none (or leave preprocess.intensity out)")
        return self

    @model_validator(mode="after")
    def _dims_agree(self) -> RunConfig:
        dims = self.model.spatial_dims
        if self.task == Task.RECONSTRUCTION:  # 2D networks over slices of volumes: nothing to match
            return self
        if self.patch is None:  # classification: the image itself is the input
            if self.preprocess.spacing is not None and len(self.preprocess.spacing) != dims:
                raise ValueError(f"preprocess.spacing has {len(self.preprocess.spacing)} values but "
                                 f"model.spatial_dims is {dims}")
            return self
        if len(self.patch.size) != dims:
            raise ValueError(f"patch.size has {len(self.patch.size)} values but model.spatial_dims is {dims}")
        for i, aug in enumerate(self.augment):
            if isinstance(aug, Rot90Aug):
                a, b = aug.axes
                if max(a, b) >= dims or self.patch.size[a] != self.patch.size[b]:
                    raise ValueError(
                        f"augment.{i} (rot90) turns spatial axes {a} and {b}, so patch.size must be equal on both "
                        f"(got {list(self.patch.size)}); set augment.{i}.axes to two axes of equal patch size"
                    )
        if self.preprocess.spacing is not None and len(self.preprocess.spacing) != dims:
            raise ValueError(
                f"preprocess.spacing has {len(self.preprocess.spacing)} values but model.spatial_dims is {dims}"
            )
        return self


# --------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it.

    Args:
        path: YAML file.
        overrides: strings like ``train.max_epochs=5``; the value is parsed as YAML.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or a key or value
            is invalid (unknown keys name the closest valid key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path} (working directory {Path.cwd()})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` inside a nested dict (list items by index, ``augment.0.prob=0.2``)."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_epochs=5")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err}); quote it or fix the brackets") from None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: depth + 1])]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is a value, not a section")


def _list_index(node: list[Any], part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {'.'.join(parts)}: expected a list index below {len(node)}, got {part!r}")
    return int(part)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`, rewriting pydantic errors for people."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(e) for e in err.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None


def _describe_error(error: Any) -> str:
    loc = [p for p in error["loc"]]
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys_at(RunConfig, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        suggestion = f"; did you mean {'.'.join(str(p) for p in [*_public(loc[:-1]), hint[0]])!r}?" if hint else ""
        return f"unknown key {'.'.join(str(p) for p in _public(loc))!r}{suggestion} Valid keys here: {sorted(valid)}"
    if error["type"] == "missing":
        return f"{'.'.join(str(p) for p in _public(loc))}: required key is missing"
    return f"{'.'.join(str(p) for p in _public(loc)) or dotted}: {error['msg']} (got {error.get('input')!r})"


def _public(loc: list[Any]) -> list[Any]:
    """Drop pydantic's union-tag entries (``augment.0.flip.prob`` -> ``augment.0.prob``)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i > 0 and isinstance(loc[i - 1], int) and isinstance(part, str) and part in _AUG_TAGS:
            continue
        out.append(part)
    return out


def _valid_keys_at(model: Any, loc: list[Any]) -> list[str]:
    """Walk annotations along ``loc`` to the model that rejected the key and list its fields."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int):
            continue
        if isinstance(node, dict):  # discriminated union: tag -> model
            node = node.get(part, node)
            continue
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Reduce Optional/list/dict/Annotated annotations to a model, or a tag->model map for unions."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(models) > 1:
                return {typing.get_args(m.model_fields["name"].annotation)[0]: m for m in models}
            annotation = members[0] if len(members) == 1 else (models[0] if models else members[0])
        else:
            return annotation


_AUG_TAGS = set(_unwrap(AugmentConfig))


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-friendly dict of a config (paths and enums as strings)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig, path: Path) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    from medseg.io.atomic import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of mappings are indexed (``augment.0.name``)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out
