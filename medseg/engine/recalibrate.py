"""Calibrating a finished run: its last stages again, with temperature scaling, in its own MLflow run.

A second life cycle beside :mod:`medseg.engine.runner`'s: no training, the best checkpoint scored on
the validation split (which fits the temperature) and the test split, then packaged again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import RunConfig
from medseg.engine.calibration import CALIBRATION_FILE, read_calibration
from medseg.engine.runner import RUN_ID_FILE, PipelineContext
from medseg.errors import RunError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.tracking import MlflowTracker


@dataclass(frozen=True)
class FinishedRun:
    """The files of a finished run folder that calibration reads."""

    folder: Path
    config: Path
    checkpoint: Path
    summary: Path


def finished_run_files(run_dir: Path) -> FinishedRun:
    """The run folder's config, best checkpoint and summary.

    Raises:
        RunError: one is missing (named, with the folder to give instead).
    """
    run = FinishedRun(run_dir, run_dir / "resolved_config.yaml", run_dir / "checkpoints" / "best.safetensors",
                      run_dir / "summary.json")
    missing = [p.name for p in (run.config, run.checkpoint, run.summary) if not p.is_file()]
    if missing:
        raise RunError(f"calibrate {run_dir}: expected a finished run folder, but {', '.join(missing)} "
                       "is missing; give the folder `medseg run` printed (runs/<name>/<timestamp>), after it finished")
    return run


def recalibrate_run(run: FinishedRun, cfg: RunConfig, task: Any, *, progress: bool = True) -> Path:
    """Score ``run``'s best checkpoint on val (fitting the temperature) and test with ``cfg``
    (``validation.calibrate`` on), package it again, and update its summary and MLflow run.

    Returns:
        The updated ``summary.json``.

    Raises:
        RunError: the run's MLflow store has no such run. UsageError: no temperature was fitted.
    """
    from mlflow.exceptions import MlflowException

    summary = json.loads(run.summary.read_text())
    tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
    previous = (run.folder / RUN_ID_FILE).read_text().strip() if (run.folder / RUN_ID_FILE).is_file() else None
    run_id = previous or summary.get("run_id")
    try:
        tracker.start(None, {}, run_id=run_id)
    except MlflowException as err:
        raise RunError(f"calibrate {run.folder}: the MLflow store {cfg.tracking.uri} (the run's tracking.uri) has no "
                       f"run {run_id} ({err.message}); a relative sqlite:/// path is relative to the folder you "
                       "trained from, so run this command there") from err
    (run.folder / CALIBRATION_FILE).unlink(missing_ok=True)  # fitted again below, or the task fits none
    ctx = PipelineContext(cfg, cfg.data.manifest, cfg.data.resolved_root(), run.folder, tracker, progress=progress)
    try:
        ctx.metrics.update(task.evaluate(ctx, run.checkpoint, "val", "best_val"))
        if read_calibration(run.folder) is None:
            raise UsageError(f"calibrate {run.folder}: no temperature was fitted: the model has no softmax output to "
                             "calibrate (an ordinal head, or a region model's sigmoids), the validation fold is "
                             "trained on too (data.train_folds: all), or the manifest's validation split has no "
                             "labelled cases")
        ctx.metrics.update(task.evaluate(ctx, run.checkpoint, "test", "test"))
        ctx.model_uri = task.package(ctx, run.checkpoint).model_uri
    except BaseException:
        tracker.end("FINISHED")  # the run itself finished; only this calibration failed
        raise
    summary["metrics"] = {**summary.get("metrics", {}), **{
        k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in ctx.metrics.items()}}
    summary["model_uri"] = ctx.model_uri
    atomic_write_text(run.summary, json.dumps(summary, indent=2, default=str))
    tracker.log_artifact(run.summary)
    tracker.set_tags({"medseg.model_uri": str(ctx.model_uri)})
    tracker.end("FINISHED")
    return run.summary
