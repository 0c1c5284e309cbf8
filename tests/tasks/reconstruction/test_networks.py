"""Reconstruction networks: identity at initialisation, any slice size, data consistency inside."""

from __future__ import annotations

import pytest
import torch

from medseg.tasks.reconstruction.config import ReconConfig, ReconstructionModelConfig
from medseg.tasks.reconstruction.networks import ImageRestorer, MriReconstructor, create_reconstruction_model
from medseg.tasks.reconstruction.operators import Acquisition, fft2c, unpack_mri_input

SMALL = ReconstructionModelConfig(name="unet", spatial_dims=2, channels=(4, 8, 16), num_res_units=1)


@pytest.mark.parametrize("name", ["unet", "unet_dc", "cascade"])
def test_mri_networks_start_as_the_zero_filled_baseline(name: str) -> None:
    torch.manual_seed(0)
    net = create_reconstruction_model(SMALL.model_copy(update={"name": name, "cascades": 2}), ReconConfig())
    acquisition = Acquisition(ReconConfig())
    inputs = acquisition.degrade(torch.rand(2, 1, 37, 22), seed=1)  # odd sizes: padded inside
    out = net.eval()(inputs)
    assert out.shape == (2, 1, 37, 22)
    # a zero-initialised output layer: training starts from the baseline, not from noise
    assert torch.allclose(out, acquisition.baseline(inputs), atol=1e-5)
    assert isinstance(net, MriReconstructor) and len(net.blocks) == (2 if name == "cascade" else 1)


@pytest.mark.parametrize("name", ["unet_dc", "cascade"])
def test_data_consistency_networks_keep_the_measured_lines(name: str) -> None:
    torch.manual_seed(0)
    net = create_reconstruction_model(SMALL.model_copy(update={"name": name, "cascades": 2}), ReconConfig())
    for p in net.parameters():  # a trained network: the U-Net changes the image
        torch.nn.init.normal_(p, std=0.1)
    inputs = Acquisition(ReconConfig()).degrade(torch.rand(3, 1, 24, 32), seed=2)
    zero_filled, mask = unpack_mri_input(inputs)
    image = net.complex_image(inputs)
    lines = mask[0, 0, 0].bool()
    assert not torch.allclose(image, zero_filled, atol=1e-3)
    assert torch.allclose(fft2c(image)[..., lines], fft2c(zero_filled)[..., lines], atol=1e-4)


def test_image_restorer_for_ct_and_denoising_is_residual() -> None:
    net = create_reconstruction_model(SMALL, ReconConfig(problem="ct"))
    assert isinstance(net, ImageRestorer)
    x = torch.rand(2, 1, 41, 29)
    assert torch.allclose(net(x), x, atol=1e-6)
    loss = (net(x) - torch.zeros_like(x)).abs().mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_magnitude_input_network_takes_one_channel() -> None:
    net = create_reconstruction_model(SMALL, ReconConfig(input="magnitude"))
    inputs = Acquisition(ReconConfig()).degrade(torch.rand(1, 1, 16, 16), seed=0)
    assert net(inputs).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="3 channels"):
        net(inputs[:, :2])
