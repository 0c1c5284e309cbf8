"""The detection config refuses what it cannot honour, with the key and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from medseg.errors import ConfigError
from medseg.tasks.registry import get_task, validate_config


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"task": "detection", "data": {"manifest": "m.csv", "labels": {0: "background", 1: "lesion"}},
                           "patch": {"size": [32, 32, 8]}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_unknown_keys_name_the_closest_one() -> None:
    with pytest.raises(ConfigError, match="score_treshold"):
        validate_config(_raw(detect={"score_treshold": 0.1}))
    with pytest.raises(ConfigError, match="min_volume"):
        validate_config(_raw(data={"manifest": "m.csv", "labels": {0: "b", 1: "l"}, "boxes": {"min_volume": 3}}))


def test_spatial_augmentations_that_would_leave_the_boxes_behind_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\['affine'\] would move the image without its boxes"):
        validate_config(_raw(augment=[{"name": "affine"}]))


def test_per_axis_settings_need_one_value_per_axis() -> None:
    with pytest.raises(ConfigError, match="patch.size has 2 values"):
        validate_config(_raw(patch={"size": [32, 32]}))
    with pytest.raises(ConfigError, match="each of model.anchor_shapes has 2 values"):
        validate_config(_raw(model={"anchor_shapes": [[4, 4]]}))


def test_a_patch_the_network_cannot_divide_says_which_size_would_do() -> None:
    cfg = validate_config(_raw(patch={"size": [30, 32, 8]}))
    with pytest.raises(ConfigError, match=r"patch.size \[30, 32, 8\]: Expected a multiple of \[16, 16, 8\].*e.g. \[32"):
        get_task("detection").build_network(cfg)


def test_2d_detection_builds() -> None:
    cfg = validate_config(_raw(patch={"size": [64, 48]}, model={"spatial_dims": 2, "anchor_shapes": [[6, 6], [9, 9]]}))
    network = get_task("detection").build_network(cfg)
    assert network.spatial_dims == 2 and network.num_anchors == 2
