"""``medseg plan --task regression``: targets from the manifest's target* columns, the input padded at
its own voxel size when the cases share a grid, a config that validates; no target column is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.data.manifest import Case, write_manifest
from medseg.errors import UsageError


def _dataset(tmp_path: Path, spacings: list[tuple[float, float, float]]) -> Path:
    rng = np.random.default_rng(0)
    cases = []
    for i, spacing in enumerate(spacings):
        (tmp_path / "images").mkdir(exist_ok=True)
        image = rng.normal(100, 20, (17 + i % 3, 14, 9)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), tmp_path / "images" / f"c{i}.nii.gz")
        split = "train" if i < len(spacings) - 2 else "val"
        cases.append(Case(f"c{i}", (f"images/c{i}.nii.gz",), None, split))
    return write_manifest(cases, tmp_path / "cases.csv")


def _with_targets(manifest: Path) -> Path:
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = manifest.with_name("targets.csv")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, [*rows[0], "target_age", "target_volume_ml"])
        writer.writeheader()
        writer.writerows({**row, "target_age": 40 + i, "target_volume_ml": 2.5 + i / 10} for i, row in enumerate(rows))
    return out


def test_a_shared_grid_is_padded_and_every_target_column_is_learnt(tmp_path: Path) -> None:
    manifest = _with_targets(_dataset(tmp_path, [(0.9, 0.9, 2.5)] * 10))
    plan = medseg.plan(manifest, task="regression", root=tmp_path, probe=False, progress=False)
    config = plan.config
    assert config["data"]["targets"]["columns"] == ["target_age", "target_volume_ml"]
    assert config["preprocess"]["fit"] == "pad_or_crop" and config["preprocess"]["size"] == [24, 16, 16]
    assert "affine" not in [a["name"] for a in config["augment"]]  # a scaled image would keep its target
    cfg = medseg.validate_config(config)
    assert type(cfg).__name__ == "RegressionConfig" and cfg.train.max_minutes == 30


def test_differing_grids_are_resized_and_no_target_column_is_refused(tmp_path: Path) -> None:
    manifest = _dataset(tmp_path, [(0.9, 0.9, 2.5), (1.2, 1.2, 3.0)] * 5)
    with pytest.raises(UsageError, match=r"no regression targets to plan for(.|\n)*target_<name>"):
        medseg.plan(manifest, task="regression", root=tmp_path, probe=False, progress=False)
    plan = medseg.plan(_with_targets(manifest), task="regression", root=tmp_path, probe=False, progress=False)
    assert plan.config["preprocess"]["fit"] == "resize" and plan.config["preprocess"]["size"] == [18, 14, 9]
