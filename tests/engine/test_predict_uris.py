"""A table of cases named by URI (``file://``, fsspec's ``memory://``, ``s3://`` against a moto S3 server
process, where the Ray engine also writes its outputs): every case predicted as its local file would be,
bit for bit; a missing object is a failed row naming the URI; a URI no file system reads is refused
before anything runs, saying what was expected and the fix (an ``--output`` URI's own tests:
tests/engine/test_predict_remote_output.py)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

import medseg
from medseg.errors import UsageError
from tests.conftest import free_port
from tests.engine.ray_cases import held_out_scans, outputs

MODEL_KEYS = ("model_uri", "tracking_uri")


def predict(model: dict[str, str], table: Path, out: Path | str, **options: object) -> medseg.BatchReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each one-CPU Ray actor runs: the same arithmetic, so the same masks
    try:
        return medseg.predict_dataset(model["model_uri"], table, out, progress=False, review=False,
                                      tracking_uri=model["tracking_uri"], **options)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


def write_table(path: Path, entries: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        writer.writerows([e] for e in entries)
    return path


@pytest.fixture(scope="module")
def local_reference(trained_segmentation: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first two held-out scans predicted from a folder of copies, on one thread."""
    folder = tmp_path_factory.mktemp("uri_reference")
    for scan in held_out_scans(2):
        shutil.copy(scan, folder / scan.name)
    out = folder.parent / "uri_reference_out"
    assert predict(trained_segmentation, folder, out).n_failed == 0
    return out


def test_file_and_memory_uris_are_predicted_as_their_files_and_a_missing_object_is_a_failed_row(
        trained_segmentation, local_reference: Path, tmp_path: Path) -> None:
    first, second = held_out_scans(2)
    memory = fsspec.filesystem("memory")
    memory.pipe(f"/medseg-test/{second.name}", second.read_bytes())
    table = write_table(tmp_path / "cases.csv", [first.as_uri(), f"memory://medseg-test/{second.name}",
                                                 "memory://medseg-test/missing.nii.gz"])
    report = predict(trained_segmentation, table, tmp_path / "out")
    results = {r.case_id: r for r in report.results}
    assert results["missing"].status == "failed"
    assert results["missing"].error.startswith("memory://medseg-test/missing.nii.gz: no such object; expected a scan")
    assert {r.status for k, r in results.items() if k != "missing"} == {"ok"}
    assert results[second.name.removesuffix(".nii.gz")].input == f"memory://medseg-test/{second.name}"
    assert results[first.name.removesuffix(".nii.gz")].input == str(first)  # file:// is the path it names
    assert outputs(tmp_path / "out") == outputs(local_reference)


def test_a_uri_nothing_reads_is_refused_before_anything_runs(
        trained_segmentation, tmp_path: Path) -> None:
    scan = str(held_out_scans(1)[0])
    with pytest.raises(UsageError, match=r"foo://b/x\.nii\.gz: unknown URI scheme 'foo'; expected a path, a file:// "
                                         r"URI or a scheme fsspec reads .*fix the table's row"):
        predict(trained_segmentation, write_table(tmp_path / "a.csv", [scan, "foo://b/x.nii.gz"]), tmp_path / "o1")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # as here: the message names the package that reads gs://
        with pytest.raises(UsageError, match=r"gs://b/x\.nii\.gz: reading gs:// URIs needs gcsfs .*\(pip install "
                                             r"gcsfs\) on the driver and every worker"):
            predict(trained_segmentation, write_table(tmp_path / "b.csv", ["gs://b/x.nii.gz"]), tmp_path / "o2")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(UsageError, match=r"file://elsewhere/x\.nii\.gz: a file:// URI names a file on this machine"):
        predict(trained_segmentation, write_table(tmp_path / "d.csv", ["file://elsewhere/x.nii.gz"]), tmp_path / "o3")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A moto S3 server process on a free port, its endpoint and test credentials in the environment
    (before Ray starts, so that its workers have them as a cluster's nodes would), stopped at the end."""
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'medseg[dev]'")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"the moto S3 server did not answer on {endpoint} within 30 s")
            time.sleep(0.2)
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.kill()
        server.wait()


@pytest.mark.slow
def test_s3_uris_through_the_ray_engine_equal_the_local_path_and_a_missing_key_is_a_failed_row(
        trained_segmentation, local_reference: Path, s3_server: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'medseg[ray]'")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))  # the driver stages the batch's files there
    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    s3.mkdir("medseg-cases")
    scans = held_out_scans(2)
    for scan in scans:
        s3.pipe(f"medseg-cases/scans/{scan.name}", scan.read_bytes())
    table = write_table(tmp_path / "cases.csv", [*(f"s3://medseg-cases/scans/{s.name}" for s in scans),
                                                 "s3://medseg-cases/scans/missing.nii.gz"])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    try:
        # the outputs go to S3 too: the Ray worker that writes a case puts its mask there
        report = predict(trained_segmentation, table, "s3://medseg-cases/out", engine="ray")
    finally:
        ray.shutdown()
    results = {r.case_id: r for r in report.results}
    assert results["missing"].status == "failed"
    assert results["missing"].error.startswith("s3://medseg-cases/scans/missing.nii.gz: no such object")
    assert [results[s.name.removesuffix(".nii.gz")].status for s in scans] == ["ok", "ok"]
    assert results[scans[0].name.removesuffix(".nii.gz")].input == f"s3://medseg-cases/scans/{scans[0].name}"
    s3.invalidate_cache()  # the listings this process cached before the workers wrote
    assert report.destination == "s3://medseg-cases/out" and s3.exists("medseg-cases/out/predict_summary.json")
    assert {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in s3.glob("medseg-cases/out/*.nii.gz")} == \
        outputs(local_reference)
