"""The synthetic CT writer: files read back (SimpleITK, highdicom, medseg's reader) as generated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.data.synthetic import LABELS, synthetic_ct_case, write_synthetic_ct
from medseg.io.readers import load_volume, lps_to_ras

SHAPE = (40, 36, 6)
SPACING = (0.7, 0.7, 5.0)
N_CASES = 4
SEED = 0  # the lesion is in cases 2 (DICOM) and 3 (NRRD), not in 0 (DICOM) and 1 (NRRD)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("highdicom")
    root = tmp_path_factory.mktemp("synthetic_ct")
    return root, write_synthetic_ct(root, n_cases=N_CASES, seed=SEED, shape=SHAPE)


def _intended(summary: dict, index: int):  # the case as generated, independent of any file
    return synthetic_ct_case(index, SEED, SHAPE, SPACING, lesion=summary["cases"][index]["has_lesion"])


def _expected_ras_affine(case: dict) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(case["direction"]).reshape(3, 3) @ np.diag(case["spacing"])
    affine[:3, 3] = case["origin"]
    return lps_to_ras(affine)


def test_layout_and_dataset_json(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert sorted(p.name for p in root.iterdir()) == ["case_000", "case_001", "case_002", "case_003", "dataset.json"]
    assert (root / "case_000" / "image").is_dir() and (root / "case_000" / "label.dcm").is_file()
    assert sorted(p.name for p in (root / "case_001").iterdir()) == ["image.nrrd", "label.nrrd"]
    info = json.loads((root / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "CT"}
    assert info["labels"] == {"background": 0, "organ": 1, "vessel": 2, "lesion": 3}
    assert info["numTraining"] == N_CASES and info["file_ending"] == "mixed"
    assert "seeded synthetic" in info["description"].lower()
    for case_id, files in info["dataset"].items():
        assert (root / files["images"][0]).exists() and (root / files["label"]).exists(), case_id


def test_nrrd_case_round_trips_with_geometry(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    intended = _intended(summary, 1)
    image = sitk.ReadImage(str(root / "case_001" / "image.nrrd"))
    label = sitk.ReadImage(str(root / "case_001" / "label.nrrd"))
    assert label.GetPixelID() == sitk.sitkUInt8
    for read in (image, label):
        np.testing.assert_allclose(read.GetSpacing(), SPACING)
        np.testing.assert_allclose(read.GetDirection(), intended.direction, atol=1e-6)
        np.testing.assert_allclose(read.GetOrigin(), intended.origin, atol=1e-6)
    assert not np.allclose(image.GetDirection(), np.eye(3).ravel())  # rotated about z
    assert np.linalg.norm(image.GetOrigin()) > 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), intended.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label).transpose(2, 1, 0), intended.label)


def test_dicom_series_round_trips_with_geometry(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    intended = _intended(summary, 0)
    folder = root / "case_000" / "image"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert image.GetSize() == intended.image.shape
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), intended.direction, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), intended.origin, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), intended.image)  # HU
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    assert len(headers) == intended.image.shape[2]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert len({str(h.get(key)) for h in headers}) == 1, key
    first = headers[0]
    assert first.Modality == "CT" and first.PatientID == "case_000"
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    assert first.PixelRepresentation == 1 and first.BitsAllocated == 16
    assert [float(v) for v in first.PixelSpacing] == [0.7, 0.7] and float(first.SliceThickness) == 5.0
    # each case has its own patient and study
    other = pydicom.dcmread(next((root / "case_002" / "image").iterdir()), stop_before_pixels=True)
    assert other.PatientID != first.PatientID and other.StudyInstanceUID != first.StudyInstanceUID


@pytest.mark.parametrize("index", [0, 2])
def test_dicom_seg_holds_every_frame_and_the_intended_labels(dataset: tuple[Path, dict], index: int) -> None:
    hd = pytest.importorskip("highdicom")
    root, summary = dataset
    intended = _intended(summary, index)
    case_dir = root / summary["cases"][index]["case_id"]
    seg = hd.seg.segread(case_dir / "label.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True)
               for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case_dir / "image"))]
    n_slices = intended.label.shape[2]
    assert len(sources) == n_slices
    assert seg.segmentation_type.value == "BINARY"
    assert list(seg.segment_numbers) == [1, 2, 3]
    assert [seg.get_segment_description(v).segment_label for v in (1, 2, 3)] == [LABELS[v] for v in (1, 2, 3)]
    # BINARY SEG: one frame per slice per segment, empty ones included (the lesion's, in every case)
    assert seg.number_of_frames == 3 * n_slices
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True)
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), intended.label)  # (slices, rows, cols) -> x, y, z


def test_classes_rare_lesion_absent_from_some_cases(dataset: tuple[Path, dict]) -> None:
    _, summary = dataset
    lesion = [c["has_lesion"] for c in summary["cases"]]
    assert lesion == [False, False, True, True]  # both formats with and without the lesion
    assert summary["lesion_cases"] == [c["case_id"] for c in summary["cases"]
                                                                        if c["has_lesion"]]
    fractions = summary["class_fractions"]
    assert fractions["organ"] > 0.01 and fractions["organ"] > 2 * fractions["vessel"] > 0
    assert 0 < fractions["lesion"] < min(0.005, fractions["vessel"] / 2)
    for case in summary["cases"]:
        assert case["voxels"]["organ"] > 0 and case["voxels"]["vessel"] > 0
        assert (case["voxels"]["lesion"] > 0) == case["has_lesion"]
    shapes = {tuple(c["shape"]) for c in summary["cases"]}
    assert len(shapes) > 1  # sizes vary per case


def test_default_size_lesion_is_well_under_a_thousandth() -> None:
    case = synthetic_ct_case(5, seed=0)
    assert 112 <= case.image.shape[0] <= 144 and 112 <= case.image.shape[1] <= 144
    assert 20 <= case.image.shape[2] <= 28
    assert 0 < np.mean(case.label == 3) < 5e-4
    assert np.mean(case.label == 1) > 0.015
    body = case.image > -500
    assert case.image[~body].mean() < -950  # air outside the body
    means = {v: case.image[case.label == v].mean() for v in (1, 2)}
    assert 40 < means[1] < 80 and 140 < means[2] < 200


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a, b, c = (synthetic_ct_case(1, seed, SHAPE) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_nrrd_and_dicom_load_to_the_ras_affine(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    for index in (0, 1):
        case = summary["cases"][index]
        volume = load_volume(root / case["image"])
        assert tuple(volume.shape) == (1, *case["shape"])
        np.testing.assert_allclose(volume.affine.numpy(), _expected_ras_affine(case), atol=1e-5)
        np.testing.assert_array_equal(volume[0].numpy(), _intended(summary, index).image)


def test_rewrite_replaces_case_folders_and_leaves_no_temporaries(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    write_synthetic_ct(tmp_path, n_cases=2, seed=1, shape=(16, 12, 3))
    (tmp_path / "case_001" / "stray.txt").write_text("old")
    write_synthetic_ct(tmp_path, n_cases=2, seed=1, shape=(16, 12, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_000", "case_001", "dataset.json"]
    assert not (tmp_path / "case_001" / "stray.txt").exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_cases=0"):
        write_synthetic_ct(tmp_path, n_cases=0)
    with pytest.raises(ValueError, match=r"shape=\(4, 4, 1\)"):
        synthetic_ct_case(0, shape=(4, 4, 1))
