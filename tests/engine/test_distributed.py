"""Distributed training with real processes: torchrun workers talking gloo on the CPU."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from medseg.cli import main
from medseg.data.build import build_manifest
from medseg.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, make_case, tiny_config, write_msd_dataset

ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
#: Validation without overlay figures or HD95 where neither is under test: drawing and logging PNGs and the
#: distance transforms cost every run seconds (tests/tasks/segmentation cover them).
QUICK_VALIDATION = {"overlays": 0, "hd95": False}


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store with its schema made, once for the module: MLflow migrates a fresh store
    in every process that opens one first (seconds each), which these tests are not about; a fresh
    store opened by several processes at once is tests/tracking/test_concurrent_store.py's."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("migrated_store")
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")).engine.dispose()
    return folder / "mlflow.db"


def store_uri(template: Path, db: Path) -> str:
    """A copy of the empty migrated store ``template`` at ``db`` (SQLite's backup: a consistent copy); its URI."""
    with closing(sqlite3.connect(template)) as source, closing(sqlite3.connect(db)) as copy:
        source.backup(copy)
    return f"sqlite:///{db}"


def _curves(run_dir: Path) -> list[dict[str, str]]:
    """history.csv without the wall-clock column, which no rerun repeats."""
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def _only_run(uri: str, experiment: str = "tests"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.fixture
def eight_cases(tmp_path: Path) -> tuple[Path, Path]:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=8)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.25, seed=1)
    return dataset, manifest


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, eight_cases,
                                                                       migrated_store) -> None:
    dataset, manifest = eight_cases
    # Two epochs: the second starts from weights both processes updated (a third adds no other code path).
    common = {"train": {"max_epochs": 2, "num_threads": 1}, "data": {"cache": "disk",
                                                                     "cache_dir": str(tmp_path / "cache")},
              "validation": QUICK_VALIDATION}
    two_uri, one_uri = store_uri(migrated_store, tmp_path / "two.db"), store_uri(migrated_store, tmp_path / "one.db")
    config = tiny_config(tmp_path, dataset, manifest, two_uri, **common)
    done = subprocess.run([sys.executable, "-m", "medseg", "run", str(config), "--nproc", "2", "--deterministic",
                           "--no-progress", "--set", "train.batch_size=1", "--set", f"output_dir={tmp_path / 'two'}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert main(["run", str(config), "--deterministic", "--no-progress", "--set", "train.batch_size=2",
                 "--set", f"output_dir={tmp_path / 'one'}", "--set", f"tracking.uri={one_uri}"]) == 0

    client, two = _only_run(two_uri)  # one MLflow run for the whole job: only rank 0 talks to MLflow
    assert two.info.status == "FINISHED"
    assert two.data.tags["world_size"] == "2"
    assert two.data.metrics["system/world_size"] == 2
    assert two.data.metrics["system/batch_per_process"] == 1
    assert two.data.metrics["system/global_batch"] == 2
    _, one = _only_run(one_uri)
    for key in ("train/loss", "val/dice_mean", "val/dice/blob1", "val/dice/blob2"):
        two_curve = [m.value for m in sorted(client.get_metric_history(two.info.run_id, key), key=lambda m: m.step)]
        one_curve = [m.value for m in sorted(MlflowClient(one_uri).get_metric_history(one.info.run_id, key),
                                             key=lambda m: m.step)]
        assert len(two_curve) == len(one_curve) == 2
        # Same samples, same augmentation, DDP-averaged gradients: equal up to float summation order.
        assert two_curve == pytest.approx(one_curve, abs=2e-3), key
    # Only the main process wrote the run: one run directory, one checkpoint set.
    (run_dir,) = (tmp_path / "two").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_a_killed_worker_ends_the_job_with_a_clear_error_and_memory_caches_are_sharded(tmp_path: Path, eight_cases,
                                                                                      migrated_store) -> None:
    dataset, manifest = eight_cases
    uri = store_uri(migrated_store, tmp_path / "mlflow.db")
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 500, "num_threads": 1,
                                                                  "num_workers": 0}, validation=QUICK_VALIDATION)
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "run", str(config), "--nproc", "2", "--no-progress"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/checkpoints/last.safetensors")):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        workers = [p for p in _descendants(proc.pid) if _rank_of(p) == "1"]
        assert workers, "no rank-1 worker found"
        os.kill(min(workers), signal.SIGKILL)  # the worker itself (its lowest pid), as the OOM killer would
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    assert "distributed run failed" in output and "SIGKILL" in output
    _, run = _only_run(uri)
    assert run.info.status == "FAILED"  # the surviving rank 0 was stopped and marked its run
    assert run.data.metrics["data/train_cases"] == 6
    assert run.data.metrics["data/train_cases_per_process"] == 3  # a memory cache holds each process's half


def _reduce_worker(rank: int, world: int, port: int, cases: list, queue) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from medseg.engine.distributed import DistContext
    from medseg.tasks.segmentation.metrics import SegmentationMetrics

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metrics = SegmentationMetrics({0: "background", 1: "a", 2: "b"})
    for pred, truth, case_id in cases[rank::world]:
        metrics.update(pred, truth, (1.0, 1.2, 2.5), case_id)
    metrics.reduce(DistContext(rank, world, rank, world, "gloo"))
    queue.put((rank, metrics.aggregate("val"), [r["case_id"] for r in metrics.per_case]))
    dist.destroy_process_group()


def test_validation_metrics_summed_across_processes_equal_the_single_process_values() -> None:
    from medseg.tasks.segmentation.metrics import SegmentationMetrics

    cases = []
    for i in range(5):  # five cases over two processes: uneven shares
        _, truth, _ = make_case((19, 23, 11), seed=i)
        pred = torch.from_numpy(truth).clone()
        pred[:: 2 + i] = 0  # different damage per case
        cases.append((pred, torch.from_numpy(truth), f"case{i}"))
    single = SegmentationMetrics({0: "background", 1: "a", 2: "b"})
    for pred, truth, case_id in cases:
        single.update(pred, truth, (1.0, 1.2, 2.5), case_id)
    expected = single.aggregate("val")

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reduce_worker, args=(r, 2, port, cases, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, values, case_ids in results:
        assert values == pytest.approx(expected, abs=1e-12)
        assert sorted(case_ids) == [f"case{i}" for i in range(5)]


def test_deterministic_runs_repeat_their_curves_exactly(tmp_path: Path, tiny_run_inputs, migrated_store) -> None:
    dataset, manifest = tiny_run_inputs
    uri = store_uri(migrated_store, tmp_path / "mlflow.db")
    config = tiny_config(tmp_path, dataset, manifest, uri,
                         augment=[{"name": "flip", "prob": 0.5, "axes": [0, 1]}, {"name": "noise", "prob": 0.5},
                                  {"name": "affine", "prob": 0.5, "rotate_deg": 15}],
                         train={"max_epochs": 3, "num_threads": 1})
    for name in ("a", "b"):
        assert main(["run", str(config), "--deterministic", "--no-progress",
                     "--set", f"output_dir={tmp_path / name}"]) == 0
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert len(_curves(a)) == 3 and "val/dice_mean" in _curves(a)[0]
    assert _curves(a) == _curves(b)
    assert load_checkpoint(a / "checkpoints" / "last.safetensors")["model"].keys() == \
           load_checkpoint(b / "checkpoints" / "last.safetensors")["model"].keys()
    for key, tensor in load_checkpoint(a / "checkpoints" / "last.safetensors")["model"].items():
        assert torch.equal(tensor, load_checkpoint(b / "checkpoints" / "last.safetensors")["model"][key]), key


# Slow: the default run proves each part of it: tests/faults/test_kill.py's
# test_training_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights (medseg run SIGKILLed mid-epoch,
# resumed: the same curves and weights bit for bit, the same MLflow run, each epoch and system/world_size
# logged once), its disk-full test (a run stopped in its second epoch resumes bit for bit), and the resume
# tests below (epochs finished before the stop are not logged again).
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path: Path, tiny_run_inputs,
                                                                              migrated_store) -> None:
    dataset, manifest = tiny_run_inputs
    uri = store_uri(migrated_store, tmp_path / "mlflow.db")
    config = tiny_config(tmp_path, dataset, manifest, uri, validation=QUICK_VALIDATION,
                         train={"max_epochs": 4, "iterations_per_epoch": 6, "num_threads": 1, "deterministic": True,
                                "checkpoint_interval_minutes": 0})  # a checkpoint after every iteration
    assert main(["run", str(config), "--no-progress", "--set", f"output_dir={tmp_path / 'whole'}",
                 "--set", f"tracking.uri={store_uri(migrated_store, tmp_path / 'whole.db')}"]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "medseg", "run", str(config), "--no-progress"], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, killed_at = time.monotonic() + 180, None
    while time.monotonic() < deadline and proc.poll() is None:
        for last in (tmp_path / "runs").glob("*/checkpoints/last.safetensors"):
            try:
                state = json.loads(load_checkpoint(last)["state"])
            except Exception:  # noqa: BLE001 - read between two renames: try again
                continue
            if state["epoch"] >= 1 and state["iteration"] >= 2:  # well inside the second epoch
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = (state["epoch"], state["iteration"])
        if killed_at:
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, proc.stdout.read().decode() if proc.stdout else ""
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "summary.json").exists()

    assert main(["run", str(config), "--resume", "--no-progress"]) == 0
    (whole_dir,) = (tmp_path / "whole").iterdir()
    assert len(_curves(run_dir)) == 4
    assert _curves(run_dir) == _curves(whole_dir)
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")["model"]
    for key, tensor in load_checkpoint(whole_dir / "checkpoints" / "last.safetensors")["model"].items():
        assert torch.equal(tensor, resumed[key]), key

    client, run = _only_run(uri)  # the same MLflow run continued, each epoch logged once
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "system/world_size")] == [0]


def test_the_documented_multi_node_form_runs_two_torchrun_agents_as_two_machines(tmp_path: Path, eight_cases,
                                                                                 migrated_store) -> None:
    """Two torchrun agents meeting at a c10d rendezvous, as two machines would (here on one host)."""
    import socket

    dataset, _ = eight_cases
    manifest = tmp_path / "one_val_case.csv"  # one validation case for two processes: one has none to score
    build_manifest(dataset, manifest, val_fraction=0.125, seed=1)
    uri = store_uri(migrated_store, tmp_path / "mlflow.db")
    # Batch norm and dropout too: CPU processes keep per-process batch statistics (SyncBatchNorm is GPU-only).
    config = tiny_config(tmp_path, dataset, manifest, uri, model={"norm": "batch", "dropout": 0.1},
                         validation=QUICK_VALIDATION,
                         train={"max_epochs": 1, "num_threads": 1, "num_workers": 0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                                "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                "--rdzv-id=medseg-test", "-m", "medseg", "run", str(config), "--no-progress"],
                               cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    _, run = _only_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.metrics["system/global_batch"] == 4
    assert run.data.metrics["data/val_cases"] == 1 and "val/dice_mean" in run.data.metrics


class _Stop(Exception):
    """Ends a run part-way, as a crash would."""


def _finished_as_one_run(run_dir: Path, uri: str, epochs: int, steps: int) -> None:
    """The run ended once, each epoch in its history and in MLflow once, the LR schedule at its end."""
    assert [int(float(row["epoch"])) for row in _curves(run_dir)] == list(range(1, epochs + 1))
    last = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    assert last["step_count"] == steps  # progress reached 1 exactly: the schedule carried over the resume
    assert json.loads(last["state"])["samples_done"] == 0
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, epochs + 1))


def _signal_job(pid: int, signum: int) -> None:
    """``signum`` to a job: the launcher and every process under it (torchrun's workers have
    sessions of their own, so a process group does not reach them)."""
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, signum)
        except ProcessLookupError:
            pass


def _stop_mid_epoch(proc: subprocess.Popen, runs: Path) -> dict:
    """Kill the job ``proc`` launched once ``last.safetensors`` is part-way through an epoch after the first.

    The job is paused before the checkpoint is read for good, so the state returned is the one
    the resumed run starts from; a pause that caught an epoch's end lets it go on.
    """
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        for last in runs.glob("*/checkpoints/last.safetensors"):
            try:
                state = json.loads(load_checkpoint(last)["state"])
            except Exception:  # noqa: BLE001 - read between two renames: try again
                continue
            if state["epoch"] >= 1 and state["iteration"] >= 1:
                _signal_job(proc.pid, signal.SIGSTOP)
                state = json.loads(load_checkpoint(last)["state"])
                if state["iteration"] >= 1:
                    _signal_job(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return state
                _signal_job(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    _signal_job(proc.pid, signal.SIGKILL)
    raise AssertionError("the run ended before it could be stopped mid-epoch:\n"
                         + (proc.stdout.read().decode() if proc.stdout else ""))


def _resume_config(tmp_path: Path, eight_cases, epochs: int, template: Path) -> Path:
    """6 training cases in batches of 1, a checkpoint after every step, one shared sample stream
    (a disk cache; a memory cache would be sharded between processes)."""
    dataset, manifest = eight_cases
    return tiny_config(tmp_path, dataset, manifest, store_uri(template, tmp_path / "mlflow.db"),
                       data={"cache": "disk", "cache_dir": str(tmp_path / "cache")}, validation=QUICK_VALIDATION,
                       train={"max_epochs": epochs, "batch_size": 1, "num_threads": 1, "num_workers": 0,
                              "checkpoint_interval_minutes": 0})


def test_a_run_of_one_process_resumed_with_two_trains_the_rest_of_its_epoch_once(tmp_path: Path, eight_cases,
                                                                                 monkeypatch, migrated_store) -> None:
    config = _resume_config(tmp_path, eight_cases, epochs=2, template=migrated_store)
    from medseg.engine import loop

    seed_step = loop.seed_step

    def stop_in_the_second_epoch(seed: int, epoch: int, iteration: int, rank: int) -> None:
        if (epoch, iteration) == (1, 3):  # last.safetensors holds the first 3 of the epoch's 6 steps
            raise _Stop
        seed_step(seed, epoch, iteration, rank)

    monkeypatch.setattr(loop, "seed_step", stop_in_the_second_epoch)
    with pytest.raises(_Stop):
        main(["run", str(config), "--no-progress"])
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    state = json.loads(saved["state"])
    assert (saved["world_size"], state["epoch"], state["iteration"], state["samples_done"]) == (1, 1, 3, 3)

    done = subprocess.run([sys.executable, "-m", "medseg", "run", str(config), "--resume", "--nproc", "2",
                           "--no-progress"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "resuming a run of 1 process(es) with 2" in output
    # Positions 0-2 were trained; two processes take steps of 2 from position 3 on: 3-4 and 5-6, the
    # last one past the epoch's 6 rather than a step without a sample on one process. (Restated in
    # steps, as before, the run skipped to position 6: nothing of the epoch was left.)
    assert "epoch 2: resumed after 3 of its 6 samples, trained 4 more" in output
    _finished_as_one_run(run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", epochs=2, steps=2 * 3)


def test_a_run_of_two_processes_resumed_with_one_trains_the_rest_of_its_epoch_once(tmp_path: Path, eight_cases,
                                                                                   caplog, migrated_store) -> None:
    # 8 epochs: each one after the first offers a moment to stop it mid-epoch (its steps 1-2 of 3, a tenth
    # of a second); with 3, a poll on a loaded host once missed both before the run ended
    config = _resume_config(tmp_path, eight_cases, epochs=8, template=migrated_store)
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "run", str(config), "--nproc", "2", "--no-progress"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    state = _stop_mid_epoch(proc, tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    samples_done = state["samples_done"]
    assert samples_done == 2 * state["iteration"]  # two processes, one sample each per step

    with caplog.at_level(logging.INFO, logger="medseg"):
        assert main(["run", str(config), "--resume", "--no-progress"]) == 0
    assert "resuming a run of 2 process(es) with 1" in caplog.text
    # One process continues at the first position not trained (restated in steps, as before, it
    # went back to position samples_done / 2 and trained those positions twice).
    assert (f"epoch {state['epoch'] + 1}: resumed after {samples_done} of its 6 samples, "
            f"trained {6 - samples_done} more") in caplog.text
    _finished_as_one_run(run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", epochs=8, steps=8 * 6)
