"""The batch promise under hostile inputs and faults: every bad scan fails alone with a message
naming it, the good ones are predicted, nothing half-written remains; full and read-only output
folders and concurrent predicts into one folder are reported, not crashed into."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.errors import RunError
from tests.conftest import make_case
from tests.fuzz.hostile import TALLY, bit_flipped, good_files, metaimage, raw_nifti, truncated


@pytest.fixture(scope="module")
def predictor(trained_segmentation: dict[str, str]) -> medseg.Predictor:
    return medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu",
                                     tracking_uri=trained_segmentation["tracking_uri"])


def _good_scan(path: Path, seed: int) -> Path:
    image, _, affine = make_case((15, 17, 9), seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def _hostile_folder(folder: Path, seed: int) -> dict[str, str]:
    """A folder mixing good scans with one hostile file of each class; returns case id -> class."""
    rng = random.Random(seed)
    kinds: dict[str, str] = {}
    for i in range(2):
        _good_scan(folder / f"good{i}.nii.gz", seed=100 + i)
        kinds[f"good{i}"] = "good"
    sources = good_files(folder.parent / "sources", seed)
    for suffix, source in sources.items():
        stem = suffix.strip(".").replace(".", "_")
        # DICOM files of one folder make one series: each damaged one gets a folder of its own
        where = (lambda name, sfx=suffix: folder / name / f"{name}{sfx}") if suffix == ".dcm" else (
            lambda name, sfx=suffix: folder / f"{name}{sfx}")
        for name in (f"empty_{stem}", f"cut_{stem}", f"flip_{stem}"):
            where(name).parent.mkdir(parents=True, exist_ok=True)
        case_id = (lambda name: f"{name}__{name}") if suffix == ".dcm" else (lambda name: name)
        where(f"empty_{stem}").write_bytes(b"")
        kinds[case_id(f"empty_{stem}")] = "empty"
        truncated(source, where(f"cut_{stem}"), rng.uniform(0.05, 0.9))
        kinds[case_id(f"cut_{stem}")] = "truncated"
        bit_flipped(source, where(f"flip_{stem}"), rng, flips=4)
        kinds[case_id(f"flip_{stem}")] = "bit-flipped (may read)"
    raw_nifti(folder / "huge.nii.gz", None, shape=(2000, 2000, 2000), payload=bytes(4096))
    raw_nifti(folder / "nan.nii.gz", np.full((15, 17, 9), np.nan, np.float32))
    raw_nifti(folder / "inf.nii.gz", np.where(np.arange(15 * 17 * 9).reshape(15, 17, 9) % 7 == 0, np.inf, 1.0)
              .astype(np.float32))
    raw_nifti(folder / "constant.nii.gz", np.full((15, 17, 9), 42.0, np.float32))
    raw_nifti(folder / "zero_spacing.nii.gz", np.ones((15, 17, 9), np.float32) * np.arange(9, dtype=np.float32),
              pixdim=[0.0, 1.0, 1.0], sform_code=0)
    metaimage(folder / "lying.mha", np.zeros(8, np.float32), dim_size=(300, 300, 300))
    kinds.update({"huge": "lying header", "nan": "NaN", "inf": "Inf", "constant": "constant",
                  "zero_spacing": "zero spacing", "lying": "lying header"})
    return kinds


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_hostile_scans_fail_alone_and_nothing_half_written_remains(predictor: medseg.Predictor, tmp_path: Path) -> None:
    kinds = _hostile_folder(tmp_path / "in", seed=3)
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    results = {r.case_id: r for r in batch.results}
    assert set(results) == set(kinds)
    for case_id, kind in kinds.items():
        result = results[case_id]
        if kind == "good":
            assert result.status == "ok", result.error
        elif kind.endswith("(may read)") and result.status == "ok":
            TALLY.add("predict: " + kind, "predicted")
            continue
        else:
            assert result.status == "failed", (case_id, kind)
            assert Path(result.input).name in result.error, result.error
            assert "applying transform" not in result.error and "object at 0x" not in result.error, result.error
            assert not (tmp_path / "out" / f"{case_id}.nii.gz").exists(), f"{case_id}: an output for a failed case"
        TALLY.add("predict: " + kind, "failed alone" if result.status == "failed" else "predicted")
    assert "29.8 GiB" in results["huge"].error and "NaN" in results["nan"].error
    assert "every voxel has the value 42" in results["constant"].error
    assert "0 bytes" in results["empty_nii_gz"].error
    assert not _temporaries(tmp_path / "out")


def test_a_nan_volume_is_not_predicted_as_if_it_were_fine(predictor: medseg.Predictor, tmp_path: Path) -> None:
    """Regression: a volume full of NaN was predicted with status ok and an empty mask."""
    raw_nifti(tmp_path / "in" / "nan.nii.gz", np.full((15, 17, 9), np.nan, np.float32))
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    (result,) = batch.results
    assert result.status == "failed" and "1 of" not in result.error and "2295 of 2295 voxels are not finite" in result.error
    assert not (tmp_path / "out" / "nan.nii.gz").exists()


def test_constant_images_are_predicted_when_allowed(trained_segmentation: dict[str, str], tmp_path: Path) -> None:
    allowed = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu", allow_constant=True,
                                        tracking_uri=trained_segmentation["tracking_uri"])
    raw_nifti(tmp_path / "in" / "constant.nii.gz", np.full((15, 17, 9), 42.0, np.float32))
    (result,) = allowed.predict_folder(tmp_path / "in", tmp_path / "out", progress=False).results
    assert result.status == "ok", result.error


def test_empty_and_huge_header_messages_say_what_was_found(predictor: medseg.Predictor, tmp_path: Path) -> None:
    """Regression: both reported "RuntimeError: applying transform <LoadImaged object at 0x...>"."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.nii.gz").write_bytes(b"")
    raw_nifti(tmp_path / "in" / "huge.nii", None, shape=(2000, 2000, 2000), payload=bytes(4096))
    results = {r.case_id: r.error for r in predictor.predict_folder(tmp_path / "in", tmp_path / "out",
                                                                     progress=False).results}
    assert "the file is empty (0 bytes)" in results["empty"]
    assert "shape (2000, 2000, 2000), which needs 29.8 GiB" in results["huge"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_full_or_unwritable_output_folder_fails_the_case_cleanly(predictor: medseg.Predictor, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    for i in range(3):
        _good_scan(tmp_path / "in" / f"scan{i}.nii.gz", seed=200 + i)
    real_save = nib.save
    calls = {"n": 0}

    def save_failing_once(img: object, path: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second case's mask: the disk is full (or the folder unwritable) then
            Path(str(path)).write_bytes(b"partial")  # what a write cut short leaves behind
            raise OSError(code, os.strerror(code), str(path))
        real_save(img, path)

    monkeypatch.setattr(nib, "save", save_failing_once)
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    statuses = [r.status for r in batch.results]
    assert statuses == ["ok", "failed", "ok"]
    error = batch.results[1].error
    assert "scan1.nii.gz" in error and os.strerror(code) in error and "finished cases are skipped" in error, error
    assert not (tmp_path / "out" / "scan1.nii.gz").exists() and not _temporaries(tmp_path / "out")
    monkeypatch.setattr(nib, "save", real_save)
    again = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)  # space is back
    assert [r.status for r in again.results] == ["skipped", "ok", "skipped"]
    TALLY.add("predict: full or unwritable output folder", "failed alone")


def test_an_output_folder_that_cannot_be_written_is_refused_up_front(predictor: medseg.Predictor, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _good_scan(tmp_path / "in" / "scan.nii.gz", seed=210)
    (tmp_path / "out").mkdir()
    real_open = os.open

    def read_only_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".lock") and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("os.open", read_only_open)
    with pytest.raises(RunError, match=r"--output .*out: cannot write there \(Read-only file system\)"):
        predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)


def test_a_second_predict_into_the_same_folder_is_refused_while_the_first_runs(predictor: medseg.Predictor,
                                                                               tmp_path: Path) -> None:
    _good_scan(tmp_path / "in" / "scan.nii.gz", seed=220)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".medseg_predict.lock", "a+") as held:  # what a running predict holds
        held.write("medseg predict (pid 1 on elsewhere, since 2026-12-01 10:00:00)")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match=r"medseg predict \(pid 1 on elsewhere.*is predicting into this folder now"):
            predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)  # released: it runs
    assert batch.counts["ok"] == 1


def test_two_real_predict_processes_into_one_folder_leave_every_output_whole(trained_segmentation: dict[str, str],
                                                                             tmp_path: Path) -> None:
    for i in range(4):
        _good_scan(tmp_path / "in" / f"scan{i}.nii.gz", seed=230 + i)
    command = [sys.executable, "-m", "medseg", "predict", "--model", trained_segmentation["model_uri"],
               "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--device", "cpu",
               "--no-progress", "--tracking-uri", trained_segmentation["tracking_uri"], "--no-tracking"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    for code, stderr in outcomes:  # each either did the work or was refused with the reason
        assert code == 0 or (code == 1 and "is predicting into this folder now" in stderr), stderr[-2000:]
    assert any(code == 0 for code, _ in outcomes)
    for i in range(4):
        assert nib.load(tmp_path / "out" / f"scan{i}.nii.gz").shape == (15, 17, 9)
    assert not _temporaries(tmp_path / "out")
    TALLY.add("predict: concurrent predicts into one folder", "refused or done")


def test_only_failures_to_write_into_the_output_folder_are_reported_as_write_failures(tmp_path: Path) -> None:
    from medseg.engine.predict import _is_write_failure

    out = tmp_path / "out"
    out.mkdir()
    assert _is_write_failure(OSError(errno.ENOSPC, "No space left on device"), out)
    assert _is_write_failure(OSError(errno.EACCES, "Permission denied", str(out / ".x.tmp.nii.gz")), out)
    # an input that cannot be opened keeps its own cause, not "writing its output ... failed"
    assert not _is_write_failure(OSError(errno.EACCES, "Permission denied", str(tmp_path / "in" / "scan.dcm")), out)
