"""Every segmentation network builds and runs forward/backward in 2D and 3D; impossible
architectures for the patch size are explained."""

from __future__ import annotations

import pytest
import torch

import medseg
from medseg.config import UNetModelConfig
from medseg.errors import ModelError
from medseg.tasks.segmentation.networks import create_segmentation_network


@pytest.mark.parametrize("name", medseg.list_models("segmentation"))
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward(name: str, dims: int) -> None:
    cfg = UNetModelConfig(name=name, spatial_dims=dims, channels=(4, 8, 16), num_res_units=1)
    patch = (24, 40) if dims == 2 else (16, 24, 8)
    model = create_segmentation_network(cfg, 2, 3, patch)
    x = torch.randn(2, 2, *patch)
    y = model(x)
    assert y.shape == (2, 3, *patch)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_u_nets_are_registered() -> None:
    assert {"unet", "dynunet"} <= set(medseg.list_models("segmentation"))


def test_unknown_model_suggests_a_registered_name() -> None:
    with pytest.raises(ModelError, match="did you mean 'unet'"):
        create_segmentation_network(UNetModelConfig(name="unett"), 1, 2, (16, 16, 16))


def test_patch_not_divisible_by_the_strides_is_explained() -> None:
    with pytest.raises(ModelError, match=r"must be divisible by 8 .*e\.g\. use \[24, 40, 16\]"):
        create_segmentation_network(UNetModelConfig(name="unet", channels=(4, 8, 16, 32)), 1, 2, (25, 41, 15))


def test_strides_must_match_levels() -> None:
    with pytest.raises(ModelError, match="one stride per downsampling step"):
        create_segmentation_network(UNetModelConfig(name="unet", channels=(4, 8, 16), strides=(2,)), 1, 2,
                                    (16, 16, 16))
