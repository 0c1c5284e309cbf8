"""Several processes on one fresh SQLite store at once: every run is recorded, none dies in MLflow's
schema migration (``duplicate column name: step`` before the store lock) or on a busy database."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medseg.errors import RunError
from medseg.tracking import MlflowTracker


def _open_and_log(uri: str, barrier, results) -> None:  # noqa: ANN001 - multiprocessing objects
    """One process: open the tracker the moment every other process does, log a small run."""
    try:
        barrier.wait(timeout=120)
        tracker = MlflowTracker(uri, "tests")
        run_id = tracker.start("concurrent", {"pid": str(os.getpid())})
        tracker.log_params({"a": 1, "b": "two"})
        for step in range(20):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "val/dice_mean": step / 20}, step=step)
        tracker.end()
        results.put(("ok", run_id))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        results.put(("error", repr(err)))


def _test_runs(uri: str) -> list:
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tests"]
    return client.search_runs([experiment.experiment_id])


def test_processes_opening_one_fresh_store_together_all_log_their_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # not there yet: the first open creates it
    ctx = mp.get_context("spawn")
    count = 3
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_open_and_log, args=(uri, barrier, results)) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=240) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert [status for status, _ in outcomes] == ["ok"] * count, outcomes
    runs = _test_runs(uri)
    assert {r.info.run_id for r in runs} == {run_id for _, run_id in outcomes}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(len(MlflowClient(uri).get_metric_history(r.info.run_id, "train/loss")) == 20 for r in runs)
    assert (tmp_path / "store" / "mlflow.db.lock").is_file()


def test_two_medseg_runs_started_together_on_a_fresh_store_both_finish(tmp_path: Path, tiny_run_inputs) -> None:
    from tests.conftest import REPO, tiny_config

    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1, "num_threads": 1},
                         validation={"overlays": 0, "hd95": False})
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "OMP_NUM_THREADS": "1"}
    # Own output folders: this is about the store, not two runs racing for one run directory name.
    procs = [subprocess.Popen([sys.executable, "-m", "medseg", "run", str(config), "--no-progress",
                               "--set", f"output_dir={tmp_path / f'runs{i}'}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    runs = _test_runs(uri)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status)
                                                                                 for r in runs]


def test_an_experiment_created_by_another_process_meanwhile_is_used(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    existing = MlflowTracker(uri, "tests").experiment_id
    real = MlflowClient.get_experiment_by_name
    calls: list[str] = []

    def missing_on_first_look(self, name):  # noqa: ANN001 - the other process creates it right after
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", missing_on_first_look)
    assert MlflowTracker(uri, "tests").experiment_id == existing
    assert len(calls) == 2


def test_a_store_held_by_a_stopped_process_fails_with_the_store_and_the_way_out(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    import medseg.tracking.sqlite_store as sqlite_store

    db = tmp_path / "mlflow.db"
    monkeypatch.setattr(sqlite_store, "LOCK_WAIT_S", 0.3)
    with open(tmp_path / "mlflow.db.lock", "a") as held, pytest.raises(RunError) as info:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a stopped `medseg run` would hold
        MlflowTracker(f"sqlite:///{db}", "tests")
    message = str(info.value)
    assert str(db) in message and "a stopped `medseg run`" in message
    assert f"mlflow server --backend-store-uri sqlite:///{db.resolve()}" in message
    assert "--set tracking.uri=http://127.0.0.1:5000" in message


def test_wal_on_a_local_disk_and_the_default_journal_on_a_network_filesystem(tmp_path: Path, monkeypatch) -> None:
    import sqlite3

    import medseg.tracking.sqlite_store as sqlite_store

    mounts = "/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\nhost:/x /mnt/ssh fuse.sshfs rw 0 0\n"
    assert sqlite_store.filesystem_type(Path("/mnt/shared/runs/mlflow.db"), mounts) == "nfs4"
    assert sqlite_store.filesystem_type(Path("/mnt/ssh/mlflow.db"), mounts) == "fuse"
    assert sqlite_store.filesystem_type(Path("/mnt/sharedother/mlflow.db"), mounts) == "ext4"

    def journal(db: Path) -> str:
        con = sqlite3.connect(db)
        try:
            return str(con.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            con.close()

    MlflowTracker(f"sqlite:///{tmp_path / 'local.db'}", "tests")
    assert journal(tmp_path / "local.db") == "wal"
    monkeypatch.setattr(sqlite_store, "filesystem_type", lambda path, mounts=None: "nfs4")
    MlflowTracker(f"sqlite:///{tmp_path / 'shared.db'}", "tests")
    assert journal(tmp_path / "shared.db") == "delete"


def test_a_filesystem_without_flock_opens_the_store_unlocked_as_before(tmp_path: Path, monkeypatch) -> None:
    import errno
    import types

    import medseg.tracking.sqlite_store as sqlite_store

    def no_flock(handle, operation):  # noqa: ANN001 - Lustre mounted without -o flock answers so
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(sqlite_store, "fcntl", types.SimpleNamespace(flock=no_flock, LOCK_EX=2, LOCK_NB=4))
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tests")
    tracker.start("r", {})
    tracker.end()
    assert MlflowClient(tracker.uri).get_run(tracker._run).info.status == "FINISHED"
