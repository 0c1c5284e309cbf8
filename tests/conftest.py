"""Shared fixtures: tiny, seeded, deliberately awkward volumes written to disk in real layouts."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

# One intra-op thread per test process, set before numpy or torch starts its thread pool: the suite
# runs a worker per core (xdist) and many tests start further processes, so a pool per process
# as wide as the machine only oversubscribes the cores (OpenMP threads spinning while they wait
# for a core); the training loop honours it too (medseg.engine.runtime.configure_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Byte-code caches written, whatever the environment says: this machine's (CI runs on one like it)
# sets PYTHONDONTWRITEBYTECODE=1 and `make install-dev` installs with --no-compile, so every process
# the suite starts (CLI runs, torchrun workers, Ray actors, the tiny benchmarks: hundreds) compiled
# torch's, MONAI's and MLflow's modules from source again -- 12 s of CPU for `import monai, mlflow`
# here against 5 s with their caches. Each module now compiles once, in the first process to import
# it; child processes inherit this.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if TYPE_CHECKING:
    from medseg import RunResult

warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Predict on torch unless a test names another backend: an ONNX export per loaded model (what the
# default, auto, does where OpenVINO or ONNX Runtime is installed) would add seconds to every test
# that predicts; tests/engine/test_predict_backends.py covers the backends and auto.
os.environ.setdefault("MEDSEG_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]
# Fresh MLflow stores copied from one migrated template, here and in child processes (the folder's
# sitecustomize.py); tests/site/medseg_test_mlflow_template.py says why.
SITE = Path(__file__).resolve().parent / "site"
os.environ.setdefault("MEDSEG_TEST_MLFLOW_TEMPLATE_DIR",
                      str(Path(tempfile.gettempdir()) / f"medseg-test-mlflow-template-{os.getuid()}"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(SITE))
from medseg_test_mlflow_template import TEMPLATE_DIR_ENV, install_after_import  # noqa: E402

install_after_import()
#: Test files about MLflow's own creation of a new store: they get MLflow's migrations, not the copy.
REAL_STORE_CREATION = ("test_concurrent_store.py",)
SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
TCIA = SHARED_DATA / "tcia_brain_tumor_progression_pgbm001"
HIPPO = SHARED_DATA / "msd_task04_hippocampus"
DEMO = REPO / "medseg" / "demo" / "hippocampus"


def require(path: Path) -> Path:
    """The real data kit lives in ../shared/data beside the clone (CI has it); fail loudly if not."""
    if not path.exists():
        pytest.fail(f"real test data missing: {path}. Clone next to shared/ or set MEDSEG_SHARED_DATA.")
    return path


def oblique_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float], angle_deg: float = 17.0) -> np.ndarray:
    """A non-identity RAS affine: rotation about z plus anisotropic spacing and an offset origin."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def make_case(shape: tuple[int, int, int] = (29, 37, 23), seed: int = 0, num_labels: int = 2,
              spacing: tuple[float, float, float] = (0.9, 1.1, 2.3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image with bright blobs whose labels are 1..num_labels; returns (image, label, affine)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    for value in range(1, num_labels + 1):
        centre = np.array([rng.uniform(0.3, 0.7) * s for s in shape])
        radius = rng.uniform(0.15, 0.22) * min(shape)
        label[np.linalg.norm(grid - centre, axis=-1) < radius] = value
    image = rng.normal(0.0, 0.3, shape).astype(np.float32) + label.astype(np.float32) * 1.5 + 10.0
    affine = oblique_affine(spacing, (float(rng.uniform(-50, 50)), -12.5, 7.25))
    return image, label, affine


def write_msd_dataset(root: Path, n_cases: int = 8, shape: tuple[int, int, int] = (29, 37, 23), seed: int = 0,
                      num_labels: int = 2) -> Path:
    """An MSD-layout folder (imagesTr/, labelsTr/, dataset.json) of synthetic cases."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        image, label, affine = make_case(shape, seed=seed + i, num_labels=num_labels)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", **{str(v): f"blob{v}" for v in range(1, num_labels + 1)}}
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "labels": labels, "training": training,
                                                    "numTraining": n_cases, "modality": {"0": "MRI"}}))
    return root


@pytest.fixture
def msd_dataset(tmp_path: Path) -> Path:
    return write_msd_dataset(tmp_path / "dataset")


def write_config(folder: Path, cfg: dict, sections: dict) -> Path:
    """``folder/config.yaml`` from ``cfg`` with ``sections`` merged in (a dict merges, anything else replaces)."""
    import yaml

    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_run(config: Path | str, **options: Any) -> RunResult:
    """``medseg.train(config, progress=False, **options)``: the :class:`~medseg.RunResult` of a
    single-process run (which always has one)."""
    import medseg

    result = medseg.train(config, **{"progress": False, **options})
    assert result is not None, "medseg.train returned None outside a distributed run"
    return result


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:  # noqa: ANN001 - MlflowClient
    """Every artifact path of an MLflow run, recursively."""
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out.add(item.path)
        if item.is_dir:
            out |= artifact_paths(client, run_id, item.path)
    return out


def tiny_config(tmp_path: Path, dataset: Path, manifest: Path, tracking_uri: str, **sections: dict) -> Path:
    """A config that trains a very small U-Net for a few seconds on the synthetic dataset."""
    cfg = {
        "task": "segmentation",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(dataset),
                 "labels": {0: "background", 1: "blob1", 2: "blob2"}, "channels": ["mri"]},
        "preprocess": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.5], "intensity": {"mode": "zscore"}},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0]}, {"name": "noise", "prob": 0.2, "std": 0.05}],
        "patch": {"size": [16, 16, 8], "samples_per_volume": 2},
        "model": {"name": "unet", "channels": [4, 8, 16], "num_res_units": 1},
        "optim": {"lr": 0.01},
        "train": {"max_epochs": 2, "batch_size": 2, "val_interval": 1, "num_threads": 1},
        "validation": {"overlays": 2},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
    }
    return write_config(tmp_path, cfg, sections)


@pytest.fixture
def tiny_run_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic MSD dataset (odd shapes, anisotropic oblique grids) and its manifest."""
    from medseg.data.build import build_manifest

    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=6)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.34, seed=1)
    return dataset, manifest


def write_medmnist_npz(path: Path, shape: tuple[int, ...] = (21, 17), counts: tuple[int, int, int] = (24, 8, 8),
                       classes: int = 2, seed: int = 0) -> Path:
    """A MedMNIST-layout .npz (uint8 images, (N, 1) labels) of a learnable task: class k has a
    bright square whose size grows with k, on noise. Odd image sizes on purpose."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, *shape), dtype=np.uint8)
        for i, k in enumerate(labels):
            half = 1 + 2 * int(k)
            centre = [s // 2 + int(rng.integers(-2, 3)) for s in shape[:3] if s > 3]
            region = tuple(slice(max(0, c - half), c + half + 1) for c in centre)
            images[i][region] = 200
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def classification_config(tmp_path: Path, manifest: Path, root: Path, tracking_uri: str, dims: int = 2,
                          size: tuple[int, ...] = (21, 17), **sections: dict) -> Path:
    """A config that trains a tiny LeNet for a few seconds on an imported synthetic MedMNIST file."""
    cfg = {
        "task": "classification",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(root), "labels": {0: "normal", 1: "lesion"},
                 "channels": ["image"]},
        "preprocess": {"orientation": None, "intensity": {"mode": "ct_window", "window": [0, 255]},
                       "resize": list(size)},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0]}, {"name": "noise", "prob": 0.2, "std": 0.02}],
        "model": {"name": "lenet", "spatial_dims": dims, "channels": [4, 8]},
        "loss": {"name": "ce", "class_weights": "balanced"},
        "optim": {"lr": 0.01},
        "train": {"max_epochs": 3, "batch_size": 8, "val_interval": 1, "num_threads": 1},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
    }
    return write_config(tmp_path, cfg, sections)


#: Set by a test that runs tests in a child pytest process (tests/engine/test_predict_ray.py): the
#: ``trained_segmentation`` it already has, as JSON, so that the child does not train another.
TRAINED_SEGMENTATION_ENV = "MEDSEG_TEST_TRAINED_SEGMENTATION"


@pytest.fixture(scope="session")
def trained_segmentation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny U-Net trained two epochs on 4 synthetic cases, registered as ``tiny-seg`` with the
    alias ``champion``: one model for every test that predicts, loads or tampers with one (copy
    its files before changing them). Predictions only need to be well-formed, not good."""
    from medseg.data.build import build_manifest

    if os.environ.get(TRAINED_SEGMENTATION_ENV):  # the parent test process's, in a child pytest process
        return dict(json.loads(os.environ[TRAINED_SEGMENTATION_ENV]))
    tmp = tmp_path_factory.mktemp("trained_segmentation")
    dataset = write_msd_dataset(tmp / "dataset", n_cases=4)
    manifest = tmp / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.25, seed=0)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = tiny_config(tmp, dataset, manifest, uri, train={"max_epochs": 2, "batch_size": 2, "num_threads": 1},
                         validation={"overlays": 0, "hd95": False},
                         tracking={"register_model_as": "tiny-seg", "model_alias": "champion"})
    result = train_run(config)
    return {"model_uri": result.model_uri, "run_id": result.run_id, "tracking_uri": uri, "tmp": str(tmp),
            "run_dir": str(result.run_dir)}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_answering(url: str, proc: Any, timeout_s: float, log_path: Path, what: str) -> None:
    """Poll ``url`` until it answers 200; fail the test with ``log_path``'s tail if ``proc`` exits first
    or ``timeout_s`` passes (a real server process takes seconds to start)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "still not answering"
            pytest.fail(f"{what} did not come up ({state}); its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


#: ``python -c KILL_AT_SECOND_CHECKPOINT run CONFIG`` (or ``pretrain ...``): medseg's CLI, SIGKILLed as it
#: renames its second ``last.safetensors`` into place, i.e. mid-training after a checkpoint was written.
KILL_AT_SECOND_CHECKPOINT = ("import os, signal, sys\nreal, seen = os.replace, []\n"
                             "def replace(src, dst, *a, **k):\n"
                             "    if os.path.basename(os.fspath(dst)) == 'last.safetensors':\n"
                             "        seen.append(dst)\n"
                             "        if len(seen) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
                             "    return real(src, dst, *a, **k)\n"
                             "os.replace = replace\nfrom medseg.cli import main\nsys.exit(main())\n")


#: Test files that take minutes (the tiny benchmarks, a wheel installed into a fresh venv, several-process
#: runs, real servers, mypy), longest first, from the suite's durations (junit XML of a whole run).
#: pytest-xdist hands out whole files in collection order (pyproject's --no-loadscope-reorder: by default
#: it sorts files by their number of tests, which put the one-test newcomer file last, running alone),
#: so these start first and the short files fill in around them.
LONG_FILES = ("test_benchmarks.py", "test_newcomer.py", "test_distributed.py", "test_predict_ray.py", "test_kill.py",
              "test_concurrent_store.py", "test_mlflow_server.py", "test_architecture.py", "test_end_to_end.py",
              "test_review.py", "test_bench_regression.py", "test_examples.py")


@pytest.fixture(autouse=True)
def _store_creation_by_mlflow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.path.name in REAL_STORE_CREATION:
        monkeypatch.setenv(TEMPLATE_DIR_ENV, "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


#: A default-run test still running after this long has hung (the longest takes ~3 min on a loaded
#: 2-core host): it fails with its stack (pytest-timeout) instead of holding the suite until CI's limit.
DEFAULT_TEST_TIMEOUT_S = 900


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` that survives a crashed worker (tests/xdist_support.py says how xdist does not)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from tests.xdist_support import RecoveringLoadFileScheduling

    return RecoveringLoadFileScheduling(config, log)
