"""Classification's MONAI chain: the shared preprocessing, a resize to the network input, augmentation."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose, EnsureTyped, Resized

from medseg.config import AugmentConfig
from medseg.data.transforms import IMAGE, augmentation, preprocessing
from medseg.tasks.classification.config import ClassificationPreprocessConfig


def classification_transforms(pre: ClassificationPreprocessConfig, augment: Sequence[AugmentConfig] = (),
                              spatial_dims: int = 2, load: bool = True) -> Compose:
    """Whole-image chain for classification: preprocessing and resizing to the network input
    (cached), then augmentation of the image (training only); the class label passes through."""
    chain = preprocessing(pre, keys=(IMAGE,), load=load)
    # "area" averages when shrinking, so thin structures are not aliased away
    chain.append(Resized(keys=IMAGE, spatial_size=list(pre.resize), mode="area"))
    chain.extend(augmentation(augment, spatial_dims, keys=(IMAGE,)))
    chain.append(EnsureTyped(keys=IMAGE, track_meta=False))
    return Compose(chain)
