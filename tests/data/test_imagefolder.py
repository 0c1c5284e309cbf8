"""MedMNIST -> ImageFolder PNG tree: counts per split and class, pixels and orientation kept."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.imagefolder import write_imagefolder_from_medmnist
from medseg.errors import ManifestError
from tests.conftest import REPO, SHARED_DATA, require, write_medmnist_npz

COUNTS = {"train": 10, "val": 4, "test": 6}


def _tree(out: Path) -> Counter:
    """(split, class) -> number of PNGs on disk."""
    return Counter((p.parts[-3], p.parts[-2]) for p in out.glob("*/*/*.png"))


@pytest.mark.parametrize("shape", [(21, 17), (21, 17, 3)], ids=["grey", "rgb"])
def test_tree_counts_and_pixels_match_the_npz(tmp_path: Path, shape: tuple[int, ...]) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", shape, counts=tuple(COUNTS.values()), classes=3)
    result = write_imagefolder_from_medmnist(npz, tmp_path / "png")
    names = {0: "class_0", 1: "class_1", 2: "class_2"}
    assert result["labels"] == names and result["class_to_idx"] == {"class_0": 0, "class_1": 1, "class_2": 2}
    assert result["channels"] == (3 if len(shape) == 3 else 1) and result["size"] == [21, 17]
    with np.load(npz) as data:
        expected = Counter((split, names[int(k)]) for split in COUNTS for k in data[f"{split}_labels"][:, 0])
        assert _tree(tmp_path / "png") == expected
        assert {s: sum(c.values()) for s, c in result["counts"].items()} == COUNTS
        for split in COUNTS:
            for index, (image, (k,)) in enumerate(zip(data[f"{split}_images"], data[f"{split}_labels"])):
                with Image.open(tmp_path / "png" / split / names[int(k)] / f"{split}_{index:05d}.png") as png:
                    assert png.mode == ("RGB" if len(shape) == 3 else "L")
                    assert png.size == (17, 21)  # (width = columns, height = rows): row 0 is the top row
                    np.testing.assert_array_equal(np.asarray(png), image)


def test_real_pneumoniamnist_with_a_limit(tmp_path: Path) -> None:
    npz = require(SHARED_DATA / "medmnist" / "pneumoniamnist.npz")
    result = write_imagefolder_from_medmnist(npz, tmp_path / "png", limit_per_split=6)
    assert result["labels"] == {0: "normal", 1: "pneumonia"}
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["medmnist_imagefolder.json", "test", "train", "val"]
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (tmp_path / "png" / split).iterdir()) == ["normal", "pneumonia"]
    with np.load(npz) as data:
        for split in ("train", "val", "test"):
            labels = data[f"{split}_labels"][:6, 0]
            assert result["counts"][split] == {"normal": int((labels == 0).sum()), "pneumonia": int((labels == 1).sum())}
        first = tmp_path / "png" / "train" / result["labels"][int(data["train_labels"][0, 0])] / "train_00000.png"
        with Image.open(first) as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), data["train_images"][0])
    assert sum(_tree(tmp_path / "png").values()) == 18


def test_rewrite_with_a_smaller_limit_leaves_no_old_files(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(10, 4, 6))
    write_imagefolder_from_medmnist(npz, tmp_path / "png")
    result = write_imagefolder_from_medmnist(npz, tmp_path / "png", limit_per_split=2)
    assert sum(_tree(tmp_path / "png").values()) == 6
    assert all(sum(c.values()) == 2 for c in result["counts"].values())


def test_custom_labels_and_refusals(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(4, 2, 2))
    result = write_imagefolder_from_medmnist(npz, tmp_path / "png", labels={0: "healthy", 1: "sick"})
    assert set(result["counts"]["train"]) == {"healthy", "sick"}
    with pytest.raises(ManifestError, match=r"labels \[1\] are not in the label map"):
        write_imagefolder_from_medmnist(npz, tmp_path / "x", labels={0: "healthy"})
    with pytest.raises(ManifestError, match="plain folder names"):
        write_imagefolder_from_medmnist(npz, tmp_path / "x", labels={0: "../up", 1: "sick"})
    volume_npz = write_medmnist_npz(tmp_path / "toymnist3d.npz", (9, 12, 7), counts=(2, 2, 2))
    with pytest.raises(ManifestError, match="3D MedMNIST file .* 2D pictures only"):
        write_imagefolder_from_medmnist(volume_npz, tmp_path / "x")
    with pytest.raises(ManifestError, match="file not found"):
        write_imagefolder_from_medmnist(tmp_path / "missing.npz", tmp_path / "x")


def test_make_datasets_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_datasets", REPO / "benchmarks" / "make_datasets.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(4, 2, 2))
    assert script.main(["imagefolder", "--npz", str(npz), "--out", str(tmp_path / "png"), "--labels", "0=a,1=b",
                        "--limit-per-split", "3", "--no-progress"]) == 0
    assert "wrote 7 grey PNGs (21 x 17)" in capsys.readouterr().out
    assert sum(_tree(tmp_path / "png").values()) == 7
    volume_npz = write_medmnist_npz(tmp_path / "toymnist3d.npz", (9, 12, 7), counts=(2, 2, 2))
    assert script.main(["imagefolder", "--npz", str(volume_npz), "--out", str(tmp_path / "x")]) == 1
    assert "2D pictures only" in capsys.readouterr().err
