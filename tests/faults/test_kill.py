"""Faults: ``kill -9`` at seeded random points of ``medseg run``, ``medseg predict`` and ``medseg manifest
build``, each followed by a rerun; and a full disk while a checkpoint is written.

What must hold after a kill and a rerun: the rerun exits 0, its outputs are identical to an
uninterrupted run's, and nothing half-written remains (no temp file of an atomic write: ``.<name>.<random>.tmp<suffix>``).

Two kinds of kill point, both drawn from ``random.Random(seed)`` so that a failure can be replayed
(every test prints where it killed, and the assertion messages repeat it):

* at a random moment: the command runs as ``python -m medseg ...`` and gets SIGKILL a random delay
  after a sign of progress (a checkpoint of a given epoch, the k-th mask written), as a ``kill -9``
  from outside lands. A manifest build takes milliseconds after seconds of imports, so it runs
  under :data:`HOOK` with its hashing slowed down, and the delay counts from the end of the imports;
* inside a write: the command runs under :data:`HOOK`, which SIGKILLs it at the k-th rename of a
  finished temp file onto its destination, the moment at which a half-written file is on disk if
  anything ever leaves one. k is drawn among the writes that an uninterrupted run makes.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from medseg.cli import main
from medseg.data.build import build_manifest
from medseg.data.manifest import read_manifest
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, make_case, tiny_config, train_run, write_msd_dataset

ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "MEDSEG_BACKEND": "torch",
       # one thread, as the in-process references run (predict takes torch's default otherwise)
       "OMP_NUM_THREADS": "1"}
ENV.pop("MEDSEG_ALLOCATOR", None)  # medseg would re-exec itself under jemalloc, without the hook below

#: ``python -c HOOK <medseg arguments>``: medseg's command line with fault injection, set by the environment:
#: ``MEDSEG_TEST_KILL_AT=k`` SIGKILLs the process at the k-th rename of a temp file onto its destination
#: (the temp file written in full, the destination not yet replaced); ``MEDSEG_TEST_STARTED=path`` creates
#: that file once the imports are done; ``MEDSEG_TEST_SLOW_HASH=s`` sleeps s seconds before hashing each
#: file, so that a manifest build lasts long enough for random kill times to land inside it.
HOOK = r"""
import os, signal, sys, time
kill_at = int(os.environ.get("MEDSEG_TEST_KILL_AT", "0"))
real_replace, renames = os.replace, []
def replace(src, dst, *args, **kwargs):
    name = os.path.basename(os.fspath(src))
    if name.startswith(".") and ".tmp" in name:
        renames.append(os.fspath(dst))
        if len(renames) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
slow = float(os.environ.get("MEDSEG_TEST_SLOW_HASH", "0"))
if slow:
    import medseg.data.manifest as manifest
    real_hash = manifest.sha256_of
    def sha256_of(path):
        time.sleep(slow)
        return real_hash(path)
    manifest.sha256_of = sha256_of
from medseg.cli import main
if os.environ.get("MEDSEG_TEST_STARTED"):
    open(os.environ["MEDSEG_TEST_STARTED"], "w").close()
sys.exit(main())
"""


def is_temporary(name: str) -> bool:
    """A temp file of :mod:`medseg.io.atomic` (``.<name>.<random>.tmp<suffix>``) or of the disk cache."""
    return name.startswith(".") and ".tmp" in name


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if is_temporary(p.name))


@contextmanager
def recording_renames() -> Iterator[list[Path]]:
    """The destinations of the atomic writes made in-process inside the block, in order."""
    real_replace = os.replace
    renames: list[Path] = []

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if is_temporary(Path(os.fspath(src)).name):
            renames.append(Path(os.fspath(dst)))
        real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        yield renames


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, as the subprocesses (``OMP_NUM_THREADS=1``): the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Job:
    """One medseg command in a subprocess of its own session (so SIGKILL reaches any child too)."""

    def __init__(self, args: list[str], cwd: Path, log: Path, hook: dict[str, str] | None = None):
        self.log = log
        command = [sys.executable, "-c", HOOK, *args] if hook is not None else [sys.executable, "-m", "medseg", *args]
        with open(log, "ab") as out:
            out.write(f"\n$ medseg {' '.join(args)}  {hook or ''}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(command, cwd=cwd, env={**ENV, **(hook or {})}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL the job; the seconds it had run."""
        elapsed = time.monotonic() - self.started
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had ended on its own
            pass
        self.proc.wait(timeout=60)
        return elapsed

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def run_medseg(args: list[str], cwd: Path, log: Path, where: str) -> None:
    """Run a medseg command to its end; it must succeed."""
    job = Job(args, cwd, log)
    code = job.wait()
    assert code == 0, f"{where}\nthe rerun `medseg {' '.join(args)}` exited {code}:\n{job.tail()}"


def wait_until(job: Job, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not job.running() or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the job {'ended' if not job.running() else 'timed out'} before {what}:\n{job.tail()}")
        time.sleep(0.01)


def killed_by_hook(args: list[str], cwd: Path, log: Path, kill_at: int, **hook: str) -> None:
    """Run ``args`` under :data:`HOOK` until it kills itself at its ``kill_at``-th atomic rename."""
    job = Job(args, cwd, log, {"MEDSEG_TEST_KILL_AT": str(kill_at), **hook})
    code = job.wait()
    assert code == -signal.SIGKILL, f"expected the hook's SIGKILL at rename {kill_at}, got exit {code}:\n{job.tail()}"


def tell(where: str) -> str:
    print(where)  # shown with a failure's captured output
    return where


# ============================================================================================ training

TRAIN = {"max_epochs": 3, "iterations_per_epoch": 4, "num_threads": 1, "checkpoint_interval_minutes": 0}
TRAIN_SEEDS = [2, 0, 1, 3, 5]  # the first, in the default suite, kills in the first epoch


def train_config(folder: Path, inputs: tuple[Path, Path]) -> Path:
    """A tiny U-Net for 3 epochs of 4 steps, a checkpoint after every step; its runs go to ``folder/runs``."""
    dataset, manifest = inputs
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_config(folder, dataset, manifest, f"sqlite:///{folder / 'mlflow.db'}", train=TRAIN,
                       validation={"overlays": 0, "hd95": False})


def training_outputs(run_dir: Path) -> dict[str, Any]:
    """What a finished run leaves that must not depend on kills: weights and the curves without clock times."""
    from safetensors.torch import load_file

    with open(run_dir / "history.csv", newline="") as fh:
        curves = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(fh)]
    return {"last": load_checkpoint(run_dir / "checkpoints" / "last.safetensors")["model"],
            "best": load_checkpoint(run_dir / "checkpoints" / "best.safetensors")["model"],
            "model": load_file(str(run_dir / "model" / "weights.safetensors")),
            "curves": curves}


def assert_same_training(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert got["curves"] == want["curves"], where
    for name in ("last", "best", "model"):
        assert got[name].keys() == want[name].keys(), f"{where}: {name}"
        different = [k for k, t in want[name].items() if not torch.equal(got[name][k], t)]
        assert not different, f"{where}: {name} weights differ from the uninterrupted run's: {different[:5]}"


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("kill_train_data")
    dataset = write_msd_dataset(tmp / "dataset", n_cases=6)
    manifest = tmp / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.34, seed=1)
    return dataset, manifest


@pytest.fixture(scope="module")
def train_reference(train_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run (in-process: the subprocesses compute the same bits), and its atomic writes in order."""
    config = train_config(tmp_path_factory.mktemp("kill_train_reference"), train_inputs)
    with recording_renames() as renames:
        result = train_run(config)
    run_dir = result.run_dir.resolve()
    return {"outputs": training_outputs(run_dir),
            "renames": [os.path.relpath(p.resolve(), run_dir) for p in renames]}


def checkpoint_state(runs: Path) -> dict[str, Any] | None:
    for last in runs.glob("*/checkpoints/last.safetensors"):
        try:
            return json.loads(load_checkpoint(last)["state"])
        except Exception:  # noqa: BLE001 - gone between the listing and the read: look again
            return None
    return None


def resume_until_finished(config: Path, folder: Path, where: str) -> tuple[Path, bool]:
    """Rerun an interrupted run: ``--resume`` (the kills here all come after the first checkpoint).

    Returns:
        The finished run directory, and whether a rerun was needed (a kill after ``summary.json``
        was written leaves a finished run).
    """
    runs = folder / "runs"
    (run_dir,) = runs.iterdir()
    rerun = not (run_dir / "summary.json").is_file()
    if rerun:
        assert (run_dir / "checkpoints" / "last.safetensors").is_file(), f"{where}: nothing to resume"
        run_medseg(["run", str(config), "--resume", "--no-progress"], folder, folder / "log.txt", where)
    assert [d.name for d in runs.iterdir()] == [run_dir.name], f"{where}: the rerun made another run directory"
    assert (run_dir / "summary.json").is_file(), where
    return run_dir, rerun


def check_resumed_training(folder: Path, config: Path, reference: dict[str, Any], where: str) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, rerun = resume_until_finished(config, folder, where)
    assert_same_training(training_outputs(run_dir), reference["outputs"], where)
    assert temporaries(folder / "runs") == [], f"{where}: temp files left behind"
    if rerun:  # the same MLflow run continued and ended, each epoch logged once
        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        run_id = json.loads((run_dir / "summary.json").read_text())["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED", where
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps == list(range(1, TRAIN["max_epochs"] + 1)), f"{where}: train/loss logged at {steps}"
        steps = [m.step for m in client.get_metric_history(run_id, "system/world_size")]
        assert steps == [0], f"{where}: the run's one-off system metrics logged again on resume, at {steps}"


def kill_training_at_random_moment(tmp_path: Path, config: Path, seed: int) -> str:
    """SIGKILL ``medseg run`` a random delay after the first checkpoint of a random epoch."""
    rng = random.Random(seed)
    epoch, delay = rng.randrange(TRAIN["max_epochs"]), rng.uniform(0.0, 0.8)
    runs = tmp_path / "runs"
    job = Job(["run", str(config), "--no-progress"], tmp_path, tmp_path / "log.txt")
    state: dict[str, Any] = {}

    def reached() -> bool:
        state.update(checkpoint_state(runs) or {})
        return state.get("epoch", -1) >= epoch

    wait_until(job, reached, f"a checkpoint of epoch {epoch + 1}")
    time.sleep(delay)
    ran = job.kill()
    after = checkpoint_state(runs) or {}
    finished = any(runs.glob("*/summary.json"))
    return tell(f"seed {seed}: SIGKILL {delay:.3f} s after the first checkpoint of epoch {epoch + 1} (at "
                f"{ran:.2f} s); the last checkpoint then: {after.get('epoch')} epochs and {after.get('iteration')} "
                f"steps done{', summary.json written' if finished else ''}; temp files: {temporaries(runs)}")


@pytest.mark.timeout(600)
def test_training_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(tmp_path: Path, train_inputs,
                                                                                 train_reference) -> None:
    config = train_config(tmp_path, train_inputs)
    where = kill_training_at_random_moment(tmp_path, config, seed=TRAIN_SEEDS[0])
    check_resumed_training(tmp_path, config, train_reference, where)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", TRAIN_SEEDS[1:])
def test_training_killed_at_more_random_moments(tmp_path: Path, train_inputs, train_reference, seed: int) -> None:
    config = train_config(tmp_path, train_inputs)
    where = kill_training_at_random_moment(tmp_path, config, seed)
    check_resumed_training(tmp_path, config, train_reference, where)


def kill_training_inside_a_write(tmp_path: Path, config: Path, renames: list[str], seed: int) -> str:
    """SIGKILL ``medseg run`` at a random one of its atomic writes from the first checkpoint on."""
    first = renames.index(os.path.join("checkpoints", "last.safetensors"))
    kill_at = random.Random(seed).randrange(first, len(renames)) + 1
    killed_by_hook(["run", str(config), "--no-progress"], tmp_path, tmp_path / "log.txt", kill_at)
    return tell(f"seed {seed}: SIGKILL at atomic write {kill_at} of {len(renames)}, before "
                f"{renames[kill_at - 1]} was renamed into place")


@pytest.mark.slow
@pytest.mark.timeout(600)
# before the rename of: a mid-epoch checkpoint, contract.json, evaluation/val_metrics.json, the last checkpoint
@pytest.mark.parametrize("seed", [0, 5, 6, 9])
def test_training_killed_inside_a_write_resumes_and_leaves_no_temp_file(tmp_path: Path, train_inputs,
                                                                        train_reference, seed: int) -> None:
    config = train_config(tmp_path, train_inputs)
    where = kill_training_inside_a_write(tmp_path, config, train_reference["renames"], seed)
    check_resumed_training(tmp_path, config, train_reference, where)


def test_training_killed_before_its_first_checkpoint_resumes_from_scratch_in_the_same_mlflow_run(
        tmp_path: Path, train_inputs, train_reference) -> None:
    """SIGKILL just before the first checkpoint lands: no checkpoint, the MLflow run left RUNNING.
    ``--resume`` starts again from epoch 0 in that MLflow run (saying so) and ends as an
    uninterrupted run does."""
    from mlflow.tracking import MlflowClient

    config = train_config(tmp_path, train_inputs)
    kill_at = train_reference["renames"].index(os.path.join("checkpoints", "last.safetensors")) + 1
    killed_by_hook(["run", str(config), "--no-progress"], tmp_path, tmp_path / "log.txt", kill_at)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "checkpoints" / "last.safetensors").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert client.get_run(run_id).info.status == "RUNNING"  # what the kill leaves

    run_medseg(["run", str(config), "--resume", "--no-progress"], tmp_path, tmp_path / "log.txt", "resume")
    assert "stopped before its first checkpoint; training starts again from epoch 0 in the same MLflow run " \
        f"{run_id}" in (tmp_path / "log.txt").read_text()
    assert [d.name for d in (tmp_path / "runs").iterdir()] == [run_dir.name]
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, TRAIN["max_epochs"] + 1))
    assert_same_training(training_outputs(run_dir), train_reference["outputs"], "killed before the first checkpoint")
    assert temporaries(tmp_path / "runs") == []


# ============================================================================================= predict

PREDICT_SEEDS = [0, 1, 2]
N_SCANS = 6


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import nibabel as nib

    folder = tmp_path_factory.mktemp("kill_predict_scans")
    for i in range(N_SCANS):
        image, _, affine = make_case((19 + i, 23, 13 + i % 3), seed=60 + i)
        nib.save(nib.Nifti1Image(image, affine), folder / f"scan_{i}.nii.gz")
    return folder


def predict_args(model: dict[str, str], scans: Path, out: Path) -> list[str]:
    return ["predict", "--model", model["model_uri"], "--tracking-uri", model["tracking_uri"], "--input", str(scans),
            "--output", str(out), "--no-progress", "--no-tracking"]


def predict_outputs(out: Path) -> dict[str, Any]:
    with open(out / "predictions.csv", newline="") as fh:
        rows = {row["case_id"]: row for row in csv.DictReader(fh)}
    return {"files": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
            "masks": {p.name: p.read_bytes() for p in sorted(out.glob("scan_*.nii.gz"))},
            "rows": rows, "summary": json.loads((out / "predict_summary.json").read_text())}


@pytest.fixture(scope="module")
def predict_reference(trained_segmentation: dict[str, str], scans: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted predict (in-process, one thread like the subprocesses), and its atomic writes in order."""
    out = tmp_path_factory.mktemp("kill_predict_reference") / "out"
    with one_thread(), recording_renames() as renames:
        assert main(predict_args(trained_segmentation, scans, out)) == 0
    return {**predict_outputs(out), "renames": [p.name for p in renames]}


def check_repredicted(out: Path, reference: dict[str, Any], where: str) -> None:
    import nibabel as nib

    got = predict_outputs(out)
    assert got["files"] == reference["files"], where
    assert len(got["masks"]) == N_SCANS, where
    for name, content in reference["masks"].items():
        assert nib.load(out / name).get_fdata().shape, where  # it loads, in full
        assert got["masks"][name] == content, f"{where}: {name} differs from the uninterrupted run's"
    assert set(got["rows"]) == set(reference["rows"]), f"{where}: predictions.csv misses cases"
    value_columns = [c for c in next(iter(reference["rows"].values())) if c.startswith(("voxels_", "volume_ml_"))]
    assert value_columns, "no value columns to compare"
    for case_id, row in got["rows"].items():
        assert row["status"] in ("ok", "skipped"), f"{where}: {case_id}: {row}"
        assert {c: row[c] for c in value_columns} == {c: reference["rows"][case_id][c] for c in value_columns}, \
            f"{where}: {case_id}"
    assert got["summary"]["counts"]["failed"] == 0, where
    assert temporaries(out) == [], f"{where}: temp files left behind"


def masks_written(out: Path) -> int:
    return sum(1 for _ in out.glob("scan_*.nii.gz")) if out.is_dir() else 0


def kill_predict_at_random_moment(tmp_path: Path, args: list[str], out: Path, per_case_s: float, seed: int) -> str:
    """SIGKILL ``medseg predict`` a random delay after its k-th mask (k = 0: once it has claimed the folder)."""
    rng = random.Random(seed)
    done, delay = rng.randrange(N_SCANS), rng.uniform(0.0, 1.5) * per_case_s
    job = Job(args, tmp_path, tmp_path / "log.txt")
    wait_until(job, lambda: (out / ".medseg_predict_model.json").is_file() and masks_written(out) >= done,
               f"{done} masks were written")
    time.sleep(delay)
    ran = job.kill()
    return tell(f"seed {seed}: SIGKILL {delay:.3f} s after mask {done} of {N_SCANS} (at {ran:.2f} s); "
                f"{masks_written(out)} masks then, temp files: {temporaries(out)}")


@pytest.mark.timeout(600)
def test_predict_killed_at_a_random_moment_reruns_to_the_same_outputs(tmp_path: Path, trained_segmentation, scans,
                                                                      predict_reference) -> None:
    out = tmp_path / "out"
    args = predict_args(trained_segmentation, scans, out)
    per_case = float(predict_reference["summary"]["seconds_per_ok_case"])
    where = kill_predict_at_random_moment(tmp_path, args, out, per_case, PREDICT_SEEDS[0])
    run_medseg(args, tmp_path, tmp_path / "log.txt", where)
    check_repredicted(out, predict_reference, where)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", PREDICT_SEEDS[1:])
def test_predict_killed_at_more_random_moments(tmp_path: Path, trained_segmentation, scans, predict_reference,
                                               seed: int) -> None:
    out = tmp_path / "out"
    args = predict_args(trained_segmentation, scans, out)
    per_case = float(predict_reference["summary"]["seconds_per_ok_case"])
    where = kill_predict_at_random_moment(tmp_path, args, out, per_case, seed)
    run_medseg(args, tmp_path, tmp_path / "log.txt", where)
    check_repredicted(out, predict_reference, where)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [0, 1, 3])  # before the rename of predict_summary.json, predictions.csv, a mask
def test_predict_killed_inside_a_write_reruns_and_leaves_no_temp_file(tmp_path: Path, trained_segmentation, scans,
                                                                      predict_reference, seed: int) -> None:
    out = tmp_path / "out"
    args = predict_args(trained_segmentation, scans, out)
    renames = predict_reference["renames"]
    kill_at = random.Random(seed).randrange(len(renames)) + 1
    killed_by_hook(args, tmp_path, tmp_path / "log.txt", kill_at)
    where = tell(f"seed {seed}: SIGKILL at atomic write {kill_at} of {len(renames)}, before {renames[kill_at - 1]} "
                 f"was renamed into place; temp files then: {temporaries(out)}")
    run_medseg(args, tmp_path, tmp_path / "log.txt", where)
    check_repredicted(out, predict_reference, where)


# ====================================================================================== manifest build

N_CASES = 40
MANIFEST_SEEDS = [0, 1, 2]
SLOW_HASH_S = 0.02  # per file hashed: the 80 files of the build then take ~2 s, in which the kills land


@pytest.fixture(scope="module")
def manifest_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """40 tiny cases; the manifest an uninterrupted build writes; an older one (another seed) to overwrite."""
    tmp = tmp_path_factory.mktemp("kill_manifest")
    dataset = write_msd_dataset(tmp / "dataset", n_cases=N_CASES, shape=(9, 11, 7))
    build_manifest(dataset, tmp / "reference.csv", seed=3, val_fraction=0.25)
    build_manifest(dataset, tmp / "older.csv", seed=4, val_fraction=0.5)
    return {"dataset": dataset, "reference": (tmp / "reference.csv").read_text(),
            "older": (tmp / "older.csv").read_text()}


def manifest_args(dataset: Path, out: Path) -> list[str]:
    return ["manifest", "build", "--from", str(dataset), "--out", str(out), "--seed", "3", "--val-fraction", "0.25"]


def check_manifest_after_kill(out: Path, inputs: dict[str, Any], where: str) -> None:
    """Right after the kill: the manifest is absent, the older one or the new one, never a partial file."""
    if out.exists():
        text = out.read_text()
        assert text in (inputs["older"], inputs["reference"]), f"{where}: a partial manifest:\n{text[:500]}"
        assert len(read_manifest(out).cases) == N_CASES, where


def check_rebuilt_manifest(out: Path, inputs: dict[str, Any], where: str) -> None:
    assert out.read_text() == inputs["reference"], f"{where}: the rebuilt manifest differs from the uninterrupted one"
    assert temporaries(out.parent) == [], f"{where}: temp files left behind"


@pytest.mark.timeout(600)
def test_manifest_build_killed_inside_its_write_keeps_the_old_manifest_and_the_rerun_leaves_no_temp_file(
        tmp_path: Path, manifest_inputs) -> None:
    out = tmp_path / "manifests" / "cases.csv"
    out.parent.mkdir()
    out.write_text(manifest_inputs["older"])  # an earlier build, being replaced
    args = manifest_args(manifest_inputs["dataset"], out)
    killed_by_hook(args, tmp_path, tmp_path / "log.txt", kill_at=1)
    where = tell(f"SIGKILL with the new manifest written to a temp file, before its rename; temp files then: "
                 f"{temporaries(out.parent)}")
    assert out.read_text() == manifest_inputs["older"], f"{where}: the earlier manifest was damaged"
    run_medseg(args, tmp_path, tmp_path / "log.txt", where)
    check_rebuilt_manifest(out, manifest_inputs, where)


def test_writing_a_manifest_removes_only_its_own_stale_temp_files(tmp_path: Path, manifest_inputs) -> None:
    from medseg.data.manifest import write_manifest

    stale = tmp_path / ".cases.csv.k3x_9abc.tmp.csv"  # what a kill before the rename leaves
    others = [tmp_path / ".other.csv.k3x_9abc.tmp.csv", tmp_path / ".cases.csv.bak.k3x_9abc.tmp.csv.bak",
              tmp_path / "cases.csv.k3x_9abc.tmp.csv"]
    for path in (stale, *others):
        path.write_text("half a manifest")
    write_manifest(read_manifest(manifest_inputs["dataset"].parent / "reference.csv"), tmp_path / "cases.csv")
    assert (tmp_path / "cases.csv").read_text() == manifest_inputs["reference"]
    assert not stale.exists() and all(p.exists() for p in others)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", MANIFEST_SEEDS)
def test_manifest_build_killed_at_random_moments_reruns_to_the_same_manifest(tmp_path: Path, manifest_inputs,
                                                                             seed: int) -> None:
    rng = random.Random(seed)
    out = tmp_path / "manifests" / "cases.csv"
    out.parent.mkdir()
    older = rng.random() < 0.5
    if older:
        out.write_text(manifest_inputs["older"])
    delay = rng.uniform(0.0, 1.2) * 2 * N_CASES * SLOW_HASH_S
    args = manifest_args(manifest_inputs["dataset"], out)
    started = tmp_path / "started"
    job = Job(args, tmp_path, tmp_path / "log.txt",
              {"MEDSEG_TEST_STARTED": str(started), "MEDSEG_TEST_SLOW_HASH": str(SLOW_HASH_S)})
    wait_until(job, started.is_file, "its imports were done")
    time.sleep(delay)
    ended = not job.running()
    job.kill()
    where = tell(f"seed {seed}: SIGKILL {delay:.3f} s into the build (hashing {SLOW_HASH_S} s per file)"
                 f"{', over an earlier manifest' if older else ''}{', after it had ended' if ended else ''}; "
                 f"temp files then: {temporaries(out.parent)}")
    check_manifest_after_kill(out, manifest_inputs, where)
    run_medseg(args, tmp_path, tmp_path / "log.txt", where)
    check_rebuilt_manifest(out, manifest_inputs, where)


# ============================================================================ full disk at a checkpoint

#: What safetensors raises when the disk fills while it writes (seen on a 64 KiB tmpfs).
FULL_DISK_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"


def no_space_left(err: BaseException) -> bool:
    """``err``, or an exception it was raised from, says the disk is full."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


@contextmanager
def disk_full_at(save: int, where: str) -> Iterator[list[str]]:
    """The ``save``-th write of a ``last.safetensors`` checkpoint hits a full disk ``where``:

    ``"write"``: safetensors writes part of the file, then fails as it does on a full disk;
    ``"fsync"``: the file is written, and flushing it to disk fails with ENOSPC (delayed allocation).
    Yields the temp files the saves used.
    """
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, real_fsync = safetensors.torch.save_file, os.fsync
    temps: list[str] = []

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if ".last.safetensors." in Path(filename).name:
            temps.append(filename)
            if len(temps) == save and where == "write":
                real_save(tensors, filename, metadata=metadata)
                Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # as far as the disk had room
                raise SafetensorError(FULL_DISK_MESSAGE)
        real_save(tensors, filename, metadata=metadata)

    def fsync(fd: int) -> None:
        flushed = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
        if len(temps) == save and flushed == os.path.realpath(temps[-1]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", save_file)
        if where == "fsync":
            if not Path("/proc/self/fd").is_dir():
                pytest.skip("needs /proc/self/fd to tell which file an fsync flushes")
            patch.setattr(os, "fsync", fsync)
        yield temps


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path, where: str) -> None:
    path = tmp_path / "checkpoints" / "last.safetensors"
    first = {"model": {"w": torch.arange(6.0)}, "state": "first"}
    with disk_full_at(save=2, where=where) as temps:
        save_checkpoint(path, first)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - what matters is what it says
            save_checkpoint(path, {"model": {"w": torch.zeros(6)}, "state": "second"})
    assert len(temps) == 2
    assert no_space_left(raised.value), f"the error does not say the disk is full: {raised.value!r}"
    kept = load_checkpoint(path)
    assert kept["state"] == "first" and torch.equal(kept["model"]["w"], first["model"]["w"])
    assert temporaries(tmp_path) == []


# A run meets either kind of full disk as one exception out of save_checkpoint, so [write] proves the run's
# failure and resume by default; that a failed fsync keeps the previous checkpoint and leaves no temp file is
# test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint[fsync]'s, in the default run too.
@pytest.mark.parametrize("where", ["write", pytest.param("fsync", marks=pytest.mark.slow)])
def test_a_run_whose_disk_fills_at_a_checkpoint_fails_clearly_and_resumes_to_the_uninterrupted_weights(
        tmp_path: Path, train_inputs, train_reference, where: str) -> None:
    config = train_config(tmp_path, train_inputs)
    with disk_full_at(save=6, where=where), pytest.raises(Exception) as raised:  # noqa: PT011
        train_run(config)
    assert no_space_left(raised.value), f"the error does not say the disk is full: {raised.value!r}"
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = json.loads(load_checkpoint(run_dir / "checkpoints" / "last.safetensors")["state"])
    assert (state["epoch"], state["iteration"]) == (1, 1)  # the 5th save: epoch 2, step 1 (step 4 ends epoch 1)
    assert temporaries(run_dir) == []
    # space freed: the run resumes from the previous checkpoint and ends as if nothing had happened
    resumed = train_run(config, resume=True)
    assert resumed.run_dir.resolve() == run_dir.resolve()
    assert_same_training(training_outputs(run_dir), train_reference["outputs"], f"disk full at save 6 ({where})")
    assert temporaries(run_dir) == []
