"""The reconstruction config: the simulated acquisition (MRI undersampling, sparse-view CT,
denoising, thick slices for super-resolution), 2D U-Net / data-consistency networks over slices, image-regression losses. Light on
purpose (pydantic only): ``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medseg.config import (
    DataConfig,
    IntensityConfig,
    IntensityMode,
    LossConfig,
    PreprocessConfig,
    RunConfig,
    Section,
    StrEnum,
    UNetModelConfig,
    ValidationConfig,
)
from medseg.tasks.reconstruction.translation_config import (  # translation
    TranslationConfig,
    check_translation_channels,
)

#: Reconstruction networks: residual U-Net (FBPConvNet for CT), the same with a data-consistency
#: step, and an unrolled cascade of both (Schlemper et al. 2018).
RECON_MODELS = ("unet", "unet_dc", "cascade")


class ReconstructionLoss(StrEnum):
    L1 = "l1"
    L2 = "l2"  # mean squared error
    HUBER = "huber"  # smooth L1: L2 below loss.huber_delta, L1 above
    LOG_COSH = "log_cosh"
    SSIM = "ssim"  # 1 - SSIM
    L1_SSIM = "l1_ssim"  # (1 - a) L1 + a (1 - SSIM), a = loss.ssim_weight (Zhao et al. 2017)


class ReconProblem(StrEnum):
    MRI = "mri"  # retrospective Cartesian undersampling of k-space
    CT = "ct"  # sparse-view parallel-beam CT, filtered back-projection as input
    DENOISE = "denoise"
    SR = "sr"  # through-plane super-resolution: thick slices simulated from thin ones
    TRANSLATION = "translation"  # one contrast synthesised from others (translation.py)


class SliceProfile(StrEnum):
    BOX = "box"  # a slab: every thin voxel under the slice weighs the same
    GAUSSIAN = "gaussian"  # full width at half maximum = the slice thickness


class MaskKind(StrEnum):
    EQUISPACED = "equispaced"
    RANDOM = "random"


class NoiseKind(StrEnum):
    GAUSSIAN = "gaussian"
    RICIAN = "rician"


class PhantomConfig(Section):
    """Random-ellipse phantoms written by the pipeline (CT training data) and listed in data.manifest."""

    train: int = Field(default=800, ge=1)
    val: int = Field(default=40, ge=1)
    test: int = Field(default=60, ge=1)
    size: int = Field(default=128, ge=16, description="Phantom side in pixels.")
    ellipses: tuple[int, int] = Field(default=(4, 12), description="How many ellipses per phantom [min, max].")
    seed: int = Field(default=1234, description="Phantoms depend on this seed only (not on the run's seed).")


class SuperResolutionConfig(Section):
    """How thick slices are simulated from thin ones (see :mod:`medseg.tasks.reconstruction.slice_profile`)."""

    factor: int = Field(default=3, ge=2, le=8, description="Thin slices per thick slice: the through-plane "
                        "upsampling factor.")
    axis: int = Field(default=2, ge=0, le=2, description="The through-plane axis of the (oriented) volume.")
    profile: SliceProfile = Field(default=SliceProfile.GAUSSIAN, description="The slice profile: box or gaussian.")
    gap: float = Field(default=0.0, ge=0.0, description="Unmeasured space between slices, in thin voxels: the "
                       "slice thickness is factor - gap.")
    context: int = Field(default=0, ge=0, le=4, description="2.5D input: this many neighbouring slices on each "
                         "side of a slice (along recon.slice_axis, interpolated from the thick ones like the slice "
                         "itself) go in as extra channels; 0: the slice alone (2D).")

    @property
    def thickness(self) -> float:
        """The slice thickness (the profile's width) in thin voxels."""
        return self.factor - self.gap

    @model_validator(mode="after")
    def _a_slice_is_at_least_one_voxel(self) -> SuperResolutionConfig:
        if self.thickness < 1.0:
            raise ValueError(f"recon.sr.gap {self.gap} at factor {self.factor} leaves slices {self.thickness:g} thin "
                             f"voxels thick; a slice needs at least one: use a gap of at most {self.factor - 1}")
        return self


class ReconConfig(Section):
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
    # super-resolution
    sr: SuperResolutionConfig = Field(default=SuperResolutionConfig(), description="problem: sr: the thick-slice "
                                      "simulation (factor, through-plane axis, slice profile, gap).")
    translation: TranslationConfig | None = Field(default=None, description="problem: translation: the target "
                                                  "contrast and the inputs (translation)")
    phantoms: PhantomConfig | None = Field(
        default=None, description="Generate random-ellipse phantoms into data.root and list them in data.manifest.")
    real_images: list[str] = Field(
        default_factory=list, description="Extra evaluation on real images (metrics prefixed real/): files or DICOM "
        "series folders, relative to data.root, or 'pydicom:<test file>' for images that ship with pydicom.")

    def resolved_center_fraction(self) -> float:
        return self.center_fraction if self.center_fraction is not None else 0.32 / self.acceleration


    @model_validator(mode="after")
    def _centre_fits(self) -> ReconConfig:
        if self.problem == ReconProblem.MRI and self.resolved_center_fraction() * self.acceleration > 1:
            raise ValueError(f"recon.center_fraction {self.resolved_center_fraction()} at acceleration "
                             f"{self.acceleration}: the centre alone exceeds the line budget; lower one of them")
        return self

    @model_validator(mode="after")
    def _slices_cross_the_thick_axis(self) -> ReconConfig:
        if self.problem == ReconProblem.SR and self.sr.axis == self.slice_axis:
            others = [a for a in (0, 1, 2) if a != self.sr.axis]
            raise ValueError(f"recon.slice_axis {self.slice_axis} is the through-plane axis recon.sr.axis: a 2D "
                             f"network must see slices that cross the thick axis; set recon.slice_axis to one of "
                             f"{others}")
        return self


class ReconstructionDataConfig(DataConfig):
    """The images are their own targets: no label map, one channel."""

    @model_validator(mode="after")
    def _images_only(self) -> ReconstructionDataConfig:
        if self.labels is not None:
            raise ValueError("data.labels does not apply to task: reconstruction (the images are their own "
                             "targets); remove it")
        return self


class ReconstructionPreprocessConfig(PreprocessConfig):
    """Orientation and spacing only: every volume is scaled to [0, 1] (min-max) by the task itself."""

    intensity: IntensityConfig = IntensityConfig(mode=IntensityMode.NONE)

    @model_validator(mode="after")
    def _no_intensity_or_crop(self) -> ReconstructionPreprocessConfig:
        if self.intensity.mode != IntensityMode.NONE:
            raise ValueError(f"preprocess.intensity.mode {self.intensity.mode}: reconstruction scales every volume "
                             "to [0, 1] itself; set preprocess.intensity.mode: none (or leave preprocess.intensity out)")
        if self.crop_foreground:
            raise ValueError("preprocess.crop_foreground does not apply to task: reconstruction (whole slices are "
                             "reconstructed); remove it")
        return self


class ReconstructionModelConfig(UNetModelConfig):
    spatial_dims: Literal[2, 3] = 2
    cascades: int = Field(default=3, ge=1, description="model.name: cascade: unrolled (U-Net, data consistency) "
                          "stages.")

    @field_validator("name")
    @classmethod
    def _known_network(cls, name: str) -> str:
        if name not in RECON_MODELS:
            raise ValueError(f"model.name {name!r} is not a reconstruction network; use one of {RECON_MODELS}")
        return name

    @field_validator("spatial_dims")
    @classmethod
    def _slices(cls, dims: int) -> int:
        if dims != 2:
            raise ValueError("reconstruction networks are 2D (slice by slice): set model.spatial_dims: 2")
        return dims


class ReconstructionLossConfig(LossConfig):
    name: ReconstructionLoss = ReconstructionLoss.L1_SSIM
    huber_delta: float = Field(default=0.05, gt=0.0, description="Where huber turns from L2 to L1 (images are "
                               "scaled to [0, 1]).")
    ssim_weight: float = Field(default=0.84, ge=0.0, le=1.0, description="l1_ssim: weight of the SSIM term.")


class ReconstructionValidationConfig(ValidationConfig):
    overlays: int = Field(default=3, ge=0, description="Cases drawn as (reference, input, output) figures.")


class ReconstructionConfig(RunConfig):
    """``task: reconstruction``: images from simulated undersampled, sparse-view or noisy measurements."""

    task: Literal["reconstruction"] = "reconstruction"
    data: ReconstructionDataConfig = Field(examples=[{"manifest": "data_manifests/cases.csv"}])
    preprocess: ReconstructionPreprocessConfig = ReconstructionPreprocessConfig()
    recon: ReconConfig = Field(default=ReconConfig(), description="The simulated acquisition.")
    model: ReconstructionModelConfig = ReconstructionModelConfig()
    loss: ReconstructionLossConfig = ReconstructionLossConfig()
    validation: ReconstructionValidationConfig = ReconstructionValidationConfig()

    @model_validator(mode="after")
    def _channels_fit_the_problem(self) -> ReconstructionConfig:
        if self.recon.problem == ReconProblem.TRANSLATION:  # translation: several contrasts, one the target
            check_translation_channels(self.recon.translation, self.data.channels)
        elif len(self.data.channels) != 1:
            raise ValueError(f"data.channels has {len(self.data.channels)} names, but reconstruction takes "
                             "single-channel images: set data.channels: [image]")
        return self

    @model_validator(mode="after")
    def _network_fits_the_problem(self) -> ReconstructionConfig:
        name, recon = self.model.name, self.recon
        if name != "unet" and recon.problem != ReconProblem.MRI:
            raise ValueError(f"model.name {name} puts measured k-space back, so it needs recon.problem: mri "
                             f"(got {recon.problem}); use unet (FBPConvNet / residual denoiser)")
        if name != "unet" and recon.input != "complex":
            raise ValueError(f"model.name {name}: data consistency works on the complex image; set recon.input: "
                             "complex")
        return self
