"""The one place medseg talks to MLflow.

A local SQLite file is the default store (artifacts in a folder beside it); any other URI,
such as ``http://host:5000`` for a real ``mlflow server``, works unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sqlite3
import subprocess
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from medseg.errors import RunError
from medseg.tracking.sqlite_store import store_error_message, store_lock, use_wal

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)

#: The experiment tag MLflow keeps an experiment's kind in (what its "Machine learning" / "GenAI apps"
#: choice writes); ``custom_model_development`` is model training. UIs that read it open the
#: experiment in the runs-and-charts layout instead of guessing; MLflow 3.17's own UI follows its
#: global switch instead, which the links medseg prints set (:meth:`MlflowTracker.run_page`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

#: What MLflow allows in an image key; anything else in a case id becomes ``_``.
_IMAGE_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run reads, as the MLflow run page lists it under "Datasets used".

    Attributes:
        name: what the UI shows (for a manifest: its file stem and the role, ``cases/train``).
        digest: the content hash (MLflow keeps at most 36 characters).
        source: the file it comes from.
        context: the role, ``train``, ``val`` or ``test`` (MLflow's ``mlflow.data.context`` tag).
        profile: a few figures the UI shows with it (case counts, split name).
    """

    name: str
    digest: str
    source: Path
    context: str
    profile: Mapping[str, Any] = field(default_factory=dict)


def default_tracking_uri(db_path: Path = Path("runs/mlflow.db")) -> str:
    return f"sqlite:///{db_path}"


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative ``sqlite:///`` path made absolute (from the current folder), so a
    summary or a result read from another folder still names the same store; other URIs as given."""
    path = _sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None and not path.is_absolute() else uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


_F = TypeVar("_F", bound=Callable[..., Any])


def _clear_lock_errors(method: _F) -> _F:
    """A SQLite store still locked after MLflow's 20 s busy timeout: say so, and what to use instead."""
    @functools.wraps(method)
    def wrapper(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except MlflowException as err:
            db = _sqlite_path(self.uri)
            if db is None or "database is locked" not in str(err):
                raise
            raise RunError(store_error_message(db, err)) from err
    return wrapper  # type: ignore[return-value]


def git_commit(cwd: Path | None = None) -> str:
    """Current git commit of the working directory, or ``unknown`` outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowTracker:
    """One MLflow run per pipeline execution.

    Args:
        uri: tracking URI (``sqlite:///path.db``, ``http://host:port``, ...).
        experiment: experiment name; created on first use.
    """

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        db = _sqlite_path(uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment_id(experiment, None)
        else:
            db.parent.mkdir(parents=True, exist_ok=True)
            # Keep a SQLite store's artifacts beside the database, not in the caller's cwd.
            location = (db.parent.resolve() / "artifacts").as_uri()
            try:
                # MlflowClient() opens the store, and MLflow creates or migrates a new store's schema
                # right then, unlocked: two runs started together on a fresh store would both migrate
                # it and one would die. So the first open (and the experiment's creation) takes turns.
                with store_lock(db):
                    use_wal(db)
                    self.client = MlflowClient(tracking_uri=uri)
                    self.experiment_id = self._experiment_id(experiment, location)
            except Exception as err:
                from alembic.util import CommandError  # MLflow's migrations; imported by now

                # MLflow lets SQLAlchemy's, SQLite's and alembic's errors through as they are.
                if not isinstance(err, (MlflowException, SQLAlchemyError, sqlite3.Error, OSError, CommandError)):
                    raise
                raise RunError(store_error_message(db, err)) from err
        mlflow.set_tracking_uri(uri)
        self.run_id: str | None = None
        # On a resumed run: metric key -> (step, value) already in the store, so nothing is logged twice.
        self._logged: dict[str, set[tuple[int, float]]] | None = None
        # On a resumed run: the image artifacts already there, ``images/<key>+step+<step>+...``.
        self._logged_images: set[str] | None = None
        self._system_metrics: SystemMetricsMonitor | None = None

    def _experiment_id(self, name: str, location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(self.client.create_experiment(name, artifact_location=location,
                                                         tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}))
            except MlflowException as err:
                # Another process created it since we looked (on a server, or another machine): use theirs.
                found = self.client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
                if found is None:
                    raise
        if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before medseg tagged them; a kind
            # someone chose in the UI stays as they chose it
            try:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            except MlflowException as err:  # a shared server where this user may log runs but not edit it
                log.debug("experiment %s not tagged %s: %s", name, EXPERIMENT_KIND_TAG, err)
        return str(found.experiment_id)

    # ---------------------------------------------------------------------------- lifecycle
    @_clear_lock_errors
    def start(self, run_name: str | None, tags: Mapping[str, str], run_id: str | None = None,
              parent_run_id: str | None = None) -> str:
        """Start a run (a child of ``parent_run_id`` if given), or continue ``run_id`` when resuming."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._logged = {}
            self._logged_images = None  # listed when the first image comes
        else:
            tags = dict(tags)
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id  # the MLflow UI nests children under it
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        return self.run_id

    @_clear_lock_errors
    def end(self, status: str = "FINISHED") -> None:
        self.stop_system_metrics()
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def start_system_metrics(self, interval_s: float = 10.0, resume: bool = False) -> None:
        """Sample CPU, memory, disk, network (and GPU, where ``nvidia-ml-py`` is installed) every
        ``interval_s`` seconds into ``system/...`` metrics of the run, until :meth:`end`.

        MLflow's own monitor does the sampling, in a background thread; the run page shows the
        curves in its "System metrics" tab. A resumed run continues the steps where they stopped.
        """
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.stop_system_metrics()
        self._system_metrics = SystemMetricsMonitor(self._run, sampling_interval=interval_s,
                                                    resume_logging=resume, tracking_uri=self.uri)
        self._system_metrics.start()

    def stop_system_metrics(self) -> None:
        """Stop sampling and write what was sampled (nothing happens when none runs)."""
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            monitor.finish()

    # ---------------------------------------------------------------------------- logging
    @_clear_lock_errors
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_text(v)) for k, v in params.items()]
        existing = self.client.get_run(self._run).data.params
        items = [p for p in items if p.key not in existing]  # a resumed run keeps its params
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run, params=items[start:start + 100])

    @_clear_lock_errors
    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self._run, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_clear_lock_errors
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(float(v))]
        if self._logged is not None:
            # Resumed: what was logged before the crash is not logged again. A new value for an
            # old step (a re-evaluation after more training) is, and the newer one is what MLflow shows.
            items = [m for m in items if (step, m.value) not in self._logged_points(m.key)]
            for m in items:
                self._logged_points(m.key).add((step, m.value))
        if items:
            self.client.log_batch(self._run, metrics=items)

    def _logged_points(self, key: str) -> set[tuple[int, float]]:
        logged = self._logged if self._logged is not None else {}
        if key not in logged:
            logged[key] = {(m.step, m.value) for m in self.client.get_metric_history(self._run, key)}
        return logged[key]

    @_clear_lock_errors
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run, str(path), artifact_path)

    @_clear_lock_errors
    def log_image(self, key: str, image: np.ndarray | Path, step: int) -> None:
        """Log a picture of the run at ``step``: the run page shows each key's pictures with a
        slider over the steps (an epoch's overlays, say, to watch training progress).

        Args:
            key: the picture's name, e.g. ``val/overlay/case_003``; characters MLflow does not
                allow in a key become ``_``.
            image: an RGB(A) or grey uint8 array (H, W[, C]), or the path of a PNG file.
            step: the training step or epoch it shows.
        """
        key = _IMAGE_KEY_UNSAFE.sub("_", key)
        if self._logged is not None and self._image_logged(key, step):
            return  # a resumed run repeating a validation it had logged before the crash
        if isinstance(image, Path):
            from PIL import Image

            with Image.open(image) as opened:
                picture: Any = opened.convert("RGB")
        else:
            picture = np.ascontiguousarray(image)
        self.client.log_image(self._run, picture, key=key, step=step, synchronous=True)

    def _image_logged(self, key: str, step: int) -> bool:
        if self._logged_images is None:
            self._logged_images = {item.path for item in self.client.list_artifacts(self._run, "images")}
        # MLflow names them images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png
        prefix = f"images/{key.replace('/', '~')}+step+{step}+"
        return any(path.startswith(prefix) for path in self._logged_images)

    @_clear_lock_errors
    def log_dataset_inputs(self, datasets: Sequence[DatasetRecord]) -> None:
        """Log ``datasets`` as the run's inputs (the run page's "Datasets used", with their context).

        MLflow keeps one input per name and digest, so a resumed run logging them again adds nothing.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for record in datasets:
            # What mlflow.data's MetaDataset over a local file logs (source type "local", source
            # {"uri": path}), plus the profile, which MetaDataset cannot carry.
            entity = Dataset(name=record.name, digest=record.digest, source_type="local",
                             source=json.dumps({"uri": str(Path(record.source).resolve())}),
                             profile=json.dumps(dict(record.profile)))
            inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, record.context)]))
        if inputs:
            self.client.log_inputs(self._run, datasets=inputs)

    def log_model(self, model_folder: Path, contract: Mapping[str, Any], registered_name: str | None = None,
                  alias: str | None = None) -> str:
        """Log a medseg model folder as an MLflow pyfunc model that holds no code.

        The folder's ``medseg_model.json`` and ``weights.safetensors`` become the model's data
        (``data/medseg_model/``); its ``MLmodel`` names the installed :mod:`medseg.serving.pyfunc_loader`
        as the loader, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run medseg's own
        code only, and medseg's wheel is bundled (``wheels/``, named by path in ``requirements.txt``)
        so no environment manager asks a package index for ``medseg``. The sha256 of every logged
        file is recorded in ``MLmodel``'s metadata for ``medseg model check``.

        Args:
            registered_name: also register the model under this name (a new version).
            alias: set this alias (e.g. ``champion``) on the new version; needs ``registered_name``.

        Returns:
            The model URI (``models:/m-<id>``) that ``medseg predict`` and ``mlflow.pyfunc`` accept.
        """
        import shutil
        import tempfile
        import types

        from mlflow.models import Model

        from medseg.tracking.model_layout import (
            FILES_METADATA_KEY,
            LOADER_MODULE,
            MLFLOW_DATA_FOLDER,
            WHEELS_FOLDER,
            file_sha256,
        )
        from medseg.tracking.wheel import cache_root, medseg_wheel

        with tempfile.TemporaryDirectory(prefix="medseg-log-") as tmp:
            wheel = medseg_wheel(cache_root() / "wheels", scratch=Path(tmp))
            data = Path(tmp) / Path(MLFLOW_DATA_FOLDER).name
            data.mkdir()
            # the folder's JSON, weights and any file it pins (medseg model check refuses others)
            names = sorted(p.name for p in Path(model_folder).iterdir() if p.is_file() and not p.name.startswith("."))
            for name in names:
                shutil.copy2(Path(model_folder) / name, data / name)
            files = {f"{MLFLOW_DATA_FOLDER}/{name}": file_sha256(data / name) for name in names}
            requirements = [_torch_requirement()]
            if wheel is not None:
                files[f"{WHEELS_FOLDER}/{wheel.name}"] = file_sha256(wheel)
                requirements.insert(0, f"{WHEELS_FOLDER}/{wheel.name}")

            def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
                mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
                if wheel is not None:  # beside MLmodel, where requirements.txt names it
                    (Path(path) / WHEELS_FOLDER).mkdir()
                    shutil.copyfile(wheel, Path(path) / WHEELS_FOLDER / wheel.name)

            # mlflow.pyfunc, saving the wheel too: MLflow's own add_libraries_to_model would download
            # a wheel of every requirement (torch included) from the index
            flavor = types.SimpleNamespace(__name__="mlflow.pyfunc", save_model=save_model)
            # no input example on purpose: MLflow would run the model on it while logging, and the
            # explicit signature already says what goes in; its warning about that is noise here
            with mlflow.start_run(run_id=self._run, nested=False), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                info = Model.log(
                    artifact_path=None, name="model", flavor=flavor, loader_module=LOADER_MODULE, data_path=str(data),
                    signature=pyfunc_signature(), pip_requirements=requirements,
                    metadata={"medseg_contract": dict(contract), "medseg_format": "medseg-model/2",
                              FILES_METADATA_KEY: files},
                    registered_model_name=registered_name,
                )
        if registered_name and alias:
            version = info.registered_model_version
            self.client.set_registered_model_alias(registered_name, alias, str(version))
            log.info("registered %s version %s as models:/%s@%s", registered_name, version, registered_name, alias)
        return str(info.model_uri)

    @property
    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker: no active run; call start() first")
        return self.run_id

    def ui_hint(self) -> str:
        """How to open this run in the MLflow UI: the command that serves a SQLite store, and the
        run page's address."""
        db = _sqlite_path(self.uri)
        if db is not None:
            return (f"mlflow ui --backend-store-uri sqlite:///{db.resolve()}  "
                    f"(then open {self.run_page('http://127.0.0.1:5000')})")
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.run_page(self.uri)} in a browser"
        return f"mlflow ui --backend-store-uri {self.uri}  (run {self.run_id})"

    def run_page(self, server: str) -> str:
        """The address of the run's page (the experiment's without a run) on the MLflow UI at ``server``.

        MLflow 3.17's UI takes its GenAI or model-training layout from the browser (its "GenAI |
        Model training" switch), not from the experiment's tag; the address asks for model training.
        """
        page = f"{server.rstrip('/')}/#/experiments/{self.experiment_id}"
        page += f"/runs/{self.run_id}" if self.run_id else "/runs"
        return f"{page}?workflowType=machine_learning"


def pyfunc_signature() -> Any:
    """The served model's signature: a ``path`` column in, one row per case out; ``device`` may only
    name the server's own device and ``output_dir`` is refused (the operator's roots decide)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "path")]),
        outputs=Schema([ColSpec("string", name) for name in ("case_id", "status", "error", "output")]),
        params=ParamSchema([ParamSpec("output_dir", "string", ""), ParamSpec("device", "string", "auto")]),
    )


def _torch_requirement() -> str:
    """torch as pyproject.toml's dependencies bound it (installed metadata, else the checkout's file)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        found = [r for r in requires("medseg") or [] if re.match(r"torch\b", r) and "extra" not in r]
    except PackageNotFoundError:
        found = []
    return found[0].replace(" ", "") if found else "torch>=2.4,<=2.13.0"


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class NullTracker(MlflowTracker):
    """Stands in for the tracker on the non-main processes of a distributed run: one run, one writer."""

    def __init__(self, uri: str = "", experiment: str = ""):  # noqa: D107 - no store is touched
        self.uri = uri
        self.experiment_id = ""
        self.run_id = None
        self._logged = None
        self._logged_images = None
        self._system_metrics = None

    def start(self, run_name: str | None, tags: Mapping[str, str], run_id: str | None = None,
              parent_run_id: str | None = None) -> str:
        return ""

    def end(self, status: str = "FINISHED") -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, key: str, image: np.ndarray | Path, step: int) -> None:
        pass

    def log_dataset_inputs(self, datasets: Sequence[DatasetRecord]) -> None:
        pass

    def start_system_metrics(self, interval_s: float = 10.0, resume: bool = False) -> None:
        pass

    def log_model(self, model_folder: Path, contract: Mapping[str, Any], registered_name: str | None = None,
                  alias: str | None = None) -> str:
        return ""
