"""Region-based training (nnU-Net ``documentation/region_based_training.md``): labels learned as
overlapping regions, one sigmoid output per region, decoded back into label values.

A region is a union of label values (BraTS: whole tumour {1, 2, 3} ⊃ tumour core {1, 3} ⊃
enhancing tumour {3}). Training targets are the region masks, built on the fly from the integer
label batch (so caching, augmentation and patch sampling stay on the label map). A prediction
starts as background and paints, region by region in the configured order, each voxel whose
sigmoid exceeds 0.5 with that region's own label (nnU-Net's ``regions_class_order``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medseg.errors import ModelError
from medseg.tasks.segmentation.config import RegionConfig, check_regions, region_paint_labels

#: The output activation a region model's contract names (a softmax model's is ``softmax``).
SIGMOID = "sigmoid"


@dataclass(frozen=True)
class Regions:
    """The regions of a model, in paint order.

    Attributes:
        names: each region's name (metric key ``dice_region/<name>``).
        labels: the label values each region is the union of.
        paint: the label value each region paints when decoding.
    """

    names: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    paint: tuple[int, ...]

    @classmethod
    def from_config(cls, regions: Sequence[RegionConfig] | None) -> Regions | None:
        """The config's regions (already validated), or None for a softmax model."""
        if not regions:
            return None
        return cls(tuple(r.name for r in regions), tuple(tuple(r.labels) for r in regions),
                   tuple(region_paint_labels(regions)))

    @classmethod
    def from_contract(cls, contract: Mapping[str, Any], source: str) -> Regions | None:
        """The regions a model's contract carries (None for a softmax model), checked as the config was.

        Raises:
            ModelError: a sigmoid model without regions, regions with another activation, or regions
                that break the config's rules or disagree with their stored paint order.
        """
        stored = contract.get("regions")
        activation = contract.get("output_activation", "softmax")
        if not stored:
            if activation == SIGMOID:
                raise ModelError(f"{source}: its contract says output_activation: sigmoid but carries no regions; "
                                 "predict cannot tell which label each output paints. Package the model again")
            return None
        if activation != SIGMOID:
            raise ModelError(f"{source}: its contract carries regions but output_activation is {activation!r}, not "
                             "'sigmoid'; the contract is inconsistent. Package the model again")
        labels = {int(k): str(v) for k, v in (contract.get("labels") or {}).items()}
        try:
            configs = [RegionConfig(name=r["name"], labels=r["labels"]) for r in stored]
            check_regions(configs, labels)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{source}: its contract's regions {stored!r} are not valid ({err}); "
                             "package the model again") from err
        regions = cls(tuple(r.name for r in configs), tuple(r.labels for r in configs),
                      tuple(region_paint_labels(configs)))
        paint = [r.get("paint") for r in stored]
        if list(regions.paint) != paint:
            raise ModelError(f"{source}: its contract's regions paint {paint}, but their labels give "
                             f"{list(regions.paint)}; package the model again")
        return regions

    def to_contract(self) -> list[dict[str, Any]]:
        """What a model's contract stores: each region's name, labels and paint value, in paint order."""
        return [{"name": n, "labels": list(v), "paint": p} for n, v, p in zip(self.names, self.labels, self.paint)]


def regions_target(label: torch.Tensor, regions: Regions) -> torch.Tensor:
    """The region masks of an integer label batch: (B, 1, *spatial) -> float (B, R, *spatial).

    Raises:
        ValueError: ``label`` has more than one channel.
    """
    if label.ndim < 2 or label.shape[1] != 1:
        raise ValueError(f"regions_target: label must be (B, 1, *spatial) label values, got shape {tuple(label.shape)}")
    return torch.cat([_inside(label, values) for values in regions.labels], dim=1).float()


def region_masks(label_map: torch.Tensor, regions: Regions) -> torch.Tensor:
    """Boolean (R, *spatial) masks of a decoded or reference label map (*spatial)."""
    return torch.stack([_inside(label_map, values) for values in regions.labels])


def _inside(label: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    plain = label.as_tensor() if hasattr(label, "as_tensor") else label  # a MetaTensor's metadata is not wanted here
    if plain.is_floating_point():
        plain = plain.round()  # label maps load as float; exact after nearest-neighbour resampling, but be safe
    return torch.isin(plain, torch.tensor(values, dtype=plain.dtype, device=plain.device))


def decode_regions(scores: torch.Tensor, regions: Regions, *, logits: bool = False) -> torch.Tensor:
    """Label map (*spatial) from channel-first region scores (R, *spatial): background, then each
    region painted in order where its sigmoid exceeds 0.5 (``logits=True``: where its logit exceeds 0).

    Raises:
        ValueError: ``scores`` has not one channel per region.
    """
    if scores.shape[0] != len(regions.paint):
        raise ValueError(f"decode_regions: scores have {scores.shape[0]} channels but there are "
                         f"{len(regions.paint)} regions {list(regions.names)}")
    threshold = 0.0 if logits else 0.5
    dtype = torch.uint8 if max(regions.paint) < 256 else torch.int32
    out = torch.zeros(scores.shape[1:], dtype=dtype, device=scores.device)
    for channel, value in enumerate(regions.paint):
        out.masked_fill_(scores[channel] > threshold, value)
    return out
