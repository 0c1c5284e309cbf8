"""``predict --output`` at an fsspec URI (fsspec's ``memory://`` file system, shared by this process;
``file://`` URIs): the destination gets the local folder's files byte for byte, each put whole; a
rerun predicts only the cases whose outputs are missing there; a case whose output cannot be put
is a failed row; a URI no installed file system writes, or one that cannot be written, is refused
before any case runs. The Ray engine's stages are run here in this process, as its workers run
them, to check the writer it uses."""

from __future__ import annotations

import csv
import functools
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.cli import main
from medseg.engine.predict import MODEL_STAMP, discover_inputs
from medseg.engine.ray_stages import NetworkStage, ReadStage, WriteStage, case_rows, result_from_json
from medseg.engine.remote_output import publishing_factory
from medseg.errors import RunError, UsageError
from medseg.io.remote_folder import RemoteFolder, remote_folder
from tests.conftest import make_case

MEMORY = fsspec.filesystem("memory")
BATCH_FILES = ("predictions.csv", "predict_summary.json", "qc_summary.json", "review.html", MODEL_STAMP)


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread (the same arithmetic in every batch, so the same masks) and a cache folder of
    the test's, where the batch files are staged."""
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor(trained_segmentation: dict[str, str]) -> medseg.Predictor:
    return medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu",
                                     tracking_uri=trained_segmentation["tracking_uri"])


def write_scans(folder: Path, broken: bool = True) -> Path:
    """Two small oblique, anisotropic scans of odd shapes, and (``broken``) a file that is no NIfTI."""
    folder.mkdir(parents=True)
    for i, (shape, spacing) in enumerate((((19, 23, 13), (0.9, 1.1, 2.3)), ((17, 21, 11), (1.3, 0.7, 2.9)))):
        image, _, affine = make_case(shape, seed=40 + i, spacing=spacing)
        nib.save(nib.Nifti1Image(image, affine), folder / f"c{i}.nii.gz")
    if broken:
        (folder / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scans(tmp_path_factory.mktemp("remote_output") / "in")


@pytest.fixture(scope="module")
def reference(predictor: medseg.Predictor, scans: Path) -> Path:
    """The batch predicted into a local folder, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = scans.parent / "local"
        assert predictor.predict_folder(scans, out, progress=False).n_failed == 1
    finally:
        torch.set_num_threads(threads)
    return out


def memory_uri() -> str:
    return f"memory://medseg-out-{uuid.uuid4().hex[:12]}/batch"


def remote_masks(uri: str) -> dict[str, bytes]:
    return {path.rsplit("/", 1)[-1]: MEMORY.cat_file(path) for path in sorted(MEMORY.glob(f"{uri}/*.nii.gz"))}


def local_masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def remote_rows(uri: str) -> dict[str, dict[str, str]]:
    text = MEMORY.cat_file(f"{uri}/predictions.csv").decode()
    return {row["case_id"]: row for row in csv.DictReader(io.StringIO(text))}


def local_rows(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "predictions.csv", newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def comparable(rows: dict[str, dict[str, str]], where: str) -> dict[str, dict[str, str]]:
    """Rows without their timing, output paths relative to their folder (or URI)."""
    return {case: {k: v.replace(where + "/", "") for k, v in row.items() if k != "seconds"}
            for case, row in rows.items()}


def test_a_memory_uri_gets_the_local_folders_files_and_a_rerun_predicts_only_the_missing_cases(
        predictor: medseg.Predictor, scans: Path, reference: Path) -> None:
    uri = memory_uri()
    report = predictor.predict_folder(scans, uri, progress=False)
    assert report.destination == uri and report.report_location == f"{uri}/predictions.csv"
    assert report.counts == {"ok": 2, "failed": 1, "skipped": 0}
    assert remote_masks(uri) == local_masks(reference)  # byte for byte
    for name in BATCH_FILES:
        assert MEMORY.exists(f"{uri}/{name}"), name
    assert not [p for p in MEMORY.find(uri) if ".tmp" in p]
    rows = remote_rows(uri)
    assert rows["c0"]["output"] == f"{uri}/c0.nii.gz"
    assert rows["broken"]["status"] == "failed" and "broken.nii.gz" in rows["broken"]["error"]
    assert comparable(rows, uri) == comparable(local_rows(reference), str(reference))
    summary = json.loads(MEMORY.cat_file(f"{uri}/predict_summary.json"))
    assert summary["output"] == uri and summary["review"] == f"{uri}/review.html"
    assert summary["qc_summary"] == f"{uri}/qc_summary.json" and summary["counts"]["failed"] == 1
    page = MEMORY.cat_file(f"{uri}/review.html").decode()  # thumbnails from the published masks, linked beside it
    assert 'href="c0.nii.gz"' in page and 'href="predictions.csv"' in page
    assert page.count("data:image/png") == (reference / "review.html").read_text().count("data:image/png") > 0

    # a rerun after a killed batch: one mask and the report lost at the destination
    MEMORY.rm(f"{uri}/c1.nii.gz")
    MEMORY.rm(f"{uri}/predictions.csv")
    rerun = predictor.predict_folder(scans, uri, progress=False, review=False)
    statuses = {r.case_id: r.status for r in rerun.results}
    assert statuses == {"c0": "skipped", "c1": "ok", "broken": "failed"}
    assert remote_masks(uri) == local_masks(reference)
    again = remote_rows(uri)
    assert again["c0"]["output"] == f"{uri}/c0.nii.gz"  # the skipped case's values read back from its mask
    assert again["c0"]["volume_ml_blob1"] == rows["c0"]["volume_ml_blob1"]
    assert json.loads(MEMORY.cat_file(f"{uri}/predict_summary.json"))["review"] is None


def test_an_output_that_cannot_be_put_is_the_cases_failed_row_and_the_rerun_predicts_it(
        predictor: medseg.Predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scans = write_scans(tmp_path / "in", broken=False)
    uri = memory_uri()
    put = RemoteFolder.put

    def refuse_c0_mask(self: RemoteFolder, local: Path, name: str) -> str:
        if name == "c0.nii.gz":
            raise PermissionError(13, "Access Denied")
        return put(self, local, name)

    monkeypatch.setattr(RemoteFolder, "put", refuse_c0_mask)
    report = predictor.predict_folder(scans, uri, progress=False, review=False, save_probabilities=True)
    results = {r.case_id: r for r in report.results}
    assert results["c1"].status == "ok"
    assert results["c0"].status == "failed"
    assert results["c0"].error.startswith(f"{scans / 'c0.nii.gz'}: putting its output c0.nii.gz at {uri} failed "
                                          "(PermissionError: [Errno 13] Access Denied). Check that this worker's "
                                          "credentials may write there")
    # the mask goes last: the probabilities were put, the case is not finished without its mask
    assert MEMORY.exists(f"{uri}/c0_probabilities.nii.gz") and not MEMORY.exists(f"{uri}/c0.nii.gz")
    monkeypatch.setattr(RemoteFolder, "put", put)
    rerun = predictor.predict_folder(scans, uri, progress=False, review=False, save_probabilities=True)
    assert {r.case_id: r.status for r in rerun.results} == {"c0": "ok", "c1": "skipped"}
    assert MEMORY.exists(f"{uri}/c0.nii.gz")


def test_the_ray_engines_stages_put_their_outputs_at_the_uri_as_its_workers_would(
        predictor: medseg.Predictor, scans: Path, reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("MLFLOW_LOGGING_LEVEL", "WARNING"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true")):  # what each stage sets in its worker, undone after
        monkeypatch.setenv(key, value)
    uri = memory_uri()
    options = predictor.options
    factory = functools.partial(publishing_factory, predictor.case_predictor_factory(options), uri)
    cases = discover_inputs(scans, predictor.contract.get("in_channels")).cases
    columns = {k: np.asarray([row[k] for row in case_rows(cases, {})], dtype=object) for k in ("case", "previous")}
    batch = {"index": np.arange(len(cases)), **columns}
    staging = str(tmp_path / "driver_staging")  # the driver's folder: a worker writes into its own
    read = ReadStage(factory, staging, False, 1)(batch)
    inferred = NetworkStage(factory, staging, False, None)(read)
    written = WriteStage(factory, staging, False, 1)(inferred)
    results = {r.case_id: r for r in map(result_from_json, map(str, written["result"]))}
    assert {k: r.status for k, r in results.items()} == {"c0": "ok", "c1": "ok", "broken": "failed"}
    assert results["c0"].outputs == {"output": f"{uri}/c0.nii.gz"}
    assert remote_masks(uri) == local_masks(reference)
    assert not (tmp_path / "driver_staging").exists()
    again = ReadStage(factory, staging, False, 1)(batch)  # resume: finished at the destination, skipped
    resumed = {r.case_id: r for r in map(result_from_json, map(str, again["result"]))}
    assert {k: r.status for k, r in resumed.items()} == {"c0": "skipped", "c1": "skipped", "broken": "failed"}
    assert resumed["c1"].outputs == {"output": f"{uri}/c1.nii.gz"}


def test_file_uris_are_the_local_folder_and_the_cli_writes_to_a_uri(
        predictor: medseg.Predictor, trained_segmentation: dict[str, str], scans: Path, reference: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "as uri"
    predictor.predict_folder(scans, out.as_uri(), progress=False, review=False)
    assert local_masks(out) == local_masks(reference)
    assert remote_folder(out.as_uri()) is None and remote_folder(str(out)) is None
    uri = memory_uri()
    code = main(["predict", "--model", trained_segmentation["model_uri"], "--input", str(scans / "c0.nii.gz"),
                 "--output", uri, "--tracking-uri", trained_segmentation["tracking_uri"], "--no-progress",
                 "--no-tracking", "--no-review", "--device", "cpu"])
    assert code == 0
    assert f"report: {uri}/predictions.csv" in capsys.readouterr().out
    assert remote_masks(uri) == {"c0.nii.gz": local_masks(reference)["c0.nii.gz"]}


def test_a_uri_no_installed_file_system_writes_or_that_cannot_be_written_is_refused_before_any_case(
        predictor: medseg.Predictor, scans: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # as here: the message names the package that writes gs://
        with pytest.raises(UsageError, match=r"--output: gs://bucket/out: writing gs:// URIs needs gcsfs .*\(pip "
                                             r"install gcsfs\) on the driver and every worker"):
            predictor.predict_folder(scans, "gs://bucket/out", progress=False)
    with pytest.raises(UsageError, match=r"--output: foo://bucket/out: unknown URI scheme 'foo'.*fix --output"):
        predictor.predict_folder(scans, "foo://bucket/out", progress=False)
    with pytest.raises(UsageError, match=r"--input s3://bucket/scans: expected a folder or file on a file system "
                                         r"every worker mounts .* List scans named by URI in a table"):
        predictor.predict_folder("s3://bucket/scans", memory_uri(), progress=False)

    def denied(self: RemoteFolder, local: Path, name: str) -> str:
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(RemoteFolder, "put", denied)
    uri = memory_uri()
    with pytest.raises(RunError, match=rf"--output {uri}: cannot read and write there \(PermissionError: .*Access "
                                       r"Denied\). Check the URI, that your credentials may write there"):
        predictor.predict_folder(scans, uri, progress=False)
    assert not MEMORY.exists(uri) or MEMORY.find(uri) == []
