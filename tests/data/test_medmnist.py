"""The MedMNIST importer keeps labels, splits and pixels, and re-imports to identical bytes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medseg.data.manifest import read_manifest
from medseg.data.medmnist import import_medmnist
from medseg.errors import ManifestError
from medseg.io.readers import load_volume
from tests.conftest import write_medmnist_npz

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"


@pytest.mark.parametrize("shape", [(21, 17), (9, 12, 7)], ids=["2d", "3d"])
def test_round_trip_labels_splits_and_pixels(tmp_path: Path, shape: tuple[int, ...]) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", shape, counts=(10, 4, 6), classes=3)
    imported = import_medmnist(npz, tmp_path / "m.csv", tmp_path / "images", progress=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert Counter(c.split for c in manifest.cases) == {"train": 10, "val": 4, "test": 6}
    assert imported.spatial_dims == len(shape) and imported.size == shape
    assert imported.labels == {0: "class_0", 1: "class_1", 2: "class_2"}
    with np.load(npz) as data:
        for case in manifest.cases:
            index = int(case.case_id.rsplit("_", 1)[1])
            assert int(case.label) == int(data[f"{case.split}_labels"][index, 0])
            volume = load_volume(tmp_path / "images" / case.images[0])
            # files hold (x = column, y = row[, z]): the transpose of MedMNIST's array
            assert np.array_equal(volume.numpy()[0], data[f"{case.split}_images"][index].T)


def test_reimport_gives_identical_hashes(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz")
    first = import_medmnist(npz, tmp_path / "a.csv", tmp_path / "a", progress=False).manifest
    second = import_medmnist(npz, tmp_path / "b.csv", tmp_path / "b", progress=False).manifest
    assert [c.image_sha256 for c in first.cases] == [c.image_sha256 for c in second.cases]


@pytest.mark.skipif(not (SHARED / "retinamnist.npz").is_file(), reason="shared MedMNIST data not present")
def test_real_rgb_file_with_ordinal_grades(tmp_path: Path) -> None:
    imported = import_medmnist(SHARED / "retinamnist.npz", tmp_path / "r.csv", tmp_path / "r", limit=5, progress=False)
    assert imported.channels == 3 and imported.labels[4] == "grade_4"
    case = imported.manifest.cases[0]
    volume = load_volume(tmp_path / "r" / case.images[0])
    with np.load(SHARED / "retinamnist.npz") as data:
        assert np.array_equal(volume.numpy(), data["train_images"][0].transpose(2, 1, 0))
        assert int(case.label) == int(data["train_labels"][0, 0])


def test_not_medmnist_and_multilabel_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ManifestError, match="not a MedMNIST file"):
        import_medmnist(tmp_path / "other.npz", tmp_path / "m.csv", tmp_path / "i", progress=False)
    arrays = {f"{s}_{k}": np.zeros((2, 4, 4) if k == "images" else (2, 14), np.uint8)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    with pytest.raises(ManifestError, match="multi-label"):
        import_medmnist(tmp_path / "chestmnist.npz", tmp_path / "m.csv", tmp_path / "i", progress=False)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ManifestError, match="not a readable .npz"):
        import_medmnist(tmp_path / "broken.npz", tmp_path / "m.csv", tmp_path / "i", progress=False)


def test_labels_outside_the_given_map_are_refused(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", classes=3)
    with pytest.raises(ManifestError, match=r"labels \[2\] are not in the label map"):
        import_medmnist(npz, tmp_path / "m.csv", tmp_path / "i", labels={0: "a", 1: "b"}, progress=False)
