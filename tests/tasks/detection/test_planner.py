"""`medseg plan --task detection`: anchors and patch from the training boxes' sizes, the first
convolution unstrided along thick slices, and a dataset without boxes refused."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.data.manifest import Case, write_manifest
from medseg.errors import UsageError

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])  # thick slices


def _dataset(root: Path, sizes: list[tuple[int, int, int]], test_size: tuple[int, int, int]) -> Path:
    """One training/validation case per box size (a single component each) and a test case."""
    rng = np.random.default_rng(0)
    cases = []
    for index, size in enumerate([*sizes, test_size]):
        label = np.zeros((41, 39, 13), dtype=np.uint8)
        if any(size):
            label[5:5 + size[0], 7:7 + size[1], 2:2 + size[2]] = 1
        image = rng.normal(0, 1, label.shape).astype(np.float32) + 3 * label
        split = "test" if index == len(sizes) else ("val" if index == 0 else "train")
        for kind, array in (("images", image), ("labels", label)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, AFFINE), root / kind / f"c{index}.nii.gz")
        cases.append(Case(f"c{index}", (f"images/c{index}.nii.gz",), f"labels/c{index}.nii.gz", split))
    return write_manifest(cases, root / "cases.csv")


def test_anchors_are_box_size_percentiles_and_the_patch_holds_twice_the_large_ones(tmp_path: Path) -> None:
    # x sizes 4, 6, 8, 10: 10th percentile 4.6, 30th 5.8, 50th 7; the test case's huge box is not seen
    manifest = _dataset(tmp_path, [(4, 4, 2), (6, 6, 2), (8, 8, 3), (10, 10, 3)], (30, 30, 10))
    plan = medseg.plan(manifest, task="detection", budget="2m", root=tmp_path, probe=False, progress=False,
                       home=tmp_path)
    model, patch = plan.config["model"], plan.config["patch"]
    assert model["stem_stride"] == [2, 2, 1]  # 3 mm slices against 1 mm in-plane
    assert model["anchor_shapes"] == [[4.6, 4.6, 2.0], [5.8, 5.8, 2.0], [7.0, 7.0, 2.5]]
    # 90th percentile 9.4 x 9.4 x 3 -> twice is 18.8 x 18.8 x 6 -> multiples of (16, 16, 8), within 41 x 39 x 13
    assert patch["size"] == [32, 32, 8]
    assert plan.config["train"]["max_minutes"] == 2


def test_a_dataset_without_boxes_is_refused(tmp_path: Path) -> None:
    manifest = _dataset(tmp_path, [(0, 0, 0), (0, 0, 0)], (0, 0, 0))
    with pytest.raises(UsageError, match="no boxes to plan detection for. Expected label maps with at least one"):
        medseg.plan(manifest, task="detection", budget="2m", root=tmp_path, probe=False, progress=False, home=tmp_path)
