"""Transform chains of the reconstruction task.

Cached prefix: load -> orientation -> (spacing) -> min-max scaling to [0, 1] -> slice axis last ->
(training) pad slices to ``recon.image_size`` -> (CT) filtered back-projection of every slice.
Random rest (training): draw slices (and crop larger ones) -> augment the ground truth ->
simulate the measurement. The result is ``{"image": network input (C, H, W), "label": target (1, H, W)}``,
so the shared training loop treats it like any other task.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    BorderPadd,
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandomizableTransform,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
    Transposed,
)

from medseg.config import AugmentConfig, PreprocessConfig
from medseg.io.preflight import CheckImageValuesd
from medseg.io.readers import make_load_transform
from medseg.tasks.reconstruction.config import ReconConfig, ReconProblem
from medseg.tasks.reconstruction.neighbours import NeighboursAsChannelsd
from medseg.tasks.reconstruction.operators import Acquisition, fbp_volume

IMAGE, TARGET, FBP = "image", "label", "fbp"
#: super-resolution: the thick slices interpolated back onto the thin grid (the network's input)
THICK = "thick"


def slice_axis_last(slice_axis: int) -> list[int] | None:
    """Channel-first permutation that moves spatial ``slice_axis`` to the end (None: already there)."""
    if slice_axis == 2:
        return None
    spatial = [a for a in (0, 1, 2) if a != slice_axis] + [slice_axis]
    return [0, *[a + 1 for a in spatial]]


class AddSliceAxisd(MapTransform):
    """A 2D image (C, H, W) becomes a volume of one slice (C, H, W, 1); volumes pass unchanged."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].ndim == 3:
                d[key] = d[key].unsqueeze(-1)
        return d


class SparseViewFBPd(MapTransform):
    """Adds ``fbp``: the sparse-view filtered back-projection of every slice of ``image`` (deterministic)."""

    def __init__(self, views: int, keys: KeysCollection = IMAGE, output_key: str = FBP):
        super().__init__(keys)
        self.views = views
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = np.asarray(d[key][0].detach().cpu() if hasattr(d[key], "detach") else d[key][0])
            d[self.output_key] = torch.from_numpy(fbp_volume(volume, self.views, slice_axis=2))[None]
        return d


class ThickSliceInputd(MapTransform):
    """Adds ``thick``: the volume's thick slices (through-plane, from the slice profile) linearly
    interpolated back onto its thin grid (deterministic: computed once, before any padding)."""

    def __init__(self, acquisition: Acquisition, keys: KeysCollection = IMAGE, output_key: str = THICK):
        super().__init__(keys)
        self.acquisition = acquisition
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key]).float()  # (1, H, W, S): a slice batch's dims 2, 3 are dims 1, 2 here
            d[self.output_key] = self.acquisition.thick_input(volume[None])[0]
        return d


class SimulateAcquisitiond(RandomizableTransform, MapTransform):
    """Training sample from a ground-truth slice: ``image`` becomes the simulated measurement's
    network input and ``label`` the target; the mask or the noise is drawn from this transform's
    random state (the sample stream seeds it per position)."""

    def __init__(self, acquisition: Acquisition):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, IMAGE)
        self.acquisition = acquisition

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        target = torch.as_tensor(d[IMAGE]).float()
        fbp = d.pop(FBP, d.pop(THICK, None))
        seed = int(self.R.randint(0, 2**31 - 1))
        inputs = self.acquisition.degrade(target[None], seed, fbp=None if fbp is None else torch.as_tensor(fbp)[None])
        d[IMAGE] = inputs[0]
        d[TARGET] = target
        return d


def reconstruction_prefix(pre: PreprocessConfig, recon: ReconConfig, load: bool = True,
                          scale: bool = True) -> list[Callable]:
    """Deterministic part shared by training, evaluation and inference: a channel-first volume in
    [0, 1] with the slice axis last (not padded); a 2D image is a volume of one slice.

    Inference leaves ``scale`` off: it scales itself, keeping the range to write the output back in
    the input's units, and handles 2D images itself, so that every step left is invertible."""
    chain: list[Callable] = []
    if load:
        chain.append(make_load_transform([IMAGE]))
    chain.append(EnsureTyped(keys=IMAGE, dtype=np.float32, track_meta=True))
    chain.append(CheckImageValuesd(keys=IMAGE, allow_constant=pre.allow_constant))  # raw values: NaN, blank
    if pre.orientation:
        chain.append(Orientationd(keys=IMAGE, axcodes=pre.orientation))
    if pre.spacing is not None:
        chain.append(Spacingd(keys=IMAGE, pixdim=pre.spacing, mode="bilinear", dtype=np.float32))
    # min-max to [0, 1]: magnitude MR keeps its zero, CT's HU become attenuation above air
    if scale:
        chain.append(ScaleIntensityd(keys=IMAGE, minv=0.0, maxv=1.0))
        chain.append(AddSliceAxisd(keys=IMAGE))
    order = slice_axis_last(recon.slice_axis)
    if order is not None:
        chain.append(Transposed(keys=IMAGE, indices=order))
    return chain


def reconstruction_training_transforms(pre: PreprocessConfig, recon: ReconConfig, augment: Sequence[AugmentConfig],
                                       acquisition: Acquisition) -> Compose:
    """Cached: prefix, (SR) the thick slices, padding to ``image_size`` and (CT) the FBP. Random: slices, augmentation, measurement."""
    from medseg.data.transforms import augmentation

    height, width = recon.image_size
    chain = reconstruction_prefix(pre, recon)
    keys = [IMAGE]
    if recon.problem == ReconProblem.SR:
        chain.append(ThickSliceInputd(acquisition))
        keys.append(THICK)
    chain.append(SpatialPadd(keys=keys, spatial_size=[height, width, -1], mode="constant"))
    if recon.problem == ReconProblem.CT:
        chain.append(SparseViewFBPd(recon.views))
        keys.append(FBP)
    context = recon.sr.context if recon.problem == ReconProblem.SR else 0
    if context:  # 2.5D: every slice, the first and last too, is drawn with its neighbours (edges replicated)
        chain.append(BorderPadd(keys=keys, spatial_border=[0, 0, 0, 0, context, context], mode="replicate"))
    chain.append(RandSpatialCropSamplesd(keys=keys, roi_size=[height, width, 2 * context + 1],
                                         num_samples=recon.slices_per_volume, random_size=False))
    chain.append(NeighboursAsChannelsd(context, inputs=THICK, targets=IMAGE) if context
                 else SqueezeDimd(keys=keys, dim=-1))
    if recon.problem == ReconProblem.SR:  # the truth and its thick slices move together
        chain.extend(augmentation(augment, 2, keys=(IMAGE, THICK)))
    elif recon.problem != ReconProblem.CT:  # CT's input is fixed by its FBP: only the MR/denoising truth is augmented
        chain.extend(augmentation(augment, 2, keys=(IMAGE,)))
    chain.append(EnsureTyped(keys=keys, track_meta=False))
    chain.append(SimulateAcquisitiond(acquisition))
    return Compose(chain)


def reconstruction_eval_transforms(pre: PreprocessConfig, recon: ReconConfig) -> Compose:
    """Whole volumes for validation and evaluation: the prefix only (measurements are simulated per volume)."""
    return Compose(reconstruction_prefix(pre, recon))
