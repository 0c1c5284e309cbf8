"""Every classification network runs forward/backward in 2D and 3D, with every activation."""

from __future__ import annotations

import pytest
import torch

import medseg
from medseg.errors import ModelError
from medseg.tasks.classification.config import ClassificationModelConfig
from medseg.tasks.classification.networks import create_classifier, head_prefix

SIZES = {2: (29, 20), 3: (16, 13, 18)}  # odd, unequal sizes on purpose


@pytest.mark.parametrize("name", medseg.list_models("classification"))
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward(name: str, dims: int) -> None:
    torch.manual_seed(0)
    cfg = ClassificationModelConfig(name=name, spatial_dims=dims, channels=(6, 12), norm="batch", widen_factor=0.25,
                                    dropout=0.1)
    model = create_classifier(cfg, 2, 3, SIZES[dims])
    x = torch.randn(2, 2, *SIZES[dims])
    y = model(x)
    assert y.shape == (2, 3)
    torch.nn.functional.cross_entropy(y, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("activation", ["relu", "leakyrelu", "prelu", "elu", "swish"])
def test_activation_is_a_config_choice(activation: str) -> None:
    cfg = ClassificationModelConfig(name="lenet", spatial_dims=2, channels=(4, 8), activation=activation)
    model = create_classifier(cfg, 1, 2, (28, 28))
    kinds = {type(m).__name__.lower() for m in model.modules()}
    assert activation in kinds
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 2)


def test_resnet_stems_change_the_first_layer_not_the_output() -> None:
    seen = {}
    for stem in ("small", "strided", "imagenet"):
        cfg = ClassificationModelConfig(name="resnet18", spatial_dims=2, stem=stem, widen_factor=0.25, norm="batch")
        net = create_classifier(cfg, 1, 2, (64, 64))
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 2)
        seen[stem] = (net.conv1.kernel_size, net.conv1.stride, net.no_max_pool)
    assert seen == {"small": ((3, 3), (1, 1), True), "strided": ((3, 3), (2, 2), True),
                    "imagenet": ((7, 7), (2, 2), False)}


def test_mlp_hidden_layers_follow_channels() -> None:
    cfg = ClassificationModelConfig(name="mlp", spatial_dims=2, channels=(32, 16))
    model = create_classifier(cfg, 1, 2, (10, 12))
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(120, 32), (32, 16), (16, 2)]


def test_unknown_name_suggests_a_classifier() -> None:
    with pytest.raises(ModelError, match="did you mean 'resnet18'"):
        create_classifier(ClassificationModelConfig(name="resnet19", spatial_dims=2), 1, 2, (28, 28))


def test_lenet_too_small_an_input_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="too small"):
        cfg = ClassificationModelConfig(name="lenet", spatial_dims=2, channels=(4, 8, 16, 32))
        create_classifier(cfg, 1, 2, (8, 8))


def test_head_is_the_last_linear_layer() -> None:
    resnet = ClassificationModelConfig(name="resnet18", spatial_dims=2, widen_factor=0.25, dropout=0.2, norm="instance")
    assert head_prefix(create_classifier(resnet, 1, 2, (28, 28))) == "fc.1"
    densenet = ClassificationModelConfig(name="densenet121", spatial_dims=2, norm="instance")
    dense = create_classifier(densenet, 1, 2, (28, 28))
    assert head_prefix(dense) == "class_layers.out"
