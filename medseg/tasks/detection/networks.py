"""MONAI's RetinaNet, built from the config: a ResNet whose chosen layers feed a feature pyramid,
with classification and box-regression heads at every level; its anchor generator; and the
:class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` that searches a whole
scan with it (sliding window, box decoding, NMS).

The network is what is trained, saved and rebuilt from the model's spec; anchors and the detector
hold no weights and are rebuilt from the same config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import resnet
from torch import Tensor, nn

from medseg.errors import ConfigError
from medseg.tasks.detection.config import DetectConfig, DetectionModelConfig


def stem_stride(model: DetectionModelConfig) -> tuple[int, ...]:
    """The first convolution's stride: the config's, else 2 in-plane and 1 along a 3D scan's z."""
    if model.stem_stride is not None:
        return tuple(model.stem_stride)
    return (2, 2, 1) if model.spatial_dims == 3 else (2, 2)


def size_divisor(model: DetectionModelConfig) -> tuple[int, ...]:
    """What every input size must be a multiple of: the stem, ResNet's max pool, the strided layers up
    to the last returned one, and the pooled extra level (MONAI's LUNA16 recipe)."""
    return tuple(s * 2 * 2 ** max(model.returned_layers) for s in stem_stride(model))


def check_divisible(size: Sequence[int], model: DetectionModelConfig, key: str) -> None:
    """Raises ConfigError when ``size`` is not a multiple of :func:`size_divisor` on every axis."""
    divisor = size_divisor(model)
    if any(s % d for s, d in zip(size, divisor)):
        fixed = [max(d, round(s / d) * d) for s, d in zip(size, divisor)]
        raise ConfigError(f"{key} {list(size)}: Expected a multiple of {list(divisor)} on every axis (the network's "
                          f"stem stride, pooling and pyramid levels). Got {list(size)}. Use e.g. {fixed}.")


class PyramidFeatures(nn.Module):
    """The ResNet's stem and layers up to the deepest returned one, and MONAI's feature pyramid over
    the returned layers: what MONAI's ``BackboneWithFPN`` is, without torchvision (which it borrows
    ``IntermediateLayerGetter`` from, and medseg does not install)."""

    def __init__(self, backbone: resnet.ResNet, returned_layers: Sequence[int], in_channels: Sequence[int],
                 out_channels: int, spatial_dims: int):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act, backbone.maxpool)
        self.layers = nn.ModuleList(getattr(backbone, f"layer{k}") for k in range(1, max(returned_layers) + 1))
        self.returned = tuple(k - 1 for k in returned_layers)
        self.fpn = FeaturePyramidNetwork(spatial_dims=spatial_dims, in_channels_list=list(in_channels),
                                         out_channels=out_channels, extra_blocks=LastLevelMaxPool(spatial_dims))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        x = self.stem(x)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.returned:
                features[str(len(features))] = x
        return dict(self.fpn(features))


def build_retinanet(model: DetectionModelConfig, in_channels: int, num_classes: int) -> RetinaNet:
    """The RetinaNet of ``model``: a basic-block ResNet (widths ``model.channels``) with an FPN of
    ``model.fpn_channels`` over ``model.returned_layers`` plus a pooled level."""
    dims = model.spatial_dims
    backbone = resnet.ResNet(block="basic", layers=list(model.layers), block_inplanes=list(model.channels),
                             spatial_dims=dims, n_input_channels=in_channels, conv1_t_size=7,
                             conv1_t_stride=stem_stride(model), num_classes=1)  # type: ignore[arg-type]
    returned = list(model.returned_layers)
    feature_extractor = PyramidFeatures(backbone, returned, [model.channels[k - 1] for k in returned],
                                        model.fpn_channels, dims)
    return RetinaNet(spatial_dims=dims, num_classes=num_classes, num_anchors=len(model.anchor_shapes),
                     feature_extractor=feature_extractor, size_divisible=size_divisor(model))


def anchor_generator(model: DetectionModelConfig) -> AnchorGeneratorWithAnchorShape:
    """Anchors of ``model.anchor_shapes`` at the finest level, doubling at every coarser one."""
    levels = len(model.returned_layers) + 1
    return AnchorGeneratorWithAnchorShape(feature_map_scales=[2**level for level in range(levels)],
                                          base_anchor_shapes=[list(s) for s in model.anchor_shapes])


class AtssRetinaNetDetector(RetinaNetDetector):
    """MONAI's detector with its ATSS matcher, matching without torchvision: MONAI's own
    ``compute_anchor_matched_idxs`` first asks whether the matcher is torchvision's ``Matcher``,
    which fails where torchvision is not installed (medseg does not need it); MONAI's docstring
    invites this override for a matcher of one's own."""

    def compute_anchor_matched_idxs(self, anchors: list[Tensor], targets: list[dict[str, Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> list[Tensor]:
        if not isinstance(self.proposal_matcher, ATSSMatcher):
            raise NotImplementedError("set_atss_matcher(...) first: the only matcher medseg's detector uses")
        matched = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            boxes = targets_per_image[self.target_box_key]
            if boxes.numel() == 0:  # a negative patch: every anchor is background
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, matched_per_image = self.proposal_matcher(boxes.to(anchors_per_image.device), anchors_per_image,
                                                         num_anchor_locs_per_level, self.num_anchors_per_loc)
            matched.append(matched_per_image)
        return matched


def build_detector(network: nn.Module, model: DetectionModelConfig, num_classes: int) -> AtssRetinaNetDetector:
    """A detector around ``network`` (the trained RetinaNet, or a stand-in without weights for the loss)."""
    return AtssRetinaNetDetector(network, anchor_generator(model), spatial_dims=model.spatial_dims,
                             num_classes=num_classes, size_divisible=size_divisor(model))


def scan_detector(network: nn.Module, model: DetectionModelConfig, num_classes: int, detect: DetectConfig,
                  window: Sequence[int]) -> AtssRetinaNetDetector:
    """The detector that searches a whole scan: sliding windows of ``window``, boxes decoded over
    the whole grid, scored, then non-maximum suppression (MONAI's box selector)."""
    detector = build_detector(network, model, num_classes)
    detector.set_box_selector_parameters(score_thresh=detect.score_threshold, topk_candidates_per_level=1000,
                                         nms_thresh=detect.nms_iou, detections_per_img=detect.max_boxes)
    detector.set_sliding_window_inferer(roi_size=list(window), sw_batch_size=1, overlap=detect.overlap,
                                        mode="constant", padding_mode="constant", cval=0.0)
    return detector.eval()
