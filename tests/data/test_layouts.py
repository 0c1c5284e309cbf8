"""Dataset layouts found on disk: what detect_layout reports and how build_manifest uses it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.data.build import build_manifest, build_manifest_from_layout
from medseg.data.layouts import detect_layout
from medseg.data.manifest import read_manifest
from medseg.errors import ManifestError
from tests.conftest import make_case


def _png(path: Path, seed: int, shape: tuple[int, int] = (9, 13)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def test_imagefolder_classes_are_sorted_folder_names(tmp_path: Path) -> None:
    for cls, n in (("pneumonia", 3), ("normal", 2)):
        for i in range(n):
            _png(tmp_path / cls / f"img{i}.png", seed=i + 10 * n)
    layout = detect_layout(tmp_path)
    assert layout.kind == "imagefolder" and layout.task_hint == "classification"
    assert layout.labels == {0: "normal", 1: "pneumonia"}
    assert sorted(c.label for c in layout.cases) == ["0", "0", "1", "1", "1"]
    assert all(c.split == "" for c in layout.cases)
    text = layout.describe()
    assert "5 case(s)" in text and "0 normal (2)" in text and "1 pneumonia (3)" in text and "image2d" in text


def test_imagefolder_with_splits_keeps_them_in_the_manifest(tmp_path: Path) -> None:
    seed = 0
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                seed += 1
                _png(tmp_path / "data" / split / cls / f"{i}.png", seed=seed)
    layout = detect_layout(tmp_path / "data")
    assert layout.kind == "imagefolder_splits"
    assert {c.split for c in layout.cases} == {"train", "val", "test"}
    manifest = build_manifest_from_layout(layout, tmp_path / "m.csv", val_fraction=0.5)
    assert sorted(c.split for c in read_manifest(tmp_path / "m.csv").cases) == sorted(c.split for c in layout.cases)
    assert [c.case_id for c in manifest.split("val")] == ["val__a__0", "val__b__0"]


def test_imagefolder_with_one_class_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "cats" / "x.png", seed=1)
    with pytest.raises(ManifestError, match=r"Expected at least two class folders.*Got 1: \['cats'\]"):
        detect_layout(tmp_path)


def test_csv_with_class_names_and_splits(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "labels.csv").write_text("path,label,split\nimg/0.png,malignant,train\nimg/1.png,benign,train\n"
                                         "img/2.png,benign,val\nimg/3.png,malignant,test\n")
    for source in (tmp_path, tmp_path / "labels.csv"):
        layout = detect_layout(source)
        assert layout.kind == "csv" and layout.root == tmp_path
        assert layout.labels == {0: "benign", 1: "malignant"}
        assert [(c.case_id, c.label, c.split) for c in layout.cases] == [
            ("0", "1", "train"), ("1", "0", "train"), ("2", "0", "val"), ("3", "1", "test")]
    manifest = build_manifest(tmp_path / "labels.csv", tmp_path / "m.csv")
    assert [c.split for c in manifest.cases] == ["train", "train", "val", "test"]


def test_csv_row_with_a_missing_file_names_the_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", seed=1)
    (tmp_path / "data.csv").write_text("path,label\na.png,0\nmissing.png,1\n")
    with pytest.raises(ManifestError, match=r"data\.csv:3: Expected the image missing\.png.*no such file.*line 3"):
        detect_layout(tmp_path)


def test_case_folders_with_nrrd_nifti_and_dataset_json(tmp_path: Path) -> None:
    import SimpleITK as sitk

    image, label, affine = make_case((11, 9, 7), seed=3)
    _nii(tmp_path / "c1" / "image.nii.gz", image, affine)
    _nii(tmp_path / "c1" / "label.nii.gz", label, affine)
    (tmp_path / "c2").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image.T.copy()), str(tmp_path / "c2" / "image.nrrd"))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                      "labels": {"background": 0, "liver": 1, "tumour": 2}}))
    layout = detect_layout(tmp_path)
    assert layout.kind == "case_folders" and layout.task_hint == "segmentation"
    assert [(c.case_id, c.label) for c in layout.cases] == [("c1", "c1/label.nii.gz"), ("c2", None)]
    assert layout.channel_names == ["CT"] and layout.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert any("1 case(s) have no label" in n for n in layout.notes)
    assert "nifti (1 file(s)), nrrd (1 file(s))" in layout.describe()


def test_case_folder_with_two_images_is_refused(tmp_path: Path) -> None:
    image, _, affine = make_case((7, 7, 5), seed=4)
    _nii(tmp_path / "c1" / "image.nii.gz", image, affine)
    _nii(tmp_path / "c1" / "image.nii", image, affine)
    with pytest.raises(ManifestError, match=r"c1: Expected one image per case folder.*Got 2"):
        detect_layout(tmp_path)


def test_nnunet_layout_reads_channel_names_and_labels(tmp_path: Path) -> None:
    image, label, affine = make_case((9, 8, 7), seed=5)
    for case in ("a", "b"):
        _nii(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        _nii(tmp_path / "imagesTr" / f"{case}_0001.nii.gz", image, affine)
    _nii(tmp_path / "labelsTr" / "a.nii.gz", label, affine)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"1": "T2", "0": "T1"},
                                                      "labels": {"background": 0, "x": 1}}))
    layout = detect_layout(tmp_path)
    assert layout.kind == "nnunet" and layout.channel_names == ["T1", "T2"] and layout.labels == {0: "background", 1: "x"}
    assert [len(c.images) for c in layout.cases] == [2, 2]
    assert "1 case(s) have no label (b)" in " ".join(layout.notes)


def test_msd_modality_names(tmp_path: Path) -> None:
    image, label, affine = make_case((9, 8, 7), seed=6)
    _nii(tmp_path / "imagesTr" / "a.nii.gz", image, affine)
    _nii(tmp_path / "labelsTr" / "a.nii.gz", label, affine)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "hippo"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    layout = detect_layout(tmp_path)
    assert layout.kind == "msd" and layout.channel_names == ["MRI"] and layout.labels == {0: "background", 1: "hippo"}
