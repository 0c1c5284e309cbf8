"""A whole-image network (ResNet, DenseNet, LeNet, AlexNet, VGG, GoogLeNet) as a masked autoencoder.

The encoder IS the classification network's feature extractor: its own modules, registered under
their own names (``conv1``, ``layer1`` ... of a ResNet; ``features`` of a DenseNet), so that the
pretrained tensors load into the classifier by name and its head starts fresh. The decoder is
SimMIM's (Xie et al. 2022): one 1x1 convolution to ``in_channels x factor^dims`` channels and a pixel
shuffle (MONAI's :class:`~monai.networks.blocks.SubpixelUpsample`) back to the input grid. A light
decoder on purpose: the reconstruction has to come from what the encoder learnt.

:data:`FEATURE_STAGES` says, per network class, which of its top-level modules make the features and
in which order the classifier's ``forward`` runs them; a class it does not name cannot be pretrained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.networks.blocks import SubpixelUpsample
from monai.networks.layers.factories import Conv
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from medseg.engine.classic_networks import VGG, AlexNet, GoogLeNet
from medseg.engine.image_networks import LeNet
from medseg.errors import ModelError

#: Where the decoder sits in the autoencoder: a name no classifier uses, so nothing of it is handed on.
DECODER = "mim_decoder"


def _resnet_stages(net: nn.Module) -> list[str]:
    # MONAI's ResNet.forward skips its max pool when built with no_max_pool (medseg's small and strided stems)
    pool = [] if getattr(net, "no_max_pool", False) else ["maxpool"]
    return ["conv1", "bn1", "act", *pool, "layer1", "layer2", "layer3", "layer4"]


#: Network class -> the names of its top-level modules that compute the feature map, in forward order
#: (everything after them, pooling and the fully connected head, is the classifier's alone).
FEATURE_STAGES: dict[type[nn.Module], Callable[[nn.Module], list[str]]] = {
    ResNet: _resnet_stages,
    DenseNet: lambda net: ["features"],
    LeNet: lambda net: ["features"],
    AlexNet: lambda net: ["features"],
    VGG: lambda net: ["features"],
    GoogLeNet: lambda net: ["stem", "blocks"],  # the auxiliary heads (model.aux_classifiers) stay out
}


def feature_stages(network: nn.Module, name: str, pretrainable: Sequence[str]) -> list[str]:
    """The feature modules of ``network`` (built as ``model.name: name``), in forward order.

    Raises:
        ModelError: a network whose feature extractor medseg does not know (Expected / Got / Fix).
    """
    for kind, stages in FEATURE_STAGES.items():
        if isinstance(network, kind):
            return stages(network)
    raise ModelError(f"pretraining: model.name {name!r} cannot be pretrained yet. Expected: a network with a "
                     f"convolutional feature map, one of {', '.join(pretrainable)}. Got: {type(network).__name__}, "
                     "whose encoder medseg does not know. Fix: pretrain one of those (the same as the run it "
                     "will initialise)")


class MaskedImageAutoencoder(nn.Module):
    """A classifier's feature extractor (its modules, under their names) and a SimMIM decoder.

    Args:
        network: the whole-image network as the classification task builds it.
        stages: the names of its feature modules, in forward order (:func:`feature_stages`).
        in_channels: image channels, which the decoder reconstructs.
        size: the input's spatial size (the classification run's ``preprocess.resize``).
        spatial_dims: 2 or 3.
    """

    def __init__(self, network: nn.Module, stages: Sequence[str], in_channels: int, size: Sequence[int],
                 spatial_dims: int):
        super().__init__()
        self.stages = list(stages)
        for stage in self.stages:  # the same module objects, under the classifier's own names
            self.add_module(stage, network.get_submodule(stage))
        self.size = tuple(int(s) for s in size)
        # the feature map's size and width from one dry pass, in eval mode: batch norm neither
        # updates its running statistics nor refuses a single sample
        self.eval()
        with torch.no_grad():
            try:
                features = self.encode(torch.zeros(1, in_channels, *self.size))
            except RuntimeError as err:  # a pool or kernel larger than what is left of the input
                raise ModelError(f"pretraining: patch.size {list(self.size)} is too small for "
                                 f"{type(network).__name__}'s feature extractor ({err}). Expected: the input size of "
                                 "the classification run (its preprocess.resize), large enough for its strides. "
                                 "Fix: a larger patch.size and preprocess.resize, or model.stem: small") from err
        self.train()
        width, grid = int(features.shape[1]), [int(s) for s in features.shape[2:]]
        factor = max(math.ceil(n / g) for n, g in zip(self.size, grid))
        conv = Conv[Conv.CONV, spatial_dims](width, in_channels * factor**spatial_dims, kernel_size=1)
        self.add_module(DECODER, SubpixelUpsample(spatial_dims, width, in_channels, scale_factor=factor,
                                                  conv_block=conv, apply_pad_pool=False))
        self.factor = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's feature map of ``x`` (before its global pooling)."""
        for stage in self.stages:
            module = self.get_submodule(stage)
            if isinstance(module, nn.ModuleList):  # GoogLeNet's blocks: applied one after the other
                for block in module:
                    x = block(x)
            else:
                x = module(x)
        return x

    def encoder_modules(self) -> list[nn.Module]:
        return [self.get_submodule(stage) for stage in self.stages]

    def decoder(self) -> nn.Module:
        return self.get_submodule(DECODER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder()(self.encode(x))
        # the shuffled grid may overshoot an input that the strides do not divide: cut it back
        return out[(slice(None), slice(None), *(slice(0, s) for s in x.shape[2:]))]
