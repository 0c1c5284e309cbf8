"""A logged medseg model the way MLflow runs it: ``mlflow.pyfunc.load_model`` and ``mlflow models serve``.

The MLflow model holds no code: its ``MLmodel`` names :mod:`medseg.serving.pyfunc_loader`, which
builds a :class:`MedsegPyfunc` over the model's JSON and safetensors (checked first, see
:mod:`medseg.engine.model_check`). ``predict`` takes a DataFrame with a ``path`` column and
returns one row per case: ``case_id, path, status, error, output`` plus the task's values
(per-label voxels and mL for segmentation, class probabilities for classification, PSNR/SSIM
for reconstruction). A case that fails is a row with ``status == "failed"`` and the reason.

A client of a served model is not trusted, so the operator's :class:`~medseg.serving.guard.ServeLimits`
(``MEDSEG_SERVE_*`` variables) apply as they do to ``medseg serve``:

* paths are accepted only when the operator set ``MEDSEG_SERVE_INPUT_ROOT`` and
  ``MEDSEG_SERVE_OUTPUT_ROOT``; each is resolved inside the input root (links followed) and
  refused otherwise with one message whether or not it exists, so folders, ``..``, absolute paths
  elsewhere and links out of the root read nothing;
* outputs go to a fresh folder under the output root, one per request (``output`` is relative
  to the root); a client's ``params.output_dir`` is refused;
* the device is the operator's (``MEDSEG_SERVE_DEVICE``, default ``auto``), loaded once; a
  client's ``params.device`` other than that one is refused, never loaded;
* at most ``max_rows`` paths per request, ``max_concurrent`` predictions at once (1 when it is 0)
  and ``queue`` requests waiting; more is answered 429;
* a scan whose header claims more than ``max_voxels`` voxels is a failed row, never read;
* after ``timeout_s`` the cases not yet started are failed rows saying so: the work stops at the
  next case (the one running finishes, bounded by ``max_voxels``), not after the client gave up.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.serving.guard import PathRefused, ServeLimits, resolve_inside

#: The environment variable naming the device a served model predicts on (the operator's, not the client's).
DEVICE_ENV = "MEDSEG_SERVE_DEVICE"


def _refuse(message: str, code: str = "INVALID_PARAMETER_VALUE") -> Exception:
    """An error MLflow's scoring server answers with its status (400, 403, 429) and the message only."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    return MlflowException(message, error_code=ErrorCode.Value(code))


class MedsegPyfunc:
    """A medseg model served through MLflow: loaded once, on the operator's device, within the operator's limits.

    Args:
        root: the model folder (the MLflow model's root, or a medseg model folder).
        limits: the operator's limits; default :meth:`ServeLimits.from_env`.
        device: the device; default ``$MEDSEG_SERVE_DEVICE``, else ``auto``.

    Raises:
        ModelLoadError: the model folder was tampered with, or is damaged.
    """

    def __init__(self, root: Path, limits: ServeLimits | None = None, device: str | None = None):
        from medseg.api import Predictor

        self.limits = limits or ServeLimits.from_env()
        self.device_name = device or os.environ.get(DEVICE_ENV) or "auto"
        self.predictor = Predictor.from_uri(str(root), device=self.device_name)
        self._slots = threading.BoundedSemaphore(max(1, self.limits.max_concurrent))
        self._lock = threading.Lock()
        self._waiting = 0

    # No type hints on predict: MLflow would read them as a schema; the logged signature is the schema.
    def predict(self, model_input, params=None):  # type: ignore[no-untyped-def]
        """One row per case of the scans at ``model_input["path"]`` (relative to the input root).

        Raises:
            MlflowException: path mode is off, ``output_dir`` or another device was asked for, too
                many rows (400), or too many requests waiting (429).
        """
        import pandas as pd

        params = dict(params or {})
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" not in frame.columns:
            raise _refuse(f"expected a DataFrame with a 'path' column (scan files relative to the server's input "
                          f"root), got columns {list(frame.columns)}")
        self._check_params(params)
        input_root, output_root = self._roots()
        paths = list(frame["path"])
        if len(paths) > self.limits.max_rows:
            raise _refuse(f"{len(paths)} paths in one request; this server takes at most {self.limits.max_rows} "
                          "(MEDSEG_SERVE_MAX_ROWS): send them in several requests")
        with self._slot():
            return self._predict(paths, input_root, output_root)

    def _check_params(self, params: dict[str, Any]) -> None:
        if str(params.get("output_dir") or ""):
            raise _refuse(f"params.output_dir {str(params['output_dir'])[:200]!r} refused: a served medseg model "
                          "writes each request into a fresh folder under the operator's output root "
                          "(MEDSEG_SERVE_OUTPUT_ROOT); omit output_dir and read 'output' in the answer")
        device = str(params.get("device") or "auto")
        own = {"auto", self.device_name, str(self.predictor.device), self.predictor.device.type}
        if device not in own:
            raise _refuse(f"params.device {device[:100]!r} refused: this server predicts on "
                          f"{self.predictor.device} (set by its operator with {DEVICE_ENV}); omit device or send "
                          f"{str(self.predictor.device)!r}")

    def _roots(self) -> tuple[Path, Path]:
        if self.limits.input_root is None or self.limits.output_root is None:
            raise _refuse("this served model takes no paths: its operator set no input and output roots. Ask them "
                          "to set MEDSEG_SERVE_INPUT_ROOT and MEDSEG_SERVE_OUTPUT_ROOT, or send the scan itself to "
                          "`medseg serve`", "PERMISSION_DENIED")
        return self.limits.input_root, self.limits.output_root

    @contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self._waiting >= self.limits.max_concurrent + self.limits.queue + 1:
                raise _refuse(f"server busy: {self._waiting} requests running or waiting (MEDSEG_SERVE_QUEUE="
                              f"{self.limits.queue}); try again later", "RESOURCE_EXHAUSTED")
            self._waiting += 1
        try:
            with self._slots:
                yield
        finally:
            with self._lock:
                self._waiting -= 1

    def _predict(self, paths: list[Any], input_root: Path, output_root: Path) -> Any:
        import pandas as pd

        accepted: dict[str, str] = {}  # resolved path -> what the client sent
        resolved: dict[int, str] = {}
        refused: dict[int, str] = {}
        for index, path in enumerate(paths):
            try:
                resolved[index] = str(resolve_inside(input_root, path))
            except PathRefused as err:
                refused[index] = str(err)
                continue
            too_big = self._too_many_voxels(Path(resolved[index]), str(path))
            if too_big:
                refused[index] = too_big
                del resolved[index]
            else:
                accepted.setdefault(resolved[index], str(path))
        root = output_root.resolve()
        out = Path(tempfile.mkdtemp(prefix="request-", dir=root))  # fresh, private: nothing is overwritten
        results = []
        if accepted:
            report = self.predictor.predict_paths(list(accepted), out, overwrite=False,
                                                  time_limit_s=self.limits.timeout_s)
            results = list(report.results)
        main_column = next(iter(self.predictor.output_columns), None)  # a classifier writes no file per case
        by_input = {result.input: result for result in results}
        rows: list[dict[str, Any]] = []
        for index, path in enumerate(paths):
            if index in refused:
                rows.append({"case_id": "", "path": str(path), "status": "failed", "error": refused[index],
                             "output": ""})
            elif resolved[index] in by_input:
                rows.append(self._row(by_input[resolved[index]], str(path), root, main_column))
        rows += [self._row(result, accepted.get(result.input, result.input), root, main_column)
                 for result in results if result.input not in resolved.values()]  # channel files grouped
        table = pd.DataFrame(rows)
        # a failed row has no values: None (JSON null), not NaN, which strict JSON parsers refuse
        return table.astype(object).where(pd.notna(table), None)

    def _too_many_voxels(self, path: Path, shown: str) -> str | None:
        """Why a scan is refused unread (its header claims more than ``max_voxels``), else None; a
        header that cannot be read is left to the predictor, which reports what it found."""
        from medseg.serving.problems import Problem
        from medseg.serving.uploads import count_voxels, sniff

        try:
            kind = sniff(path) if path.is_file() else None
            voxels = count_voxels(path, kind) if kind is not None else 0
        except (OSError, Problem):
            return None
        if voxels <= self.limits.max_voxels:
            return None
        return (f"{shown}: {voxels} voxels in its header; this server predicts at most {self.limits.max_voxels} "
                "(MEDSEG_SERVE_MAX_VOXELS). Crop or downsample the scan, or ask the operator to raise the limit")

    @staticmethod
    def _row(result: Any, path: str, root: Path, main_column: str | None) -> dict[str, Any]:
        output = result.outputs.get(main_column, "") if main_column and result.status == "ok" else ""
        if output:
            output = Path(output).resolve().relative_to(root).as_posix()
        row: dict[str, Any] = {"case_id": result.case_id, "path": path, "status": result.status,
                               "error": result.error, "output": output}
        row.update(result.values)
        return row


def __getattr__(name: str) -> Any:
    """``MedsegPyfuncModel``: what models logged "from code" by earlier medseg versions name in their
    ``python_model.py``; it serves them as :class:`MedsegPyfunc`, within the same limits. Built on
    first use (MLflow warns about every ``PythonModel`` subclass defined); new models name no code."""
    if name != "MedsegPyfuncModel":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from mlflow.pyfunc import PythonModel

    class MedsegPyfuncModel(PythonModel):  # type: ignore[misc]
        def load_context(self, context: Any) -> None:
            self._model = MedsegPyfunc(Path(context.artifacts["medseg_model"]).parent.parent)

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return self._model.predict(model_input, params)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        globals()[name] = MedsegPyfuncModel
    return MedsegPyfuncModel
