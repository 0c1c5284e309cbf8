"""The lineage's middle: AlexNet, VGG and GoogLeNet (Inception v1), 2D and 3D, as their papers
defined them, sized for 28-224 px inputs.

What is kept from the originals: ReLU (any configured activation), AlexNet's and GoogLeNet's local
response normalisation, VGG's 3x3 stacks (with an optional norm layer after each convolution, the
``_bn`` variants), dropout in the fully connected classifiers, GoogLeNet's 1x1/3x3/5x5/pool
branches and its two auxiliary classifiers (optional). What changes for small inputs: max pools
round up (``ceil_mode``, identical at 224 px), the features are average-pooled to a fixed grid
before the classifier (as torchvision does), and the stem is a choice (``model.stem``: the
original's large strided kernel and pool, or a 3x3 one that keeps a 28 px image's detail).

The classes take plain arguments (widths, grids, layer factories); :mod:`medseg.engine.image_networks`
builds them from the model config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medseg.errors import ModelError

LayerFactory = Callable[[], nn.Module]
NormFactory = Callable[[int], nn.Module]

#: VGG's configurations (Simonyan & Zisserman, table 1): conv widths, "M" a 2x2 max pool.
VGG_LAYERS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
#: GoogLeNet's inception modules (Szegedy et al., table 1): 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5,
#: pool projection; "M" a 3x3 stride-2 max pool.
INCEPTION_LAYERS: tuple[tuple[int, int, int, int, int, int] | str, ...] = (
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M",
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))
#: After which inception modules (0-based, pools not counted) the auxiliary classifiers sit: 4a and 4d.
AUX_AFTER = (2, 5)


def pooled_size(size: Sequence[int], kernel: int, stride: int, padding: int = 0) -> list[int]:
    """A ceil-mode pool's output size per axis (PyTorch's rule: no window may start in the padding)."""
    out = []
    for n in size:
        m = math.ceil((n + 2 * padding - kernel) / stride) + 1
        if (m - 1) * stride >= n + padding:
            m -= 1
        out.append(m)
    return out


def check_input(network: str, size: Sequence[int], spatial: Sequence[int], hint: str) -> None:
    """Raise a :class:`ModelError` when the feature map after the last pool is empty."""
    if min(spatial) < 1:
        raise ModelError(f"{network}: input size {list(size)} is too small for its pools (they leave "
                         f"{list(spatial)}); {hint}")


def local_response_norm() -> nn.Module:
    """Local response normalisation as AlexNet's paper set it (n=5, alpha=1e-4, beta=0.75, k=2)."""
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)


def conv(dims: int, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    """A biased convolution that keeps the size at stride 1 (padding kernel // 2), as in all three papers."""
    return Conv[Conv.CONV, dims](cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2)


def max_pool(dims: int, kernel: int, stride: int, padding: int = 0) -> nn.Module:
    return Pool[Pool.MAX, dims](kernel_size=kernel, stride=stride, padding=padding, ceil_mode=True)


def fully_connected(features: int, hidden: int, outputs: int, dropout: float, act: LayerFactory) -> nn.Sequential:
    """AlexNet's and VGG's classifier: (dropout, linear, act) twice, then the linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in (features, hidden):
        layers += [nn.Dropout(dropout), nn.Linear(width, hidden), act()]
    layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012) on one device: the paper's 96-256-384-384-256 convolutions
    (its two-GPU grouping left out), LRN after the first two, 3x3 stride-2 max pools, 4096-4096 classifier.

    Args:
        dims: 2 or 3. in_channels, outputs: image channels and logits.
        size: the input's spatial size (checked against the pools).
        widths: the five convolutions' widths. hidden: the classifier's hidden units.
        grid: the features are average-pooled to ``grid`` per axis before the classifier (6 in the paper).
        large_stem: the paper's 11x11 stride-4 first convolution, else 3x3 at ``stem_stride``.
        lrn: local response normalisation after conv1 and conv2. dropout: the classifier's.
        act: a new activation layer.
    """

    def __init__(self, dims: int, in_channels: int, outputs: int, size: Sequence[int], widths: Sequence[int],
                 hidden: int, grid: int, large_stem: bool, stem_stride: int, lrn: bool, dropout: float,
                 act: LayerFactory):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        first = Conv[Conv.CONV, dims](in_channels, c1, kernel_size=11, stride=4, padding=2) if large_stem else \
            conv(dims, in_channels, c1, 3, stem_stride)
        spatial = [(n + 4 - 11) // 4 + 1 for n in size] if large_stem else [(n - 1) // stem_stride + 1 for n in size]

        def norm() -> list[nn.Module]:
            return [local_response_norm()] if lrn else []

        self.features = nn.Sequential(
            first, act(), *norm(), max_pool(dims, 3, 2),
            conv(dims, c1, c2, 5), act(), *norm(), max_pool(dims, 3, 2),
            conv(dims, c2, c3, 3), act(), conv(dims, c3, c4, 3), act(), conv(dims, c4, c5, 3), act(),
            max_pool(dims, 3, 2))
        for _ in range(3):
            spatial = pooled_size(spatial, 3, 2)
        check_input("alexnet", size, spatial, "use model.stem: small (no stride) or a larger preprocess.resize")
        self.avgpool = Pool[Pool.ADAPTIVEAVG, dims](grid)
        self.classifier = fully_connected(c5 * grid**dims, hidden, outputs, dropout, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2015): stacks of 3x3 convolutions between 2x2 max pools, an
    optional norm layer after each convolution (the ``_bn`` variants), a 4096-4096 classifier.

    Args:
        dims, in_channels, outputs, size: as :class:`AlexNet`.
        layers: widths and "M" (pool), one of :data:`VGG_LAYERS`, already scaled.
        hidden, grid (7 in the paper), dropout, act: as :class:`AlexNet`.
        norm: a norm layer for a width, or None (the original, without).
    """

    def __init__(self, dims: int, in_channels: int, outputs: int, size: Sequence[int], layers: Sequence[int | str],
                 hidden: int, grid: int, norm: NormFactory | None, dropout: float, act: LayerFactory):
        super().__init__()
        stages: list[nn.Module] = []
        channels, spatial = in_channels, list(size)
        for layer in layers:
            if layer == "M":
                stages.append(max_pool(dims, 2, 2))
                spatial = pooled_size(spatial, 2, 2)
                continue
            width = int(layer)
            stages += [conv(dims, channels, width, 3), *([norm(width)] if norm else []), act()]
            channels = width
        check_input("vgg", size, spatial, "use a larger preprocess.resize")
        self.features = nn.Sequential(*stages)
        self.avgpool = Pool[Pool.ADAPTIVEAVG, dims](grid)
        self.classifier = fully_connected(channels * grid**dims, hidden, outputs, dropout, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class Inception(nn.Module):
    """One inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated."""

    def __init__(self, dims: int, cin: int, widths: Sequence[int], act: LayerFactory):
        super().__init__()
        c1, r3, c3, r5, c5, pool = widths
        self.branch1 = nn.Sequential(conv(dims, cin, c1, 1), act())
        self.branch3 = nn.Sequential(conv(dims, cin, r3, 1), act(), conv(dims, r3, c3, 3), act())
        self.branch5 = nn.Sequential(conv(dims, cin, r5, 1), act(), conv(dims, r5, c5, 5), act())
        self.branch_pool = nn.Sequential(Pool[Pool.MAX, dims](kernel_size=3, stride=1, padding=1),
                                         conv(dims, cin, pool, 1), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class AuxiliaryClassifier(nn.Module):
    """GoogLeNet's side head: 5x5 stride-3 average pool (here adaptive, to ``grid``), 1x1 conv to 128,
    a 1024-unit layer, dropout 0.7, the logits."""

    def __init__(self, dims: int, cin: int, outputs: int, grid: int, act: LayerFactory):
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, dims](grid)
        self.conv = nn.Sequential(conv(dims, cin, 128, 1), act())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * grid**dims, 1024), act(), nn.Dropout(0.7),
                                nn.Linear(1024, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.pool(x)))


def googlenet_stem(dims: int, in_channels: int, scale: Callable[[int], int], large: bool, stride: int, lrn: bool,
                   act: LayerFactory) -> tuple[nn.Sequential, Callable[[list[int]], list[int]]]:
    """GoogLeNet's layers before the first inception module (to 192 channels, scaled), and their size rule.

    ``large``: the paper's 7x7 stride-2 convolution, max pool, LRN, 1x1, 3x3, LRN, max pool (224 px
    -> 28); else a 3x3 convolution at ``stride`` and the same 1x1 / 3x3 / LRN without the pools.
    """
    c64, c192 = scale(64), scale(192)

    def norm() -> list[nn.Module]:
        return [local_response_norm()] if lrn else []

    if large:
        layers = [conv(dims, in_channels, c64, 7, 2), act(), max_pool(dims, 3, 2), *norm(),
                  conv(dims, c64, c64, 1), act(), conv(dims, c64, c192, 3), act(), *norm(), max_pool(dims, 3, 2)]

        def sizes(size: list[int]) -> list[int]:
            return pooled_size(pooled_size([(n - 1) // 2 + 1 for n in size], 3, 2), 3, 2)
    else:
        layers = [conv(dims, in_channels, c64, 3, stride), act(), *norm(), conv(dims, c64, c64, 1), act(),
                  conv(dims, c64, c192, 3), act(), *norm()]

        def sizes(size: list[int]) -> list[int]:
            return [(n - 1) // stride + 1 for n in size]
    return nn.Sequential(*layers), sizes


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 (Szegedy et al. 2015): the stem, nine inception modules with max
    pools after 3b and 4e, global average pooling, dropout (0.4 in the paper), the linear head.

    With ``aux_classifiers`` two side heads sit after 4a and 4d; in training mode the network
    then returns ``(logits, aux1, aux2)`` and the loss adds the side heads' losses at 0.3 (the
    paper's weight); in eval mode, as without them, the logits alone.

    Args:
        dims, in_channels, outputs, size, act: as :class:`AlexNet`.
        scale: multiplies every inception width (and the stem's). large_stem, stem_stride, lrn: see
            :func:`googlenet_stem`. dropout: before the head. aux_classifiers: build the side heads;
            aux_grid: their pooled grid per axis (4 in the paper at 224 px).
    """

    def __init__(self, dims: int, in_channels: int, outputs: int, size: Sequence[int], scale: Callable[[int], int],
                 large_stem: bool, stem_stride: int, lrn: bool, dropout: float, aux_classifiers: bool, aux_grid: int,
                 act: LayerFactory):
        super().__init__()
        self.stem, stem_sizes = googlenet_stem(dims, in_channels, scale, large_stem, stem_stride, lrn, act)
        spatial, channels = stem_sizes(list(size)), scale(192)
        blocks: list[nn.Module] = []
        aux: list[nn.Module] = []
        for layer in INCEPTION_LAYERS:
            if isinstance(layer, str):  # "M"
                blocks.append(max_pool(dims, 3, 2))
                spatial = pooled_size(spatial, 3, 2)
                continue
            widths = [scale(w) for w in layer]
            blocks.append(Inception(dims, channels, widths, act))
            channels = widths[0] + widths[2] + widths[4] + widths[5]
            if aux_classifiers and sum(isinstance(b, Inception) for b in blocks) - 1 in AUX_AFTER:
                aux.append(AuxiliaryClassifier(dims, channels, outputs, aux_grid, act))
        check_input("googlenet", size, spatial, "use model.stem: small or strided, or a larger preprocess.resize")
        self.blocks = nn.ModuleList(blocks)
        self.aux = nn.ModuleList(aux)  # before the head, so that the head stays the last linear layer
        self.head = nn.Sequential(Pool[Pool.ADAPTIVEAVG, dims](1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.stem(x)
        side: list[torch.Tensor] = []
        inception = 0
        for block in self.blocks:
            x = block(x)
            if isinstance(block, Inception):
                if self.training and len(self.aux) and inception in AUX_AFTER:
                    side.append(self.aux[AUX_AFTER.index(inception)](x))
                inception += 1
        logits = self.head(x)
        return (logits, *side) if side else logits

