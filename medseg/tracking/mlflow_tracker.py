"""The one place medseg talks to MLflow.

A local SQLite file is the default store (artifacts in a folder beside it); any other URI,
such as ``http://host:5000`` for a real ``mlflow server``, works unchanged.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import medseg

log = logging.getLogger(__name__)


def default_tracking_uri(db_path: Path = Path("runs/mlflow.db")) -> str:
    return f"sqlite:///{db_path}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


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
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        mlflow.set_tracking_uri(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # Keep a SQLite store's artifacts beside the database, not in the caller's cwd.
            location = (db.parent.resolve() / "artifacts").as_uri() if db is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.run_id: str | None = None
        # On a resumed run: metric key -> (step, value) already in the store, so nothing is logged twice.
        self._logged: dict[str, set[tuple[int, float]]] | None = None

    # ---------------------------------------------------------------------------- lifecycle
    def start(self, run_name: str | None, tags: Mapping[str, str], run_id: str | None = None,
              parent_run_id: str | None = None) -> str:
        """Start a run (a child of ``parent_run_id`` if given), or continue ``run_id`` when resuming."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._logged = {}
        else:
            tags = dict(tags)
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id  # the MLflow UI nests children under it
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    # ---------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_text(v)) for k, v in params.items()]
        existing = self.client.get_run(self._run).data.params
        items = [p for p in items if p.key not in existing]  # a resumed run keeps its params
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run, params=items[start:start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self._run, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run, str(path), artifact_path)

    def log_model(self, model_folder: Path, contract: Mapping[str, Any], registered_name: str | None = None,
                  alias: str | None = None) -> str:
        """Log a medseg model folder as an MLflow pyfunc model (models from code: no pickle).

        The folder's ``medseg_model.json`` and ``weights.safetensors`` become the model's artifacts;
        its code is :mod:`medseg.serving.pyfunc_model`, which only imports the installed medseg, so
        ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run the whole read -> preprocess ->
        network -> invert -> write pipeline. medseg's own loaders read the two artifacts only.

        Args:
            registered_name: also register the model under this name (a new version).
            alias: set this alias (e.g. ``champion``) on the new version; needs ``registered_name``.

        Returns:
            The model URI (``models:/m-<id>``) that ``medseg predict`` and ``mlflow.pyfunc`` accept.
        """
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

        model_folder = Path(model_folder)
        code = Path(medseg.__file__).parent / "serving" / "pyfunc_model.py"
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "path")]),
            outputs=Schema([ColSpec("string", name) for name in ("case_id", "status", "error", "output")]),
            params=ParamSchema([ParamSpec("output_dir", "string", ""), ParamSpec("device", "string", "auto"),
                                ParamSpec("overwrite", "boolean", True)]),
        )
        with mlflow.start_run(run_id=self._run, nested=False):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={"medseg_model": str(model_folder / "medseg_model.json"),
                           "weights": str(model_folder / "weights.safetensors")},
                signature=signature,
                metadata={"medseg_contract": dict(contract), "medseg_format": "medseg-model/1"},
                pip_requirements=[f"medseg=={medseg.__version__}"],
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
        """The command that opens the MLflow UI on this store."""
        db = _sqlite_path(self.uri)
        if db is not None:
            return f"mlflow ui --backend-store-uri sqlite:///{db.resolve()}  (then open http://127.0.0.1:5000)"
        return f"open {self.uri} in a browser"


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class NullTracker(MlflowTracker):
    """Stands in for the tracker on the non-main processes of a distributed run: one run, one writer."""

    def __init__(self, uri: str = "", experiment: str = ""):  # noqa: D107 - no store is touched
        self.uri = uri
        self.run_id = None
        self._logged = None

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

    def log_model(self, model_folder: Path, contract: Mapping[str, Any], registered_name: str | None = None,
                  alias: str | None = None) -> str:
        return ""
