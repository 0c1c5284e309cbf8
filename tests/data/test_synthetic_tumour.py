"""The BraTS-like tumour writer: nnU-Net v2 layout, exact nesting, seeded, and read as two channels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.data.layouts import detect_layout
from medseg.data.synthetic import TUMOUR_LABELS, synthetic_tumour_case, write_synthetic_tumour_dataset
from medseg.planning import rules
from medseg.planning.fingerprint import class_shells

REPO = Path(__file__).resolve().parents[2]
SHAPE = (27, 24, 17)  # odd, small: every structure at its minimum size
SPACING = (1.2, 1.2, 2.0)
NECROSIS, EDEMA, ENHANCING = 1, 2, 3
FULL = np.ones((3, 3, 3), dtype=bool)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_tumour_dataset(tmp_path_factory.mktemp("tumour"), n_train=2, n_test=1, shape=SHAPE)


def _labels(root: Path) -> list[np.ndarray]:
    return [np.asarray(nib.load(p).dataobj) for p in sorted(root.glob("labels*/case_*.nii.gz"))]


def test_nnunet_v2_layout_and_dataset_json(dataset: Path) -> None:
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "case_000_0000.nii.gz", "case_000_0001.nii.gz", "case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == ["case_002_0000.nii.gz", "case_002_0001.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == ["case_002.nii.gz"]
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "FLAIR", "1": "T1c"}
    assert info["labels"] == {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}
    assert info["numTraining"] == 2 and info["file_ending"] == ".nii.gz"


def test_files_carry_the_spacing_and_a_tilted_affine(dataset: Path) -> None:
    flair = nib.load(dataset / "imagesTr" / "case_000_0000.nii.gz")
    label = nib.load(dataset / "labelsTr" / "case_000.nii.gz")
    assert flair.shape == SHAPE and flair.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(flair.header.get_zooms(), SPACING, rtol=1e-5)
    np.testing.assert_allclose(label.affine, flair.affine)
    assert not np.allclose(flair.affine[:3, :3], np.diag(SPACING))  # rotated
    assert int(flair.header["qform_code"]) == int(flair.header["sform_code"]) == 1


def test_every_label_nests_exactly(dataset: Path) -> None:
    for label in _labels(dataset):
        assert set(np.unique(label)) == {0, 1, 2, 3}
        core = np.isin(label, (NECROSIS, ENHANCING))
        # the necrosis' neighbours (26-connected) are necrosis or enhancing rim; the core's are tumour
        assert np.isin(label[ndimage.binary_dilation(label == NECROSIS, FULL)], (NECROSIS, ENHANCING)).all()
        assert (label[ndimage.binary_dilation(core, FULL)] > 0).all()
        assert rules.containment_tree({v: {k: n / sum(s.values()) for k, n in s.items()}
                                       for v, s in class_shells(label).items()}) == {1: 3, 2: None, 3: 2}


def test_enhancing_has_many_small_components_at_the_default_size() -> None:
    case = synthetic_tumour_case(0, seed=0)
    sizes = np.bincount(ndimage.label(case.label == ENHANCING)[0].ravel())[1:]
    assert len(sizes) >= 4 and (sizes <= 30).sum() >= 3  # satellites beside the rims
    assert case.label.shape == (64, 64, 48)


def test_intensities_are_learnable_but_overlap() -> None:
    case = synthetic_tumour_case(1, seed=0)
    label, flair, t1c = case.label, case.flair, case.t1c
    brain = flair > 0
    assert (t1c[~brain] == 0).all() and brain.mean() < 0.6  # skull-stripped: zero outside
    normal = brain & (label == 0)
    assert np.median(flair[label == EDEMA]) > np.median(flair[normal])
    assert np.median(t1c[label == ENHANCING]) > np.median(t1c[normal]) > np.median(t1c[label == NECROSIS])
    # no threshold separates them: some normal brain is brighter on T1c than the median enhancing voxel
    assert (t1c[normal] > np.median(t1c[label == ENHANCING])).any()
    assert (flair[normal] > np.median(flair[label == EDEMA])).any()


def test_the_seed_fixes_every_voxel(dataset: Path, tmp_path: Path) -> None:
    again = write_synthetic_tumour_dataset(tmp_path / "again", n_train=2, n_test=1, shape=SHAPE)
    for path in sorted(dataset.glob("*/case_*.nii.gz")):
        twin = again / path.relative_to(dataset)
        np.testing.assert_array_equal(np.asarray(nib.load(twin).dataobj), np.asarray(nib.load(path).dataobj))
    other = synthetic_tumour_case(0, seed=1, shape=SHAPE)
    assert not np.array_equal(other.label, synthetic_tumour_case(0, seed=0, shape=SHAPE).label)


def test_a_smaller_rewrite_removes_the_extra_cases(dataset: Path, tmp_path: Path) -> None:
    root = write_synthetic_tumour_dataset(tmp_path / "shrink", n_train=2, n_test=1, shape=SHAPE)
    write_synthetic_tumour_dataset(root, n_train=1, n_test=0, shape=SHAPE)
    assert sorted(p.name for p in root.glob("*/case_*")) == ["case_000.nii.gz", "case_000_0000.nii.gz",
                                                             "case_000_0001.nii.gz"]
    assert not list(root.glob("**/.*"))  # no temporaries left


def test_detect_layout_finds_two_channels_and_three_labels(dataset: Path) -> None:
    layout = detect_layout(dataset)
    assert layout.kind == "nnunet" and layout.task_hint == "segmentation"
    assert layout.channel_names == ["FLAIR", "T1c"]
    assert layout.labels == TUMOUR_LABELS and len([v for v in layout.labels if v != 0]) == 3
    assert all(len(c.images) == 2 for c in layout.cases)
    train = [c.case_id for c in layout.cases if c.split != "test"]
    assert train == ["case_000", "case_001"]


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_train=0, n_test=1: need at least one training case"):
        write_synthetic_tumour_dataset(tmp_path, n_train=0, n_test=1)
    with pytest.raises(ValueError, match=r"shape=\(8, 64, 48\): expected \(x, y, z\) with every size >= 16"):
        synthetic_tumour_case(0, shape=(8, 64, 48))
    with pytest.raises(ValueError, match=r"spacing=\(1.0, 0.0, 1.0\): expected three positive sizes"):
        synthetic_tumour_case(0, spacing=(1.0, 0.0, 1.0))


def test_make_datasets_tumour_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_datasets", REPO / "benchmarks" / "make_datasets.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "tumour"
    assert script.main(["tumour", "--out", str(out), "--train", "1", "--test", "1", "--shape", "20,18,16",
                        "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 training + 1 test cases (FLAIR, T1c)" in printed and "enhancing" in printed
    assert (out / "labelsTs" / "case_001.nii.gz").is_file()
    assert script.main(["tumour", "--out", str(out), "--train", "0"]) == 1
    assert "need at least one training case" in capsys.readouterr().err
