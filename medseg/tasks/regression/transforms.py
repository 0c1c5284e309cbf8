"""Regression's MONAI chains: the shared preprocessing, the fit to the network input (resize, or
pad/crop where the voxel size must be kept), augmentation of the image; the targets pass through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.transforms import Compose, EnsureTyped, MapTransform, Resized, ResizeWithPadOrCropd

from medseg.config import AugmentConfig
from medseg.data.transforms import IMAGE, LABEL, augmentation, preprocessing, preprocessing_from_contract
from medseg.tasks.regression.config import InputFit, RegressionPreprocessConfig


def fit_to_size(size: Sequence[int], fit: str) -> MapTransform:
    """The image brought to the network input ``size``: resized ("area" averages when shrinking, so
    thin structures are not aliased away), or centre padded / cropped at its own voxel size."""
    if InputFit(fit) == InputFit.PAD_OR_CROP:
        return ResizeWithPadOrCropd(keys=IMAGE, spatial_size=list(size), mode="constant")
    return Resized(keys=IMAGE, spatial_size=list(size), mode="area")


def regression_transforms(pre: RegressionPreprocessConfig, augment: Sequence[AugmentConfig] = (),
                          spatial_dims: int = 2, load: bool = True) -> Compose:
    """Whole-image chain: preprocessing and the fit to the input (cached), then augmentation of the
    image (training only); the record's normalised targets become a float32 tensor."""
    chain: list[Any] = preprocessing(pre, keys=(IMAGE,), load=load)
    chain.append(fit_to_size(pre.size, pre.fit))
    chain.extend(augmentation(augment, spatial_dims, keys=(IMAGE,)))
    chain.append(EnsureTyped(keys=IMAGE, track_meta=False))
    chain.append(EnsureTyped(keys=LABEL, dtype=np.float32, track_meta=False, allow_missing_keys=True))
    return Compose(chain)


def regression_preprocessing(contract: dict[str, Any], load: bool = True, allow_constant: bool = False) -> Compose:
    """Prediction's chain: the contract's deterministic preprocessing, then its fit to the input."""
    chain = list(preprocessing_from_contract(contract, load=load, allow_constant=allow_constant).transforms)
    chain.append(fit_to_size(contract["size"], contract.get("fit", InputFit.RESIZE.value)))
    return Compose(chain)
