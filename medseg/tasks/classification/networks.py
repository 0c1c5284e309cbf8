"""Registry of classification networks, 2D and 3D: the course's line from the perceptron's heirs
(MLP, LeNet) to MONAI's ResNet and DenseNet.

Every factory takes ``(cfg, in_channels, num_outputs, input_size)`` and returns logits of shape
``(B, num_outputs)``. Activation, dropout, norm, width and stem are config choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

from monai.networks.layers.factories import Act, Conv, Pool
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from medseg.engine.models import create_model, register_model
from medseg.errors import ModelError
from medseg.tasks.classification.config import ClassificationModelConfig, Stem

TASK = "classification"
ClassifierFactory = Callable[[ClassificationModelConfig, int, int, Sequence[int]], nn.Module]


def register_classifier(name: str) -> Callable[[ClassifierFactory], ClassifierFactory]:
    return register_model(TASK, name)


def activation(cfg: ClassificationModelConfig) -> nn.Module:
    """A fresh activation layer of the configured kind (MONAI's ``Act`` factory)."""
    name = str(cfg.activation)
    return Act[name](inplace=True) if name in ("relu", "leakyrelu", "elu") else Act[name]()


def _act_arg(cfg: ClassificationModelConfig) -> str | tuple:
    name = str(cfg.activation)
    return (name, {"inplace": True}) if name in ("relu", "leakyrelu", "elu") else name


def _norm_arg(cfg: ClassificationModelConfig) -> str | tuple:
    # MONAI's ResNet initialises norm weights, which a non-affine instance norm does not have
    return ("instance", {"affine": True}) if cfg.norm == "instance" else cfg.norm


def _head(features: int, outputs: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, outputs)) if dropout else nn.Linear(features, outputs)


@register_classifier("mlp")
def _mlp(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    """Flattened voxels -> hidden layers (``model.channels``) -> logits: the background material's start."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * math.prod(size)
    for hidden in cfg.channels:
        layers += [nn.Linear(width, hidden), activation(cfg)]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 style: (conv 5, act, max pool 2) per stage, then 120 and 84 hidden units."""

    def __init__(self, cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]):
        super().__init__()
        dims = cfg.spatial_dims
        stages: list[nn.Module] = []
        channels, spatial = in_channels, list(size)
        for features in cfg.channels:
            stages += [Conv[Conv.CONV, dims](channels, features, kernel_size=5, padding=2), activation(cfg),
                       Pool[Pool.MAX, dims](kernel_size=2)]
            channels, spatial = features, [s // 2 for s in spatial]
        if min(spatial) < 1:
            raise ModelError(f"lenet: input size {list(size)} is too small for {len(cfg.channels)} pooling stages "
                             f"(model.channels {list(cfg.channels)}); use fewer stages or a larger preprocess.resize")
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * math.prod(spatial), 120), activation(cfg), nn.Linear(120, 84),
            activation(cfg), _head(84, outputs, cfg.dropout))

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module signature
        return self.classifier(self.features(x))


@register_classifier("lenet")
def _lenet(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    return LeNet(cfg, in_channels, outputs, size)


_RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
            "resnet50": ("bottleneck", [3, 4, 6, 3])}
_STEMS = {Stem.SMALL: (3, 1, True), Stem.STRIDED: (3, 2, True), Stem.IMAGENET: (7, 2, False)}


def _resnet(depth: str) -> ClassifierFactory:
    block, layers = _RESNETS[depth]

    def build(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
        kernel, stride, no_pool = _STEMS[cfg.stem]
        net = ResNet(block, layers, [64, 128, 256, 512], spatial_dims=cfg.spatial_dims, n_input_channels=in_channels,
                     conv1_t_size=kernel, conv1_t_stride=stride, no_max_pool=no_pool, widen_factor=cfg.widen_factor,
                     num_classes=outputs, act=_act_arg(cfg), norm=_norm_arg(cfg))
        if cfg.dropout and isinstance(net.fc, nn.Linear):  # always a Linear: num_classes is given
            # add_module swaps the child in place; MONAI types ``fc`` as ``Linear | None``, not any head
            net.add_module("fc", _head(net.fc.in_features, outputs, cfg.dropout))
        return net

    return build


for _name in _RESNETS:
    register_classifier(_name)(_resnet(_name))


@register_classifier("densenet121")
def _densenet121(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    net = DenseNet121(spatial_dims=cfg.spatial_dims, in_channels=in_channels, out_channels=outputs,
                      act=_act_arg(cfg), norm=_norm_arg(cfg), dropout_prob=cfg.dropout)
    if cfg.stem != Stem.IMAGENET:  # MONAI's stem divides by 4 before the first block; small inputs cannot afford it
        kernel, stride, _ = _STEMS[cfg.stem]
        # torch types a child looked up by attribute as ``Tensor | Module``; MONAI's DenseNet makes conv0 a conv
        conv0 = cast(nn.modules.conv._ConvNd, net.features.conv0)
        net.features.conv0 = Conv[Conv.CONV, cfg.spatial_dims](in_channels, conv0.out_channels, kernel_size=kernel,
                                                               stride=stride, padding=kernel // 2, bias=False)
        net.features.pool0 = nn.Identity()
    return net


def create_classifier(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    """Build the classification network named by ``cfg.name``.

    Raises:
        ModelError: unknown name (with the closest registered one) or an input too small for it.
    """
    return create_model(TASK, cfg.name, cfg, in_channels, outputs, size)


def head_prefix(model: nn.Module) -> str:
    """Name of the classification head: the last linear layer (``fc``, ``class_layers.out``, ...)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ModelError(f"{type(model).__name__} has no linear layer to treat as the classification head")
    return linear[-1]
