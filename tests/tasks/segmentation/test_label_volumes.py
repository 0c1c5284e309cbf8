"""The label volumes a segmentation model stores for QC come from labels in any format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.manifest import Case, write_manifest
from medseg.tasks.registry import get_task
from medseg.tasks.segmentation.training import label_volume_stats


def test_nrrd_labels_give_their_volumes_in_ml(tmp_path: Path) -> None:
    volumes = []
    cases = []
    for i, side in enumerate((4, 6)):
        label = np.zeros((9, 11, 13), np.uint8)  # z, y, x as SimpleITK stores it
        label[:side, :side, :side] = 1
        image = sitk.GetImageFromArray(label)
        image.SetSpacing((0.7, 0.7, 5.0))
        image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # a rotated, non-RAS grid
        sitk.WriteImage(image, str(tmp_path / f"l{i}.nrrd"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(tmp_path / f"i{i}.nrrd"))
        cases.append(Case(f"c{i}", (f"i{i}.nrrd",), f"l{i}.nrrd", "train"))
        volumes.append(side**3 * 0.7 * 0.7 * 5.0 / 1000.0)
    write_manifest(cases, tmp_path / "m.csv")
    cfg = get_task("segmentation").config_type.model_validate(
        {"data": {"manifest": str(tmp_path / "m.csv"), "labels": {0: "background", 1: "organ"}},
         "patch": {"size": [8, 8, 8]}})
    stats = label_volume_stats(cfg, tmp_path / "m.csv", tmp_path)
    assert stats["organ"]["cases"] == 2
    assert stats["organ"]["mean"] == pytest.approx(np.mean(volumes))
    assert stats["organ"]["std"] == pytest.approx(np.std(volumes))
