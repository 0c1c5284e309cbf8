"""Transform chains of image-to-image translation (``recon.problem: translation``).

Cached prefix: the reconstruction prefix (load every contrast as a channel -> orientation ->
(spacing) -> slice axis last), each contrast scaled to [0, 1] on its own, then split into the
network's input contrasts (``image``) and the target contrast (``label``). Training adds padding
to ``recon.image_size``, random slices and the configured augmentation, which moves the inputs
and the target together (interpolated as images: the target is kept under its own key until then,
so nothing treats it as a label map).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    SpatialPadd,
    SqueezeDimd,
)

from medseg.config import AugmentConfig, PreprocessConfig
from medseg.tasks.reconstruction.config import ReconConfig
from medseg.tasks.reconstruction.transforms import IMAGE, TARGET, AddSliceAxisd, reconstruction_prefix

#: where the target contrast waits while the augmentation runs (not ``label``: that is a label map to it)
CONTRAST = "target_contrast"


class SplitContrastsd(MapTransform):
    """``image`` (C, ...) becomes the input contrasts ``image`` (len(inputs), ...) and ``output_key``
    the target contrast (1, ...), channels chosen by index (metadata kept)."""

    def __init__(self, inputs: Sequence[int], target: int, output_key: str = TARGET):
        super().__init__(IMAGE)
        self.inputs, self.target, self.output_key = list(inputs), target, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volume = d[IMAGE]
        d[self.output_key] = volume[self.target:self.target + 1]
        d[IMAGE] = volume[self.inputs]
        return d


def channel_indices(recon: ReconConfig, channels: Sequence[str]) -> tuple[list[int], int]:
    """The positions of the input contrasts and of the target among ``data.channels``."""
    if recon.translation is None:  # the config validates this; a hand-made ReconConfig may not
        raise ValueError("recon.translation is not set: name the target contrast (recon.translation.target)")
    names = list(channels)
    inputs = recon.translation.input_channels(names)
    return [names.index(c) for c in inputs], names.index(recon.translation.target)


def translation_prefix(pre: PreprocessConfig, recon: ReconConfig, channels: Sequence[str], load: bool = True,
                       split: bool = True, target_key: str = TARGET) -> list[Callable]:
    """Every contrast in [0, 1] (each on its own), slice axis last, split into inputs and target."""
    chain = reconstruction_prefix(pre, recon, load=load, scale=False)
    chain.append(ScaleIntensityd(keys=IMAGE, minv=0.0, maxv=1.0, channel_wise=True))
    chain.append(AddSliceAxisd(keys=IMAGE))
    if split:
        inputs, target = channel_indices(recon, channels)
        chain.append(SplitContrastsd(inputs, target, target_key))
    return chain


def translation_training_transforms(pre: PreprocessConfig, recon: ReconConfig, channels: Sequence[str],
                                    augment: Sequence[AugmentConfig]) -> Compose:
    """Cached: prefix and padding. Random: slices, augmentation of inputs and target together."""
    from medseg.data.transforms import augmentation

    height, width = recon.image_size
    keys = [IMAGE, CONTRAST]
    chain = translation_prefix(pre, recon, channels, target_key=CONTRAST)
    chain.append(SpatialPadd(keys=keys, spatial_size=[height, width, -1], mode="constant"))
    chain.append(RandSpatialCropSamplesd(keys=keys, roi_size=[height, width, 1], num_samples=recon.slices_per_volume,
                                         random_size=False))
    chain.append(SqueezeDimd(keys=keys, dim=-1))
    chain.extend(augmentation(augment, 2, keys=keys))
    chain.append(CopyItemsd(keys=CONTRAST, names=TARGET))
    chain.append(DeleteItemsd(keys=CONTRAST))
    chain.append(EnsureTyped(keys=[IMAGE, TARGET], dtype=np.float32, track_meta=False))
    return Compose(chain)


def translation_eval_transforms(pre: PreprocessConfig, recon: ReconConfig, channels: Sequence[str]) -> Compose:
    """Whole volumes for validation and evaluation: inputs ``image`` (C, H, W, S), target ``label`` (1, H, W, S)."""
    return Compose(translation_prefix(pre, recon, channels))


__all__ = ["SplitContrastsd", "channel_indices", "translation_eval_transforms", "translation_prefix",
           "translation_training_transforms"]
