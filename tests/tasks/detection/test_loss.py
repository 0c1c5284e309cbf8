"""RetinaNet's loss on packed box tables, in 2D and 3D, with a patch that holds no box."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medseg.tasks.detection.losses import RetinaNetLoss
from medseg.tasks.detection.transforms import NO_BOX, unpack_boxes
from medseg.tasks.registry import get_task, validate_config


def _cfg(dims: int) -> Any:
    patch = [32, 32, 8] if dims == 3 else [32, 48]
    anchors = [[4, 4, 2], [8, 8, 3]] if dims == 3 else [[4, 4], [8, 8]]
    return validate_config({"task": "detection", "patch": {"size": patch, "max_boxes": 3},
                            "data": {"manifest": "m.csv", "labels": {0: "background", 1: "a", 2: "b"}},
                            "model": {"spatial_dims": dims, "channels": [4, 4, 8, 8], "fpn_channels": 8,
                                      "anchor_shapes": anchors}})


@pytest.mark.parametrize("dims", [2, 3])
def test_the_loss_is_finite_and_trains_with_boxes_and_without(dims: int) -> None:
    torch.manual_seed(0)
    cfg = _cfg(dims)
    network = get_task("detection").build_network(cfg)
    table = torch.full((2, 3, 2 * dims + 1), NO_BOX)  # the second patch holds no box: all negatives
    table[0, 0] = torch.tensor([4, 5, 2, 12, 13, 5, 1.0] if dims == 3 else [4, 5, 12, 13, 2.0])
    loss = RetinaNetLoss(cfg)(network(torch.randn(2, 1, *cfg.patch.size)), table)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in network.classification_head.parameters())


def test_unpacking_drops_unused_rows_and_counts_classes_from_zero() -> None:
    table = torch.full((1, 3, 7), NO_BOX)
    table[0, 1] = torch.tensor([1, 2, 3, 4, 5, 6, 2.0])
    (target,) = unpack_boxes(table)
    assert target["boxes"].tolist() == [[1, 2, 3, 4, 5, 6]] and target["labels"].tolist() == [1]


def test_validation_pictures_outline_reference_and_predicted_boxes() -> None:
    import numpy as np

    from medseg.tasks.detection.boxes import Boxes
    from medseg.tasks.detection.previews import draw_boxes

    image = np.zeros((20, 16, 6), dtype=np.float32)
    reference = Boxes(np.array([[2.0, 3, 1, 6, 8, 4]]), np.array([1]))  # crosses slice z = 2
    predicted = Boxes(np.array([[10.0, 10, 2, 14, 12, 3], [0, 0, 5, 2, 2, 6]]), np.array([1, 1]), np.array([1.0, 0.9]))
    picture = draw_boxes(image, reference, predicted)
    assert picture.shape == (16, 20, 3) and picture.dtype == np.uint8  # rows are y, flipped so anterior is up
    as_xy = picture[::-1].transpose(1, 0, 2)
    assert tuple(as_xy[2, 3]) == (0, 220, 0) and tuple(as_xy[5, 7]) == (0, 220, 0)  # the green outline's corners
    assert tuple(as_xy[10, 10]) == (255, 0, 0)  # the best prediction in red; the one at z = 5 is not on this slice
    assert (as_xy[0:2, 0:2] == 0).all()
