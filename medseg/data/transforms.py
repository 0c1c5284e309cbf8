"""MONAI transform chains built from config: preprocessing, augmentation, patch sampling.

The deterministic prefix (load, orientation, spacing, intensity, crop) is what the caching
datasets store; everything random comes after it, so a cached epoch never re-reads or
re-resamples a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGibbsNoised,
    RandKSpaceSpikeNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from medseg.config import (
    AugmentConfig,
    IntensityConfig,
    IntensityMode,
    PatchConfig,
    PatchSampler,
    PreprocessConfig,
)
from medseg.data.slab_spacing import SlabSpacingd
from medseg.errors import ConfigError
from medseg.io.heap import trim_heap
from medseg.io.preflight import CheckImageValuesd
from medseg.io.readers import make_load_transform

IMAGE = "image"
LABEL = "label"
# Where the cached prefix keeps the voxel indices the patch samplers draw centres from; the
# samplers pop them, so they never reach a batch.
FG_INDICES, BG_INDICES, CLASS_INDICES = f"{LABEL}_fg_indices", f"{LABEL}_bg_indices", f"{LABEL}_cls_indices"


def nonzero(x: Any) -> Any:
    """Foreground for cropping: every voxel that is not exactly zero (nnU-Net's nonzero crop)."""
    return x != 0


#: Voxels per slab of :class:`SlabwiseScaleIntensityRanged` (16 MiB of float32).
SLAB_VOXELS = 1 << 22


class SlabwiseScaleIntensityRanged(ScaleIntensityRanged):
    """MONAI's ``ScaleIntensityRanged``, run a slab of the first spatial axis at a time into one output.

    The whole-volume call holds the input and about three float32 copies of it at once (each of its
    arithmetic steps makes a new volume): 1.2 GB for a 512x512x300 CT. Slab by slab the temporaries
    are one slab's size; the map is voxel-wise, so every value is bitwise the whole-volume call's.
    """

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, torch.Tensor) or image.ndim < 3:
                d[key] = self.scaler(image)
                continue
            source = image.as_tensor() if isinstance(image, MetaTensor) else image
            step = max(1, SLAB_VOXELS // max(1, source[:, :1].numel()))
            first = torch.as_tensor(self.scaler(_float32(source[:, :step])))
            out = torch.empty_like(source, dtype=first.dtype)  # the input's layout (SlabSpacingd's, see there)
            out[:, :step] = first
            for start in range(step, source.shape[1], step):
                out[:, start:start + step] = torch.as_tensor(self.scaler(_float32(source[:, start:start + step])))
            d[key] = (MetaTensor(out, meta=dict(image.meta), applied_operations=list(image.applied_operations))
                      if isinstance(image, MetaTensor) else out)
        return d


def _float32(slab: torch.Tensor) -> torch.Tensor:
    """A slab of a volume kept in its stored type (a CT's int16) as float32, the type the whole
    volume would have been cast to (exactly: every int16 is a float32); float slabs as they are."""
    return slab if slab.is_floating_point() else slab.to(torch.float32)


class NarrowFloatd(MapTransform):
    """A volume read in its stored type, except float64 (nibabel's type for a NIfTI with a scale
    slope), which becomes float32 at once: the one rounding the float32 reader gives it too, and half
    the memory while the rest of the chain runs. Integer volumes stay as they are (half a float32's size
    for int16) until :func:`preprocessing` casts them."""

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], torch.Tensor) and d[key].dtype == torch.float64:
                d[key] = d[key].to(torch.float32)
        return d


#: Where a prediction chain leaves a CT window it deferred (:class:`DeferredWindowd`).
WINDOW = "image_window"


class DeferredWindowd(MapTransform):
    """A CT window (:class:`SlabwiseScaleIntensityRanged`) left for later when the image is still in
    its stored integer type: the window goes into ``data[WINDOW]`` and the image stays int16, half
    of what the windowed float32 volume would hold, until whoever reads it applies the window to the
    part it reads (:func:`window_function`: the bounded sweep, window by window) or to the whole
    (:func:`apply_deferred_window`). The map is voxel-wise, so either way every value is the
    window's own, bitwise. A float image is windowed at once (there is nothing to save)."""

    def __init__(self, window: SlabwiseScaleIntensityRanged):
        super().__init__(window.keys)
        self.window = window

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        if all(isinstance(d[k], torch.Tensor) and d[k].is_floating_point() for k in self.key_iterator(d)):
            return self.window(d)
        d[WINDOW] = self.window
        return d


def apply_deferred_window(data: dict[Any, Any]) -> dict[Any, Any]:
    """``data`` with the window :class:`DeferredWindowd` left in it applied to the whole image (and gone)."""
    window = data.pop(WINDOW, None)
    return data if window is None else dict(window(data))


def window_function(data: dict[Any, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The window :class:`DeferredWindowd` left in ``data``, as a function of any part of the image (its
    voxels cast to float32 and mapped as the whole volume's would be); None when there is none."""
    window = data.get(WINDOW)
    if window is None:
        return None

    def windowed(part: torch.Tensor) -> torch.Tensor:
        out = window.scaler(_float32(part))
        return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)

    return windowed


def intensity_transform(cfg: IntensityConfig, key: str = IMAGE) -> MapTransform | None:
    """The configured intensity normalisation for ``key`` (None for ``mode: none``)."""
    if cfg.mode == IntensityMode.ZSCORE:
        return NormalizeIntensityd(keys=key, nonzero=cfg.nonzero, channel_wise=True)
    if cfg.mode == IntensityMode.CT_WINDOW:
        if cfg.window is None:  # IntensityConfig refuses this; a hand-built one may not have been validated
            raise ConfigError("preprocess.intensity.window is required with mode: ct_window, e.g. [-160, 240]")
        low, high = cfg.window
        return SlabwiseScaleIntensityRanged(keys=key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if cfg.mode == IntensityMode.CLIP_ZSCORE:
        if cfg.clip is None or cfg.mean is None or cfg.std is None:  # refused by IntensityConfig's validator
            raise ConfigError("preprocess.intensity.clip, mean and std are required with mode: clip_zscore")
        # clip then (x - mean) / std is one linear map with clipping: MONAI's ScaleIntensityRange does it
        low, high = cfg.clip
        return SlabwiseScaleIntensityRanged(keys=key, a_min=low, a_max=high, b_min=(low - cfg.mean) / cfg.std,
                                            b_max=(high - cfg.mean) / cfg.std, clip=True)
    if cfg.mode == IntensityMode.PERCENTILE:
        low, high = cfg.percentiles
        return ScaleIntensityRangePercentilesd(keys=key, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True,
                                               channel_wise=True)
    return None


def preprocessing(cfg: PreprocessConfig, keys: Sequence[str] = (IMAGE, LABEL), load: bool = True,
                  min_size: Sequence[int] | None = None, stored_dtype: bool = False,
                  defer_window: bool = False) -> list[Callable]:
    """Deterministic chain: load -> orientation -> spacing -> intensity -> crop -> pad to ``min_size``.

    Args:
        cfg: preprocessing section of the config.
        keys: image key first, then the label key if any.
        load: start with the file loader (False when the data are already MetaTensors).
        min_size: pad every volume to at least this size so fixed-size patches fit.
        stored_dtype: read and reorient the image in the type it is stored in (a CT's int16: half
            the memory of float32) and cast it to float32 after the orientation, or slab by slab in
            the CT window when that comes next; every value is the float32 chain's, bitwise (the
            cast is exact for int16, and orientation only moves voxels). A resampling of the image
            alone is :class:`~medseg.data.slab_spacing.SlabSpacingd` (bitwise ``Spacingd`` for an
            image up to 256 MiB as float32; a larger one slab by slab, the same to float rounding).
        defer_window: with ``stored_dtype``, leave that CT window to the reader of the image
            (:class:`DeferredWindowd`; only where it is the chain's last step).
    """
    keys = list(keys)
    has_label = LABEL in keys
    chain: list[Callable] = []
    if load:
        chain.append(make_load_transform(keys, dtype=None if stored_dtype else np.float32))
    chain.append(EnsureTyped(keys=IMAGE, dtype=None if stored_dtype else np.float32, track_meta=True))
    if stored_dtype:
        chain.append(NarrowFloatd(keys=IMAGE))
    chain.append(CheckImageValuesd(keys=IMAGE, allow_constant=cfg.allow_constant))  # raw values: NaN, blank
    if cfg.orientation:
        chain.append(Orientationd(keys=keys, axcodes=cfg.orientation))
    norm = intensity_transform(cfg.intensity)
    window_casts = isinstance(norm, SlabwiseScaleIntensityRanged) and cfg.spacing is None and not cfg.crop_foreground
    # a large image resampled slab by slab casts each slab's rows itself (no whole float32 copy)
    slab_spacing = stored_dtype and cfg.spacing is not None and not has_label
    if stored_dtype and not window_casts and not slab_spacing:
        chain.append(EnsureTyped(keys=IMAGE, dtype=np.float32, track_meta=True))
    if slab_spacing:
        chain.append(SlabSpacingd(keys=IMAGE, pixdim=cfg.spacing))
    elif cfg.spacing is not None:
        modes = ["bilinear", "nearest"] if has_label else ["bilinear"]
        chain.append(Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes, dtype=np.float32))
    if cfg.crop_foreground:  # on raw intensities: after z-scoring, "> 0" would mean "above the mean"
        chain.append(CropForegroundd(keys=keys, source_key=IMAGE, select_fn=nonzero, allow_smaller=True))
    if norm is not None:
        last = stored_dtype and defer_window and window_casts and not has_label and min_size is None
        chain.append(DeferredWindowd(norm) if last and isinstance(norm, SlabwiseScaleIntensityRanged) else norm)
    if has_label:
        chain.append(EnsureTyped(keys=LABEL, dtype=np.uint8, track_meta=True))
    if min_size is not None:
        chain.append(SpatialPadd(keys=keys, spatial_size=list(min_size), mode="constant"))
    return chain


def sampling_indices(cfg: PatchConfig, num_classes: int) -> list[MapTransform]:
    """The deterministic half of patch sampling: the label's voxel indices per class (or fg/bg).

    Computed once in the cached prefix, not at every draw: MONAI's samplers otherwise scan the
    whole label map for each sample, the largest cost of a cached epoch on big volumes.
    """
    if cfg.sampler == PatchSampler.POS_NEG:
        return [FgBgToIndicesd(keys=LABEL), CompactIndicesd(keys=[FG_INDICES, BG_INDICES])]
    if cfg.sampler == PatchSampler.PER_CLASS:
        return [ClassesToIndicesd(keys=LABEL, num_classes=num_classes), CompactIndicesd(keys=CLASS_INDICES)]
    return []  # uniform sampling needs no indices


class CompactIndicesd(MapTransform):
    """Voxel indices as int32 (MONAI returns int64): the cache holds one index per voxel, so this
    halves what the indices cost in memory next to the volume itself. Volumes of 2^31 voxels or
    more keep int64."""

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = [self._compact(a) for a in d[key]] if isinstance(d[key], (list, tuple)) else self._compact(d[key])
        return d

    @staticmethod
    def _compact(indices: Any) -> Any:
        array = np.asarray(indices)
        return array.astype(np.int32) if array.size == 0 or array.max() < np.iinfo(np.int32).max else array


def patch_sampler(cfg: PatchConfig, num_classes: int, precomputed: bool = False) -> MapTransform:
    """Random patch sampling: pos/neg around the label, per-class ratios, or uniform.

    ``precomputed``: draw centres from the indices :func:`sampling_indices` stored in the item
    (same draws as computing them here, without rescanning the label).
    """
    size = list(cfg.size)
    if cfg.sampler == PatchSampler.POS_NEG:
        return RandCropByPosNegLabeld(
            keys=[IMAGE, LABEL], label_key=LABEL, spatial_size=size, pos=cfg.pos_fraction, neg=1.0 - cfg.pos_fraction,
            num_samples=cfg.samples_per_volume, image_key=None, allow_smaller=False,
            fg_indices_key=FG_INDICES if precomputed else None, bg_indices_key=BG_INDICES if precomputed else None,
        )
    if cfg.sampler == PatchSampler.PER_CLASS:
        return RandCropByLabelClassesd(
            keys=[IMAGE, LABEL], label_key=LABEL, spatial_size=size, num_classes=num_classes,
            ratios=list(cfg.class_ratios) if cfg.class_ratios is not None else None,
            num_samples=cfg.samples_per_volume, allow_smaller=False, indices_key=CLASS_INDICES if precomputed else None,
        )
    return RandSpatialCropSamplesd(keys=[IMAGE, LABEL], roi_size=size, num_samples=cfg.samples_per_volume,
                                   random_size=False)


#: What each augmentation of the config becomes, keyed by its ``name``: (config, spatial dims,
#: keys the spatial ones move, interpolation modes for those keys) -> MONAI random transforms.
#: Spatial ones move every key (a label map with nearest-neighbour interpolation); intensity ones
#: touch the image only.
AugmentBuilder = Callable[[Any, int, list[str], list[str]], list[MapTransform]]
AUGMENTATIONS: dict[str, AugmentBuilder] = {
    "flip": lambda a, dims, keys, modes: [RandFlipd(keys=keys, prob=a.prob, spatial_axis=axis)
                                          for axis in (a.axes if a.axes is not None else range(dims))],
    "rot90": lambda a, dims, keys, modes: [RandRotate90d(keys=keys, prob=a.prob, max_k=a.max_k, spatial_axes=a.axes)],
    "affine": lambda a, dims, keys, modes: [RandAffined(
        keys=keys, prob=a.prob, rotate_range=[float(np.deg2rad(a.rotate_deg))] * (3 if dims == 3 else 1),
        scale_range=[a.scale] * dims, translate_range=[a.translate] * dims, mode=modes, padding_mode="zeros")],
    "elastic": lambda a, dims, keys, modes: [
        Rand3DElasticd(keys=keys, prob=a.prob, sigma_range=a.sigma, magnitude_range=a.magnitude, mode=modes,
                       padding_mode="zeros") if dims == 3 else
        Rand2DElasticd(keys=keys, prob=a.prob, spacing=a.sigma, magnitude_range=a.magnitude, mode=modes,
                       padding_mode="zeros")],
    "noise": lambda a, dims, keys, modes: [RandGaussianNoised(keys=IMAGE, prob=a.prob, std=a.std)],
    "gamma": lambda a, dims, keys, modes: [RandAdjustContrastd(keys=IMAGE, prob=a.prob, gamma=a.gamma)],
    "contrast": lambda a, dims, keys, modes: [RandScaleIntensityd(keys=IMAGE, prob=a.prob, factors=a.scale),
                                              RandShiftIntensityd(keys=IMAGE, prob=a.prob, offsets=a.shift)],
    "bias_field": lambda a, dims, keys, modes: [RandBiasFieldd(keys=IMAGE, prob=a.prob, coeff_range=a.coeff_range)],
    "kspace_spike": lambda a, dims, keys, modes: [RandKSpaceSpikeNoised(keys=IMAGE, prob=a.prob,
                                                                        intensity_range=a.intensity_range)],
    "gibbs": lambda a, dims, keys, modes: [RandGibbsNoised(keys=IMAGE, prob=a.prob, alpha=a.alpha)],
}


def augmentation(items: Sequence[AugmentConfig], spatial_dims: int,
                 keys: Sequence[str] = (IMAGE, LABEL)) -> list[MapTransform]:
    """MONAI random transforms for each configured augmentation, in order (:data:`AUGMENTATIONS`)."""
    keys = list(keys)
    modes = ["bilinear", "nearest"] if LABEL in keys else ["bilinear"]
    return [transform for aug in items for transform in AUGMENTATIONS[aug.name](aug, spatial_dims, keys, modes)]


def training_transforms(pre: PreprocessConfig, patch: PatchConfig, augment: Sequence[AugmentConfig],
                        spatial_dims: int, num_classes: int) -> Compose:
    """Deterministic preprocessing (cached), then patch sampling and augmentation (random).

    The cached prefix ends with the sampler's voxel indices and plain tensors: training patches
    need no metadata, and MONAI's random transforms skip their bookkeeping on plain tensors.
    """
    chain = preprocessing(pre, min_size=patch.size)
    indices = sampling_indices(patch, num_classes)
    chain.extend(indices)
    chain.append(EnsureTyped(keys=[IMAGE, LABEL], track_meta=False))
    chain.append(patch_sampler(patch, num_classes, precomputed=bool(indices)))
    chain.extend(augmentation(augment, spatial_dims))
    chain.append(EnsureTyped(keys=[IMAGE, LABEL], track_meta=False))
    return Compose(chain)


def validation_transforms(pre: PreprocessConfig, with_label: bool = True) -> Compose:
    """Deterministic preprocessing of whole volumes for sliding-window validation and inference."""
    return Compose(preprocessing(pre, keys=(IMAGE, LABEL) if with_label else (IMAGE,)))


def preprocessing_from_contract(contract: dict[str, Any], load: bool = True, allow_constant: bool = False,
                                defer_window: bool = False) -> Compose:
    """The deterministic image chain a model was trained behind, rebuilt from its contract.

    Args:
        contract: the model's I/O contract (orientation, spacing, intensity, crop).
        load: start with the file loader; False for images already in memory (channel-first
            ``MetaTensor`` with their affine).
        allow_constant: accept constant images even if the model was trained without them.
        defer_window: leave a CT window for the reader of the image (:class:`DeferredWindowd`).
    """
    cfg = PreprocessConfig(
        orientation=contract["orientation"],
        spacing=tuple(contract["spacing"]) if contract.get("spacing") else None,
        intensity=IntensityConfig(**contract["intensity"]),
        crop_foreground=contract.get("crop_foreground", False),
        allow_constant=bool(contract.get("allow_constant", False)) or allow_constant,
    )
    chain = preprocessing(cfg, keys=(IMAGE,), load=load, stored_dtype=True, defer_window=defer_window)
    if load:  # a scan at a time: what reading it freed goes back before the next transform allocates
        chain.insert(1, _heap_trimmed)
    return Compose(chain)


def _heap_trimmed(data: Any) -> Any:
    """``data`` unchanged, once glibc has handed back the pages reading freed (:func:`~medseg.io.heap.trim_heap`:
    a compressed NIfTI is decompressed in many small pieces, about the raw volume's size)."""
    trim_heap()
    return data
