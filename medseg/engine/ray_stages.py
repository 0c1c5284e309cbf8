"""The Ray engine's stages: what runs in Ray's workers, one case per call, and the rows that carry a
case between them (see :mod:`medseg.engine.ray_predict` for the pipeline they make).

A row holds the case's index, the case itself (JSON text), the earlier report's row (resume), and
once a stage has ended the case (skipped, failed or written) its :class:`CaseResult` as JSON text;
later stages pass such a row on untouched. Between the stages a row also carries the case's data in
memory: the preprocessed volume with its transform history (reading -> network) or the prediction
on the input's grid (network -> writing), held in a :class:`Parcel` so that Ray serialises it as
one Python object (its arrays out of band) and never tries to turn it into Arrow columns.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.engine.case_io import peak_rss_mb
from medseg.engine.predict import failed_case, finished_case, predict_one_case, readable
from medseg.engine.results import CasePredictor, CaseResult, StagedCasePredictor
from medseg.io.discovery import InputCase

#: Builds the task's case predictor with its model loaded: called once in each actor. It travels to
#: the actors by Ray (in memory, never through a file), so it must be a picklable module-level
#: function or a ``functools.partial`` of one.
CasePredictorFactory = Callable[[], CasePredictor]
#: A Dataset batch as the stages take and return it: column -> one value per row.
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Parcel:
    """A case's data between two stages (a preprocessed volume, a prediction), as one Python object."""

    value: Any


def _json(value: Any) -> str:
    def plain(item: Any) -> Any:  # numpy scalars a task may put among its values
        if isinstance(item, np.generic):
            return item.item()
        raise TypeError(f"{type(item).__name__} is not a report value")

    return json.dumps(value, default=plain)


def case_to_json(case: InputCase) -> str:
    """One case as a Dataset row's text: every field of :class:`InputCase`, paths as strings."""
    return _json({"case_id": case.case_id, "path": str(case.path), "kind": case.kind, "series_uid": case.series_uid,
                  "problem": case.problem, "channels": [str(p) for p in case.channels], "uri": case.uri})


def case_from_json(text: str) -> InputCase:
    fields = json.loads(text)
    return InputCase(fields["case_id"], Path(fields["path"]), fields["kind"], fields["series_uid"], fields["problem"],
                     tuple(Path(p) for p in fields["channels"]), fields["uri"])


def result_to_json(result: CaseResult) -> str:
    return _json(asdict(result))


def result_from_json(text: str) -> CaseResult:
    return CaseResult(**json.loads(text))


def case_rows(cases: list[InputCase], previous: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The Dataset's rows: one per case, in case order."""
    return [{"index": i, "case": case_to_json(case), "previous": _json(previous.get(case.case_id) or {})}
            for i, case in enumerate(cases)]


def _objects(values: list[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def quiet_worker(threads: int | None = None) -> None:
    """A worker's log says what went wrong, not what MLflow downloaded or which optional decoder MONAI lacks
    (the CLI quiets the driver the same way); ``threads``: torch's thread count in it."""
    for key, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("MLFLOW_LOGGING_LEVEL", "WARNING"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class _Stage:
    """What every stage's actor holds: the task's case predictor (built once), the output folder."""

    def __init__(self, make_predictor: CasePredictorFactory, output_dir: str, overwrite: bool,
                 threads: int | None = None):
        quiet_worker(threads)
        self.predictor = make_predictor()
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.worker = f"{socket.gethostname()}:{os.getpid()}"


class CaseActor(_Stage):
    """The one stage of a task whose case predictor is not staged: read, network and writing of a case
    in one call (:func:`~medseg.engine.predict.predict_one_case`, as the local path runs it)."""

    def __call__(self, batch: Batch) -> Batch:
        indices, results = [], []
        for index, case_text, previous_text in zip(batch["index"], batch["case"], batch["previous"]):
            previous = json.loads(str(previous_text))
            result = predict_one_case(self.predictor, case_from_json(str(case_text)), self.output_dir, self.overwrite,
                                      previous or None)
            indices.append(int(index))
            results.append(result_to_json(result))
        return {"index": np.asarray(indices, dtype=np.int64), "result": np.asarray(results, dtype=object),
                "worker": np.asarray([self.worker] * len(indices), dtype=object),
                "worker_peak_rss_mb": np.full(len(indices), peak_rss_mb(), dtype=np.float64)}


class ReadStage(_Stage):
    """Stage 1 (CPU workers): a finished case becomes its ``skipped`` result (resume), any other is read
    and preprocessed (``read_case``); a case that cannot be is its ``failed`` result."""

    def __call__(self, batch: Batch) -> Batch:
        predictor: StagedCasePredictor = self.predictor  # type: ignore[assignment]
        results: list[str] = []
        parcels: list[Parcel | None] = []
        seconds: list[float] = []
        for case_text, previous_text in zip(batch["case"], batch["previous"]):
            case, started = case_from_json(str(case_text)), time.monotonic()
            done: CaseResult | None
            try:
                done = finished_case(predictor, case, self.output_dir, self.overwrite,
                                     json.loads(str(previous_text)) or None)
                if done is None:
                    with readable(case) as local:  # a case named by URI: fetched here, by the worker that reads it
                        parcels.append(Parcel(predictor.read_case(local)))
                else:
                    parcels.append(None)
            except Exception as err:  # one bad case must not stop the batch
                done = failed_case(case, self.output_dir, err, time.monotonic() - started)
                parcels.append(None)
            results.append(result_to_json(done) if done is not None else "")
            seconds.append(time.monotonic() - started)
        return {"index": batch["index"], "case": batch["case"], "result": _objects(results),
                "data": _objects(parcels), "seconds": np.asarray(seconds, dtype=np.float64)}


class NetworkStage(_Stage):
    """Stage 2 (the model's actors, on the GPU when given one): ``infer_case`` on each case that stage 1
    read; every row leaves naming this worker and its peak memory (what to size actors by)."""

    def __call__(self, batch: Batch) -> Batch:
        predictor: StagedCasePredictor = self.predictor  # type: ignore[assignment]
        results: list[str] = []
        parcels: list[Parcel | None] = []
        seconds: list[float] = []
        for case_text, result, parcel, before in zip(batch["case"], batch["result"], batch["data"], batch["seconds"]):
            started = time.monotonic()
            if result:  # skipped or failed in stage 1
                results.append(str(result))
                parcels.append(None)
                seconds.append(float(before))
                continue
            case = case_from_json(str(case_text))
            try:
                parcels.append(Parcel(predictor.infer_case(case, parcel.value, self.output_dir)))
                results.append("")
            except Exception as err:  # one bad case must not stop the batch
                parcels.append(None)
                results.append(result_to_json(failed_case(case, self.output_dir, err,
                                                          float(before) + time.monotonic() - started)))
            seconds.append(float(before) + time.monotonic() - started)
        rows = len(results)
        return {"index": batch["index"], "case": batch["case"], "result": _objects(results),
                "data": _objects(parcels), "seconds": np.asarray(seconds, dtype=np.float64),
                "worker": _objects([self.worker] * rows), "worker_peak_rss_mb": np.full(rows, peak_rss_mb())}


class WriteStage(_Stage):
    """Stage 3 (CPU workers): ``write_case`` of each prediction (atomic writes, the main output last);
    every row leaves as its case's final result."""

    def __call__(self, batch: Batch) -> Batch:
        predictor: StagedCasePredictor = self.predictor  # type: ignore[assignment]
        results = []
        for case_text, result, parcel, before in zip(batch["case"], batch["result"], batch["data"], batch["seconds"]):
            if result:
                results.append(str(result))
                continue
            case, started = case_from_json(str(case_text)), time.monotonic()
            try:
                written = predictor.write_case(case, parcel.value, self.output_dir)
            except Exception as err:  # one bad case must not stop the batch
                written = failed_case(case, self.output_dir, err, 0.0)
            written.seconds = float(before) + time.monotonic() - started
            results.append(result_to_json(written))
        return {"index": batch["index"], "result": _objects(results), "worker": batch["worker"],
                "worker_peak_rss_mb": batch["worker_peak_rss_mb"]}
