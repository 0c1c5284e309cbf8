"""``medseg predict --engine ray`` on a real Ray runtime (2 CPUs, started and stopped here): the
same outputs, bit for bit, as the local path; a hostile scan is a failed row; a worker killed with
SIGKILL mid-run is restarted and the batch ends as an uninterrupted one.

Run by tests/engine/test_predict_ray.py in a pytest process of its own (that file says why); run
it directly with ``pytest tests/engine/ray_cases.py -n 0`` (``-m slow`` for the slow cases).

Both paths run torch on one thread (a Ray actor with one CPU gets ``OMP_NUM_THREADS=1``), so the
arithmetic, and so every mask, is the same bit for bit.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import main
from medseg.data.manifest import read_manifest
from medseg.engine.ray_predict import RayCaseRunner, RayOptions, check_fits
from medseg.errors import UsageError
from tests.conftest import HIPPO, REPO, TCIA, require
from tests.fuzz.hostile import truncated

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'medseg[ray]' (the dev extra has it)")

#: The fast suite's share of the 52 held-out hippocampus scans (the slow test takes them all).
FAST_SCANS = 6


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray runtime of 2 CPUs for the module (its start is paid once), stopped at the end."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    try:
        yield
    finally:
        ray.shutdown()


def held_out_scans(count: int | None = None) -> list[Path]:
    """The held-out (test split) scans of the committed hippocampus manifest, in manifest order."""
    manifest = read_manifest(REPO / "data_manifests" / "msd_hippocampus.csv")
    images = [require(HIPPO / case.images[0]) for case in manifest.split("test")]
    assert len(images) == 52
    return images[:count]


def scan_folder(folder: Path, scans: list[Path], dicom: bool = True) -> Path:
    """Copies of ``scans`` and (with ``dicom``) the PGBM-001 T1post DICOM series, in the layout predict reads."""
    folder.mkdir(parents=True)
    for scan in scans:
        shutil.copy(scan, folder / scan.name)
    if dicom:
        shutil.copytree(require(TCIA / "T1post"), folder / "PGBM-001" / "T1post")
    return folder


def predict(model: dict[str, str], scans: Path, out: Path, *extra: str, tracked: bool = False) -> int:
    return main(["predict", "--model", model["model_uri"], "--tracking-uri", model["tracking_uri"], "--input",
                 str(scans), "--output", str(out), "--no-progress", *([] if tracked else ["--no-tracking"]), *extra])


def local_reference(model: dict[str, str], scans: Path, out: Path) -> int:
    """The local path on one thread, as each one-CPU actor runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return predict(model, scans, out)
    finally:
        torch.set_num_threads(threads)


def rows(out: Path) -> dict[str, dict[str, str]]:
    """``predictions.csv`` by case id, without the timing and with paths relative to ``out``."""
    with open(out / "predictions.csv", newline="") as fh:
        found = list(csv.DictReader(fh))
    prefix = str(out) + os.sep
    return {row["case_id"]: {k: v.replace(prefix, "") for k, v in row.items() if k != "seconds"} for row in found}


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.nii.gz"))}


def temporaries(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".tmp" in p.name]


def assert_same_batch(got: Path, reference: Path) -> None:
    """Masks bit for bit, the same report rows (timing aside) in the same order, the same summary counts."""
    assert outputs(got).keys() == outputs(reference).keys()
    for name, content in outputs(reference).items():
        assert outputs(got)[name] == content, f"{name} differs from the local path's"
    assert list(rows(got)) == list(rows(reference)), "report rows in another order"
    assert rows(got) == rows(reference)
    summary, expected = (json.loads((p / "predict_summary.json").read_text()) for p in (got, reference))
    for key in ("counts", "failed", "volume_ml_total", "cases", "qc_flagged"):
        assert summary[key] == expected[key], key
    assert (got / "review.html").is_file() and temporaries(got) == []


#: Hostile scans among the fast suite's: each must be a failed row, on either engine, with the same message.
HOSTILE = ("cut", "empty")


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six held-out hippocampus scans, the PGBM-001 T1post series, a truncated scan and an empty file."""
    folder = scan_folder(tmp_path_factory.mktemp("ray_scans") / "in", held_out_scans(FAST_SCANS))
    truncated(held_out_scans()[-1], folder / "cut.nii.gz", 0.4)
    (folder / "empty.nii.gz").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def reference(trained_segmentation: dict[str, str], scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray_reference") / "out"
    assert local_reference(trained_segmentation, scans, out) == 1  # the hostile scans failed, the rest did not
    return out


def case_actor_pids(busy: bool = False) -> list[int]:
    """The PIDs of the live actors of Ray Data's network pool: the processes below this one (the local
    runtime's raylet started here forks the workers) that Ray titled ``ray::MapWorker(MapBatches(NetworkStage))``
    (the reading and writing pools are other ``MapWorker`` s); with ``busy``, only those predicting a
    case now (titled ``...submit`` while a task runs)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if title.startswith("ray::") and "NetworkStage" in title and (not busy or "submit" in title):
            found.append(child.pid)
    return found


def predict_killing_a_busy_actor(model: dict[str, str], scans: Path, out: Path, actors: int) -> Any:
    """``predict_folder`` on Ray with ``actors`` network actors, one of them killed with SIGKILL while it
    predicts a case (that case is retried on a restarted actor); the batch's report."""
    predictor = medseg.Predictor.from_uri(model["model_uri"], device="cpu", tracking_uri=model["tracking_uri"])
    runner: dict[str, Any] = {}

    def run() -> None:
        # one reading and one writing actor: each actor process costs its imports and a model load
        runner["report"] = predictor.predict_folder(scans, out, progress=False, engine="ray",
                                                    ray=RayOptions(actors=actors, io_actors=1))

    job = threading.Thread(target=run, daemon=True)
    job.start()
    # Generous: on a loaded 2-core host the actors' start (imports, model load) once took over 120 s
    deadline = time.monotonic() + 360
    # a case keeps its actor busy for a few tenths of a second; a tighter poll (each one walks every process under
    # this one) took CPU from the actors it waits for on a 2-core host
    while not case_actor_pids(busy=True) and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = case_actor_pids(busy=True)
    assert busy, "no actor of the network pool was seen predicting a case"
    os.kill(busy[0], signal.SIGKILL)
    assert job.is_alive(), "the batch ended before the kill: nothing was tested"
    job.join(timeout=180)
    assert not job.is_alive(), "the batch did not end within 3 minutes of the kill"
    assert busy[0] not in case_actor_pids(), "the killed worker is still there"
    return runner["report"]


def test_ray_engine_gives_the_local_outputs_bit_for_bit_with_a_worker_killed_and_resumes(
        trained_segmentation, ray_cluster, scans, reference, tmp_path: Path) -> None:
    # one run tests both: two actors give the local path's outputs and row order, and so does the batch
    # whose busy actor was killed mid-case (each extra Ray run costs minutes on a loaded 2-core host)
    out = tmp_path / "out"
    report = predict_killing_a_busy_actor(trained_segmentation, scans, out, actors=2)
    assert report.counts == {"ok": FAST_SCANS + 1, "failed": len(HOSTILE), "skipped": 0}
    assert_same_batch(out, reference)
    found = rows(out)
    assert len(found) == FAST_SCANS + 1 + len(HOSTILE) and found["PGBM-001__T1post"]["status"] == "ok"
    # a hostile scan is a failed row naming the file and what is wrong; the batch went on
    assert found["cut"]["status"] == "failed" and "cut.nii.gz" in found["cut"]["error"]
    assert found["empty"]["status"] == "failed" and "0 bytes" in found["empty"]["error"]
    assert not (out / "cut.nii.gz").exists() and not (out / "empty.nii.gz").exists()
    (out / f"{held_out_scans(1)[0].name}").unlink()  # one output lost: the rerun predicts it, and only it
    assert predict(trained_segmentation, scans, out, "--engine", "ray", "--experiment", "ray-rerun", tracked=True) == 1
    statuses = {case_id: row["status"] for case_id, row in rows(out).items()}
    assert statuses.pop(held_out_scans(1)[0].name.removesuffix(".nii.gz")) == "ok"
    assert {statuses.pop(name) for name in HOSTILE} == {"failed"}  # tried again, as the local path does
    assert set(statuses.values()) == {"skipped"}
    assert outputs(out) == outputs(reference)
    client = MlflowClient(trained_segmentation["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("ray-rerun").experiment_id])
    assert run.data.params["engine"] == "ray" and run.data.params["ray_actors"] == "1"
    assert run.data.metrics["predict/ray_worker_peak_rss_mb"] > 100  # torch, MONAI and the model in one actor
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["engine"] == "ray" and summary["ray"]["options"]["actors"] == 1
    assert summary["ray"]["stages"] == ["read", "network", "write"]  # segmentation's case predictor is staged
    (worker,) = summary["ray"]["workers"].values()  # one actor predicted every case of the rerun
    assert worker["cases"] == 1 + len(HOSTILE) + FAST_SCANS and worker["peak_rss_mb"] > 100
    assert run.data.metrics["predict/ok"] == 1 and run.data.metrics["predict/failed"] == len(HOSTILE)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"predictions.csv", "predict_summary.json"}


class PoisonedPredictor:
    """The model's case predictor, except that the case ``poison`` kills its worker (``SIGKILL`` to itself)
    on every try, as a scan that crashes native code or exhausts memory would."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_case(self, case: Any, output_dir: Path) -> Any:
        if case.case_id == "poison":
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.predict_case(case, output_dir)


def poisoned(uris: tuple[str, ...], tracking_uri: str) -> PoisonedPredictor:
    from medseg.api import load_case_predictor
    from medseg.engine.results import PredictOptions

    return PoisonedPredictor(load_case_predictor(uris, tracking_uri, "torch", PredictOptions(device="cpu",
                                                                                             progress=False)))


@pytest.mark.slow
def test_a_case_that_kills_its_worker_on_every_try_is_a_failed_row_and_the_others_are_predicted(
        trained_segmentation, ray_cluster, tmp_path: Path) -> None:
    from medseg.engine.predict import predict_folder

    folder = scan_folder(tmp_path / "in", held_out_scans(2), dicom=False)
    shutil.copy(held_out_scans(3)[2], folder / "poison.nii.gz")
    predictor = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu",
                                          tracking_uri=trained_segmentation["tracking_uri"])
    runner = RayCaseRunner(functools.partial(poisoned, predictor.model.uris, trained_segmentation["tracking_uri"]),
                           RayOptions(actors=1, task_retries=1))
    report = predict_folder(predictor._case_predictor, predictor.model, folder, tmp_path / "out",
                            replace(predictor.options, progress=False), predictor.device, runner=runner)
    results = {r.case_id: r for r in report.results}
    assert [r.status for r in report.results].count("ok") == 2, {k: r.error for k, r in results.items()}
    assert results["poison"].status == "failed"
    assert "the Ray worker predicting it died on each of 2 tries" in results["poison"].error
    assert str(folder / "poison.nii.gz") in results["poison"].error
    assert rows(tmp_path / "out")["poison"]["status"] == "failed"


def test_a_csv_or_parquet_table_of_paths_is_a_batch_whose_missing_paths_are_failed_rows(
        trained_segmentation, tmp_path: Path) -> None:
    import pandas as pd

    scans = held_out_scans(2)
    table = tmp_path / "cases.csv"
    pd.DataFrame({"path": [str(scans[0]), "missing.nii.gz"], "note": ["absolute", "relative"]}).to_csv(table)
    report = medseg.predict_dataset(trained_segmentation["model_uri"], table, tmp_path / "out", progress=False,
                                    review=False, tracking_uri=trained_segmentation["tracking_uri"])
    results = {r.case_id: r for r in report.results}
    assert results[scans[0].name.removesuffix(".nii.gz")].status == "ok"
    assert results["missing"].status == "failed"
    assert f"{tmp_path / 'missing.nii.gz'}: no such file" in results["missing"].error  # read from the table's folder
    pd.DataFrame({"scan": [str(scans[1])]}).to_parquet(tmp_path / "cases.parquet")
    with pytest.raises(UsageError, match=r"expected a 'path' column .* found columns \['scan'\]"):
        medseg.predict_dataset(trained_segmentation["model_uri"], tmp_path / "cases.parquet", tmp_path / "out2",
                               tracking_uri=trained_segmentation["tracking_uri"])


def test_ray_options_are_checked_before_anything_runs(trained_segmentation, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="--ray-actors 0: must be at least 1"):
        RayCaseRunner(lambda: None, RayOptions(actors=0))  # type: ignore[arg-type, return-value]
    with pytest.raises(UsageError, match="need 4; give more CPUs or fewer actors"):
        RayOptions(actors=2, cpus_per_actor=2, local_cpus=2).check()
    with pytest.raises(UsageError, match=r"--ray-gpus-per-actor 1 need 2 GPU\(s\); the local Ray runtime has 0"):
        check_fits(RayOptions(actors=2, gpus_per_actor=1), {"CPU": 2.0})
    with pytest.raises(UsageError, match="--engine 'spark': unknown; use one of local, ray"):
        medseg.predict_dataset(trained_segmentation["model_uri"], tmp_path, tmp_path / "out", engine="spark",
                               tracking_uri=trained_segmentation["tracking_uri"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as without medseg[ray]: `import ray` fails
    with pytest.raises(UsageError, match=r"--engine ray: Ray Data is not installed .* pip install 'medseg\[ray\]'"):
        medseg.predict_dataset(trained_segmentation["model_uri"], tmp_path, tmp_path / "out", engine="ray",
                               tracking_uri=trained_segmentation["tracking_uri"])


@pytest.mark.slow
def test_all_52_held_out_scans_and_a_dicom_series_through_ray_equal_the_local_path(
        trained_segmentation, ray_cluster, tmp_path: Path) -> None:
    folder = scan_folder(tmp_path / "in", held_out_scans())
    assert local_reference(trained_segmentation, folder, tmp_path / "local") == 0
    assert predict(trained_segmentation, folder, tmp_path / "ray", "--engine", "ray", "--ray-actors", "2") == 0
    assert_same_batch(tmp_path / "ray", tmp_path / "local")
    assert len(rows(tmp_path / "ray")) == 53
