"""2.5D super-resolution: each slice goes in with its neighbours as channels, in training as in
evaluation and predict, and the network restores the middle one."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import PreprocessConfig, UNetModelConfig
from medseg.tasks.reconstruction.config import ReconConfig, ReconProblem, SliceProfile, SuperResolutionConfig
from medseg.tasks.reconstruction.neighbours import NeighboursAsChannelsd, neighbour_channels
from medseg.tasks.reconstruction.networks import ImageRestorer
from medseg.tasks.reconstruction.operators import Acquisition
from medseg.tasks.reconstruction.super_resolution import restore_slices
from medseg.tasks.reconstruction.transforms import reconstruction_training_transforms
from tests.conftest import oblique_affine


def _sr(context: int) -> ReconConfig:
    return ReconConfig(problem=ReconProblem.SR, image_size=(12, 10), slice_axis=0, slices_per_volume=5,
                       sr=SuperResolutionConfig(factor=3, axis=2, profile=SliceProfile.GAUSSIAN, context=context))


def test_each_slice_gets_its_neighbours_with_the_edges_replicated() -> None:
    slices = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 1, 3, 2)  # slice i holds i
    stacked = neighbour_channels(slices, 2)
    assert stacked.shape == (4, 5, 3, 2)
    expected = [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    np.testing.assert_array_equal(stacked[:, :, 0, 0].numpy(), expected)
    assert neighbour_channels(slices, 0) is slices  # 2D: the slices themselves
    with pytest.raises(ValueError, match=r"one-channel slices \(S, 1, H, W\); got shape \(4, 2, 3, 2\)"):
        neighbour_channels(torch.zeros(4, 2, 3, 2), 1)


def test_a_training_crop_of_the_wrong_depth_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"thick: a 2.5D training crop is \(1, H, W, 3\) at recon.sr.context 1"):
        NeighboursAsChannelsd(1, inputs="thick", targets="image")({"thick": torch.zeros(1, 4, 4, 1),
                                                                   "image": torch.zeros(1, 4, 4, 3)})


def test_a_training_sample_pairs_a_slice_with_its_own_thick_neighbours(tmp_path: Path) -> None:
    """On an odd, oblique volume: every target is one sagittal slice of the (scaled) volume, and the
    input's channels are the interpolated thick slices of that slice and its neighbours."""
    rng = np.random.default_rng(3)
    volume = rng.random((5, 7, 10)).astype(np.float32)  # 5 sagittal slices of 7 x 10 (A, S)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(volume, oblique_affine((1.0, 0.9, 1.2), (4.0, -3.0, 8.0), angle_deg=0.0)), path)
    recon = _sr(1)
    acquisition = Acquisition(recon)
    chain = reconstruction_training_transforms(PreprocessConfig(orientation="RAS"), recon, [], acquisition)
    chain.set_random_state(seed=0)
    samples = chain({"image": str(path)})
    scaled = torch.from_numpy((volume - volume.min()) / (volume.max() - volume.min()))
    slices = scaled[:, None]  # (X, 1, A, S): sagittal slices, S the thick axis (dim 3)
    thick = acquisition.thick_input(slices)
    seen = set()
    for sample in samples:
        assert sample["image"].shape == (3, 12, 10) and sample["label"].shape == (1, 12, 10)
        target = sample["label"][0, 2:9, :]  # A 7 -> 12: padded 2 before, 3 after (centred); S is 10 already
        index = next(i for i in range(5) if torch.allclose(target, slices[i, 0]))
        seen.add(index)
        for channel, neighbour in enumerate((max(index - 1, 0), index, min(index + 1, 4))):
            torch.testing.assert_close(sample["image"][channel, 2:9, :], thick[neighbour, 0], atol=1e-5, rtol=0)
        assert torch.all(sample["image"][:, :2] == 0) and torch.all(sample["label"][:, 9:] == 0)
    assert len(seen) > 1


def test_an_untrained_2_5d_network_is_the_middle_slice_and_the_baseline_is_its_interpolation() -> None:
    net = ImageRestorer(UNetModelConfig(name="unet", spatial_dims=2, channels=(4, 8), strides=(2,)), 5)
    x = torch.rand(3, 5, 9, 7)
    torch.testing.assert_close(net(x), x[:, 2:3])  # zero-initialised head: the identity on the middle slice
    acquisition = Acquisition(_sr(2))
    slices = torch.rand(6, 1, 9, 12)
    inputs = acquisition.degrade(slices, seed=0)
    assert inputs.shape == (6, 5, 9, 12) and acquisition.in_channels == 5
    torch.testing.assert_close(acquisition.baseline(inputs), acquisition.thick_input(slices))


def test_predict_restores_every_slice_of_a_volume_with_its_neighbours() -> None:
    """``restore_slices`` (``medseg predict --measured``) over a volume larger than the training size:
    an identity-initialised 2.5D network gives the volume back, slice for slice."""
    net = ImageRestorer(UNetModelConfig(name="unet", spatial_dims=2, channels=(4, 8), strides=(2,)), 3)
    volume = torch.rand(1, 13, 11, 6)  # (1, H, W, S): 6 slices of 13 x 11, larger than the 8 x 8 window
    out = restore_slices(net, volume, (8, 8), torch.device("cpu"), None, context=1)
    assert out.shape == (6, 1, 13, 11)
    torch.testing.assert_close(out[:, 0].permute(1, 2, 0), volume[0], atol=1e-5, rtol=1e-5)


def test_the_exported_example_of_a_2_5d_model_has_its_neighbour_channels() -> None:
    """The ONNX export (and the fast backends) feed the network an example from the contract: a
    2.5D model takes 2 context + 1 channels, not the manifest's one."""
    from medseg.tasks.reconstruction import TASK

    recon = _sr(2).model_dump(mode="json")
    example, dynamic = TASK.export_example({"recon": recon, "input_channels": ["image"]})
    assert example.shape == (2, 5, 12, 10) and dynamic
    net = ImageRestorer(UNetModelConfig(name="unet", spatial_dims=2, channels=(4, 8), strides=(2,)), 5)
    assert net(example).shape == (2, 1, 12, 10)
    plain, _ = TASK.export_example({"recon": _sr(0).model_dump(mode="json"), "input_channels": ["image"]})
    assert plain.shape == (2, 1, 12, 10)
