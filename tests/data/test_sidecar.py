"""A built manifest remembers its root, task and labels (``<name>.meta.json``), so verify and plan
need no --root or --labels after ``manifest build``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import medseg
from medseg.data.sidecar import ManifestInfo, read_sidecar, sidecar_path, write_sidecar
from medseg.errors import ManifestError
from tests.conftest import write_msd_dataset


def test_the_root_is_kept_relative_to_the_manifest_and_resolved_against_it(tmp_path: Path) -> None:
    manifest = tmp_path / "manifests" / "x.csv"
    manifest.parent.mkdir()
    write_sidecar(manifest, ManifestInfo(root=tmp_path / "data", task="segmentation", labels={0: "bg", 1: "a"}))
    record = json.loads(sidecar_path(manifest).read_text())
    assert record["root"] == "../data" and record["labels"] == {"0": "bg", "1": "a"}
    info = read_sidecar(manifest)
    assert info is not None and info.root == (tmp_path / "data").resolve() and info.labels == {0: "bg", 1: "a"}


def test_a_manifest_without_a_sidecar_has_none_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    manifest = tmp_path / "x.csv"
    assert read_sidecar(manifest) is None
    sidecar_path(manifest).write_text("{not json")
    with pytest.raises(ManifestError, match=r"x\.meta\.json: not a manifest sidecar.*Build the manifest again"):
        read_sidecar(manifest)


def test_verify_right_after_manifest_build_needs_no_root_and_checks_the_labels(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEG_DATA_ROOT", raising=False)
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=4)
    manifest = tmp_path / "manifests" / "synthetic.csv"
    medseg.build_manifest(dataset, manifest)
    monkeypatch.chdir(tmp_path / "manifests")  # not where the data are
    report = medseg.verify(manifest, progress=False)
    assert report.ok, report.summary()
    # a label value outside dataset.json's map is now caught without --labels
    import nibabel as nib
    import numpy as np

    label = dataset / "labelsTr" / "case_000.nii.gz"
    image = nib.load(label)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), label)
    medseg.build_manifest(dataset, manifest)  # fresh hashes
    report = medseg.verify(manifest, progress=False)
    assert not report.ok and "7" in report.summary()


def test_a_class_folder_manifest_is_verified_as_class_indices_without_root(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from PIL import Image

    monkeypatch.delenv("MEDSEG_DATA_ROOT", raising=False)
    rng = np.random.default_rng(5)
    for name in ("benign", "malignant"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (21, 17), dtype=np.uint8)).save(tmp_path / "tree" / name / f"{i}.png")
    manifest = tmp_path / "m" / "tree.csv"
    medseg.build_manifest(tmp_path / "tree", manifest, val_fraction=0.34)
    info = read_sidecar(manifest)
    assert info is not None and info.class_labels and info.labels == {0: "benign", 1: "malignant"}
    report = medseg.verify(manifest, progress=False)
    assert report.ok, report.summary()
