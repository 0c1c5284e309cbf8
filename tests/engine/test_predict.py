"""``medseg predict`` on real and deliberately broken inputs, with a model trained here."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pydicom
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import main
from medseg.errors import CaseError, UsageError
from medseg.io.discovery import discover
from medseg.io.geometry import geometry_of
from medseg.io.readers import load_volume
from tests.conftest import HIPPO, TCIA, make_case, require


@pytest.fixture(scope="module")
def trained(trained_segmentation: dict[str, str]) -> dict[str, str]:
    return trained_segmentation


def _predict(trained: dict[str, str], input_dir: Path, output_dir: Path, *extra: str) -> int:
    return main(["predict", "--model", trained["model_uri"], "--input", str(input_dir), "--output", str(output_dir),
                 "--tracking-uri", trained["tracking_uri"], "--no-progress", *extra])


def _report(output_dir: Path, name: str = "predictions.csv") -> dict[str, dict[str, str]]:
    with open(output_dir / name, newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_nifti_masks_have_the_input_shape_and_affine(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((23, 31, 17), seed=11, spacing=(0.8, 1.3, 2.9))
    _save(inputs / "nested" / "oblique.nii.gz", image, affine)
    shutil.copy(require(HIPPO / "imagesTr" / "hippocampus_001.nii.gz"), inputs / "hippocampus_001.nii.gz")
    out = tmp_path / "out"
    assert _predict(trained, inputs, out) == 0
    report = _report(out)
    assert set(report) == {"nested__oblique", "hippocampus_001"}
    for case_id, source in (("nested__oblique", inputs / "nested" / "oblique.nii.gz"),
                            ("hippocampus_001", inputs / "hippocampus_001.nii.gz")):
        mask, original = nib.load(out / f"{case_id}.nii.gz"), nib.load(source)
        assert mask.shape == original.shape
        np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        row = report[case_id]
        assert row["status"] == "ok" and float(row["seconds"]) > 0
        data = np.asarray(mask.dataobj)
        voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
        assert int(row["voxels_blob1"]) == int((data == 1).sum())
        assert float(row["volume_ml_blob1"]) == pytest.approx((data == 1).sum() * voxel_ml, abs=1e-3)
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert summary["contract"]["labels"]["1"] == "blob1" and summary["peak_rss_mb"] > 0
    assert summary["source_run_id"] == trained["run_id"]


def test_dicom_series_mask_is_on_the_series_grid(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(require(TCIA / "T1post"), inputs / "PGBM-001" / "T1post")
    out = tmp_path / "out"
    assert _predict(trained, inputs, out) == 0
    (row,) = _report(out).values()
    assert row["case_id"] == "PGBM-001__T1post" and row["status"] == "ok"
    series = load_volume(inputs / "PGBM-001" / "T1post")
    mask = load_volume(out / "PGBM-001__T1post.nii.gz")
    assert tuple(mask.shape) == tuple(series.shape) == (1, 260, 320, 24)
    g_series, g_mask = geometry_of(series), geometry_of(mask)
    np.testing.assert_allclose(g_mask.spacing, g_series.spacing, atol=1e-4)
    np.testing.assert_allclose(g_mask.origin, g_series.origin, atol=1e-3)
    np.testing.assert_allclose(g_mask.direction, g_series.direction, atol=1e-4)

    # the DICOM SEG references the source series and holds the same mask, frame for frame
    seg = pydicom.dcmread(row["dicom_seg"])
    assert seg.Modality == "SEG"
    source_uid = pydicom.dcmread(next((inputs / "PGBM-001" / "T1post").glob("*.dcm"))).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["blob1", "blob2"]
    mask_array = mask.as_tensor()[0].numpy()
    n_frames_expected = sum(int((mask_array[:, :, k] == v).any()) for k in range(24) for v in (1, 2))
    assert n_frames_expected > 0, "the tiny model predicted nothing: the SEG check below would be empty"
    assert int(seg.NumberOfFrames) == n_frames_expected  # empty frames are omitted
    slice_of = {uid: k for k, uid in enumerate(_sop_uids_by_position(inputs / "PGBM-001" / "T1post"))}
    for frame, groups in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        segment = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[source]
        np.testing.assert_array_equal(frame.astype(bool), (mask_array[:, :, k] == segment).T)


def _sop_uids_by_position(folder: Path) -> list[str]:
    """SOPInstanceUIDs sorted along the slice normal, independently of medseg's reader."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.glob("*.dcm")]
    row, col = np.array(headers[0].ImageOrientationPatient[:3]), np.array(headers[0].ImageOrientationPatient[3:])
    normal = np.cross(row, col)
    return [h.SOPInstanceUID for h in sorted(headers, key=lambda h: float(np.dot(normal, h.ImagePositionPatient)))]


def _non_image_dicom(source: Path, target: Path) -> Path:
    ds = pydicom.dcmread(source)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def test_bad_inputs_fail_alone_and_the_batch_goes_on(trained, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((21, 25, 15), seed=3)
    good = _save(inputs / "good.nii.gz", image, affine)
    truncated = inputs / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (inputs / "not_an_image.nii.gz").write_text("patient list, not an image\n")
    _save(inputs / "flat2d.nii.gz", image[:, :, 0], affine)
    _save(inputs / "two_channels.nii.gz", np.stack([image, image], axis=-1), affine)
    mixed = inputs / "mixed_series"
    mixed.mkdir()
    for name in ("T1post", "T2reg"):
        for f in sorted(require(TCIA / name).glob("*.dcm"))[:3]:
            shutil.copy(f, mixed / f"{name}_{f.name}")
    report_dicom = _non_image_dicom(sorted((TCIA / "T1post").glob("*.dcm"))[0], inputs / "reports" / "sr.dcm")

    out = tmp_path / "out"
    assert _predict(trained, inputs, out) == 1
    printed = capsys.readouterr().out
    report = _report(out)
    assert report["good"]["status"] == "ok"
    expectations = {
        "truncated": ("truncated.nii.gz", "could not be read"),
        "not_an_image": ("not_an_image.nii.gz", "not gzip-compressed"),
        "flat2d": ("flat2d.nii.gz", "2D image"),
        "two_channels": ("two_channels.nii.gz", "expects 1 channel"),
        "mixed_series": ("mixed_series", "holds 2 DICOM image series"),
    }
    for case_id, (file_part, problem) in expectations.items():
        row = report[case_id]
        assert row["status"] == "failed", case_id
        assert file_part in row["error"] and problem in row["error"], row["error"]
        assert not (out / f"{case_id}.nii.gz").exists()
        assert f"FAILED {case_id}" in printed
    assert "reports__sr" not in report, "a non-image DICOM object is skipped, not a case"
    notes = json.loads((out / "predict_summary.json").read_text())["discovery_notes"]
    assert any(str(report_dicom) in n and "without an image" in n for n in notes)


def test_empty_folder_is_a_usage_error(trained, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert _predict(trained, tmp_path / "empty", tmp_path / "out") == 2
    assert "no scans found" in capsys.readouterr().err


def test_rerun_skips_finished_cases_unless_overwrite(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(2):
        image, _, affine = make_case((19, 23, 13), seed=20 + i)
        _save(inputs / f"c{i}.nii.gz", image, affine)
    out = tmp_path / "out"
    assert _predict(trained, inputs, out) == 0
    first_mtime = (out / "c0.nii.gz").stat().st_mtime_ns
    first_report = _report(out)
    assert _predict(trained, inputs, out) == 0
    rerun = _report(out)
    assert {r["status"] for r in rerun.values()} == {"skipped"}
    assert (out / "c0.nii.gz").stat().st_mtime_ns == first_mtime
    for case_id, row in rerun.items():  # volumes of finished cases stay in the report
        assert row["volume_ml_blob1"] == first_report[case_id]["volume_ml_blob1"]
    assert _predict(trained, inputs, out, "--overwrite") == 0
    assert {r["status"] for r in _report(out).values()} == {"ok"}


def test_an_interrupted_write_leaves_no_partial_file(trained, tmp_path: Path, monkeypatch) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((19, 23, 13), seed=30)
    _save(inputs / "case.nii.gz", image, affine)
    real_save = nib.save

    def save_then_die(img, filename):  # half a file on disk, then the process is interrupted
        real_save(img, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr("medseg.engine.case_io.nib.save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _predict(trained, inputs, tmp_path / "out", "--no-tracking")
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".gz" or ".tmp" in p.name]
    assert leftovers == []


def test_temp_files_of_a_killed_run_are_cleared_and_the_case_redone(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((19, 23, 13), seed=31)
    _save(inputs / "case.nii.gz", image, affine)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".case.nii.gz.abc123.tmp.nii.gz"  # what a SIGKILL between write and rename leaves
    stale.write_bytes(b"half a file")
    half_page = out / ".review.html.abc123.tmp.html"  # ... or one in the middle of the review page
    half_page.write_text("<html><body><table>")
    assert _predict(trained, inputs, out, "--no-tracking") == 0
    assert not stale.exists() and not half_page.exists()
    assert _report(out)["case"]["status"] == "ok"
    assert nib.load(out / "case.nii.gz").shape == (19, 23, 13)


def test_shards_split_the_folder_without_overlap(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(5):
        image, _, affine = make_case((17, 19, 11), seed=40 + i)
        _save(inputs / f"s{i}.nii.gz", image, affine)
    out = tmp_path / "out"
    seen: list[set[str]] = []
    for part in (0, 1):
        assert _predict(trained, inputs, out, "--num-parts", "2", "--part-id", str(part), "--no-tracking") == 0
        seen.append(set(_report(out, f"predictions_part{part}of2.csv")))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {f"s{i}" for i in range(5)}
    assert _predict(trained, inputs, out, "--num-parts", "2", "--part-id", "2") == 2


def test_tta_probabilities_and_local_model_folder(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((21, 23, 13), seed=50)
    _save(inputs / "p.nii.gz", image, affine)
    mlflow.set_tracking_uri(trained["tracking_uri"])
    local_model = Path(mlflow.artifacts.download_artifacts(trained["model_uri"], dst_path=str(tmp_path / "model")))
    out = tmp_path / "out"
    code = main(["predict", "--model", str(local_model), "--input", str(inputs), "--output", str(out), "--tta",
                 "--save-probabilities", "--keep-largest", "--no-progress", "--no-tracking"])
    assert code == 0
    probs = nib.load(out / "p_probabilities.nii.gz")
    assert probs.shape == (21, 23, 13, 3)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probs.affine, affine, atol=1e-5)
    labels = np.asarray(nib.load(out / "p.nii.gz").dataobj)
    argmax = np.asarray(probs.dataobj).argmax(-1)
    changed = labels != argmax
    assert np.all(labels[changed] == 0), "keep-largest may only remove voxels, never relabel them"


def test_model_without_contract_or_missing_is_refused(trained, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((15, 15, 9), seed=60)
    _save(inputs / "x.nii.gz", image, affine)
    assert main(["predict", "--model", "models:/does-not-exist/1", "--input", str(inputs), "--output",
                 str(tmp_path / "out"), "--tracking-uri", trained["tracking_uri"], "--no-progress"]) == 2
    assert "models:/does-not-exist/1: not found" in capsys.readouterr().err


def test_a_found_but_corrupt_model_is_a_failure_not_bad_usage(trained, tmp_path: Path, capsys) -> None:
    """A model folder whose weights file is damaged: exit 1 with what to do, not 2 ("bad usage")."""
    import mlflow

    mlflow.set_tracking_uri(trained["tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts(trained["model_uri"], dst_path=str(tmp_path / "model")))
    weights = folder / "data" / "medseg_model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    inputs = tmp_path / "in"
    image, _, affine = make_case((15, 15, 9), seed=61)
    _save(inputs / "x.nii.gz", image, affine)
    assert main(["predict", "--model", str(folder), "--input", str(inputs), "--output", str(tmp_path / "out"),
                 "--no-tracking", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "weights.safetensors" in err and "corrupt download" in err and "download or log the model again" in err.lower()


def test_inference_run_is_logged_and_linked_to_the_training_run(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((15, 17, 9), seed=70)
    _save(inputs / "x.nii.gz", image, affine)
    assert _predict(trained, inputs, tmp_path / "out", "--tracking-uri", trained["tracking_uri"]) == 0
    client = MlflowClient(trained["tracking_uri"])
    experiment = client.get_experiment_by_name("medseg-predict")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    latest = runs[0]
    assert latest.data.tags["source_run_id"] == trained["run_id"]
    assert latest.info.status == "FINISHED"
    assert latest.data.metrics["predict/ok"] == 1
    artifacts = {a.path for a in client.list_artifacts(latest.info.run_id)}
    assert {"predictions.csv", "predict_summary.json"} <= artifacts


def test_two_scans_with_one_case_id_both_fail_instead_of_overwriting(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    image, _, affine = make_case((15, 17, 9), seed=80)
    nib.save(nib.Nifti1Image(image, affine), _mkdir(inputs) / "scan.nii")
    _save(inputs / "scan.nii.gz", image, affine)
    _save(inputs / "other.nii.gz", image, affine)
    out = tmp_path / "out"
    assert _predict(trained, inputs, out, "--no-tracking") == 1
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    scan_rows = [r for r in rows if r["case_id"] == "scan"]
    assert len(scan_rows) == 2 and all(r["status"] == "failed" and "shared by" in r["error"] for r in scan_rows)
    assert not (out / "scan.nii.gz").exists()
    assert [r["status"] for r in rows if r["case_id"] == "other"] == ["ok"]


def test_bad_options_and_a_model_without_contract_are_usage_errors(trained, tmp_path: Path, capsys) -> None:
    import torch

    inputs = tmp_path / "in"
    image, _, affine = make_case((15, 15, 9), seed=90)
    _save(inputs / "x.nii.gz", image, affine)
    assert _predict(trained, inputs, tmp_path / "out", "--overlap", "1.0") == 2
    assert "--overlap 1.0: must be in [0, 1)" in capsys.readouterr().err
    assert _predict(trained, inputs, tmp_path / "out", "--device", "gpu") == 2
    assert "is not a device name" in capsys.readouterr().err

    mlflow.set_tracking_uri(trained["tracking_uri"])
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(torch.nn.Conv3d(1, 2, 1), name="plain", serialization_format="pickle")
    assert main(["predict", "--model", info.model_uri, "--input", str(inputs), "--output", str(tmp_path / "o2"),
                 "--tracking-uri", trained["tracking_uri"], "--no-progress", "--no-tracking"]) == 2
    assert "is a pickled model" in capsys.readouterr().err  # refused before anything is unpickled


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def predictor(trained) -> medseg.Predictor:
    return medseg.Predictor.from_uri(trained["model_uri"], device="cpu", tracking_uri=trained["tracking_uri"])


def test_predictor_gives_one_mask_for_a_file_a_metatensor_and_an_array(predictor, tmp_path: Path) -> None:
    image, _, affine = make_case((19, 23, 11), seed=80, spacing=(0.9, 1.2, 2.1))
    path = _save(tmp_path / "scan.nii.gz", image, affine)

    from_file = predictor.predict(path)
    from_tensor = predictor.predict(load_volume(path), case_id="scan")
    from_array = predictor.predict(np.asarray(nib.load(path).dataobj), affine=nib.load(path).affine, case_id="scan")

    assert from_file.case_id == "scan" and from_file.task == "segmentation"
    assert from_file.label_map is not None and from_file.label_map.shape == (19, 23, 11)
    np.testing.assert_allclose(from_file.affine, nib.load(path).affine, atol=1e-5)
    np.testing.assert_array_equal(from_tensor.label_map, from_file.label_map)
    np.testing.assert_array_equal(from_array.label_map, from_file.label_map)
    assert from_file.probabilities is not None and from_file.probabilities.shape == (3, 19, 23, 11)
    voxel_ml = abs(np.linalg.det(nib.load(path).affine[:3, :3])) / 1000
    assert set(from_file.volumes_ml) == {"blob1", "blob2"}
    assert from_file.volumes_ml["blob1"] == pytest.approx(from_file.voxels["blob1"] * voxel_ml)


def test_predictor_folder_returns_the_batch_report(predictor, tmp_path: Path) -> None:
    image, _, affine = make_case((15, 17, 9), seed=81)
    _save(tmp_path / "in" / "a.nii.gz", image, affine)
    (tmp_path / "in" / "b.nii.gz").write_bytes(b"not an image")
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    assert batch.counts == {"ok": 1, "failed": 1, "skipped": 0} and batch.n_failed == 1
    ok, failed = sorted(batch.results, key=lambda r: r.status != "ok")
    assert ok.case_id == "a" and Path(ok.outputs["output"]).is_file() and ok.values["voxels_blob1"] >= 0
    assert failed.case_id == "b" and "b.nii.gz: not a NIfTI image" in failed.error and "not gzip-compressed" in failed.error
    assert batch.summary_dict()["task"] == "segmentation"


def test_an_array_without_its_affine_or_of_the_wrong_rank_is_refused(predictor) -> None:
    with pytest.raises(UsageError, match="an array needs its affine"):
        predictor.predict(np.zeros((9, 9, 9), np.float32))
    with pytest.raises(UsageError, match=r"expected a 3D image as \(channels, \*spatial\) or \(\*spatial\), got shape"):
        predictor.predict(np.zeros((9, 9), np.float32), affine=np.eye(4))
    with pytest.raises(CaseError, match="the model expects 1 channel"):
        predictor.predict(np.random.default_rng(0).random((2, 9, 9, 9), np.float32), affine=np.eye(4),
                          case_id="two-channels")
    with pytest.raises(CaseError, match="blank: .*every voxel has the value 0"):  # a blank image is refused, named
        predictor.predict(np.zeros((9, 9, 9), np.float32), affine=np.eye(4), case_id="blank")


def test_options_a_segmentation_model_does_not_use_are_refused(trained, tmp_path: Path, capsys) -> None:
    with pytest.raises(UsageError, match="--measured: not used by a segmentation model"):
        medseg.Predictor.from_uri(trained["model_uri"], device="cpu", tracking_uri=trained["tracking_uri"],
                                  measured=True)
    image, _, affine = make_case((15, 15, 9), seed=82)
    _save(tmp_path / "in" / "x.nii.gz", image, affine)
    assert _predict(trained, tmp_path / "in", tmp_path / "out", "--measured") == 2
    assert "--measured: not used by a segmentation model" in capsys.readouterr().err


def test_input_dot_on_a_dicom_series_names_the_case_after_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--input .`` inside a series folder: the case is named after the folder, never a hidden '.'-file."""
    monkeypatch.chdir(require(TCIA / "T1post"))
    (case,) = discover(Path(".")).cases
    assert case.case_id == "T1post" and case.kind == "dicom_series"
