"""Runs a pipeline (a list of stages) inside one MLflow run and writes ``summary.json``.

The runner owns the run's lifecycle: run directory, resolved config, tags and params, status
FAILED on any exception, and the summary that scripts read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import medseg
from medseg.config import RunConfig, config_to_dict, dump_config, flatten
from medseg.data.manifest import file_sha256, read_manifest
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_write_text
from medseg.tracking import MlflowTracker
from medseg.tracking.mlflow_tracker import git_commit

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"


class RunError(MedsegError, RuntimeError):
    """The run cannot start (bad data root, nothing to resume, ...)."""


@dataclass
class PipelineContext:
    """What every stage of a pipeline may use."""

    cfg: RunConfig
    manifest: Path
    root: Path
    run_dir: Path
    tracker: MlflowTracker
    resume: bool = False
    progress: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None


Pipeline = Callable[[PipelineContext], None]


def _new_run_dir(base: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate = base / stamp
    suffix = 1
    while candidate.exists():
        candidate = base / f"{stamp}-{suffix}"
        suffix += 1
    candidate.mkdir(parents=True)
    return candidate


def find_resumable(base: Path) -> Path:
    """The newest run directory under ``base`` that has a last checkpoint and no summary."""
    candidates = sorted(
        (d for d in base.glob("*") if (d / "checkpoints" / "last.pt").is_file() and not (d / "summary.json").is_file()),
        key=lambda d: d.stat().st_mtime,
    )
    if not candidates:
        raise RunError(f"--resume: no unfinished run with checkpoints/last.pt under {base}; start a new run instead")
    return candidates[-1]


#: Config keys a resumed run may change: budgets only, never what was trained or how.
RESUMABLE_CHANGES = ("train.max_epochs", "train.max_minutes", "train.early_stopping_patience", "tracking.uri")


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a directory that has nothing to resume, is finished, or ran another config."""
    import yaml

    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise RunError(f"--resume {run_dir}: no checkpoints/last.pt there; check the path or start a new run")
    if (run_dir / "summary.json").is_file():
        raise RunError(f"--resume {run_dir}: that run finished (summary.json exists); start a new run instead")
    saved_path = run_dir / "resolved_config.yaml"
    if saved_path.is_file():
        saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
        current = flatten(config_to_dict(cfg))
        changed = sorted(k for k in set(saved) | set(current)
                         if saved.get(k) != current.get(k) and not k.startswith(RESUMABLE_CHANGES))
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:8])
            raise RunError(f"--resume {run_dir}: the config differs from the one this run started with ({details}). "
                           f"Only {', '.join(RESUMABLE_CHANGES)} may change on resume; start a new run otherwise")


def run_pipeline(cfg: RunConfig, pipeline: Pipeline, *, resume: bool | Path = False, progress: bool = True) -> Path:
    """Execute ``pipeline`` as one MLflow run.

    Args:
        cfg: validated config.
        pipeline: composition of stages (see ``pipelines/``).
        resume: False for a new run; True to continue the newest unfinished run under
            ``cfg.output_dir``; a path to continue that run directory.
        progress: progress bars on or off.

    Returns:
        Path of ``summary.json`` (keys ``run_id``, ``model_uri``, ``tracking_uri``, ``metrics``).
    """
    root = cfg.data.resolved_root()
    if not root.is_dir():
        raise RunError(f"data root {root} is not a folder (working directory {Path.cwd()}); "
                       "set data.root, --set data.root=... or $MEDSEG_DATA_ROOT")
    manifest_path = cfg.data.manifest
    read_manifest(manifest_path)  # fail before creating anything if the manifest is unusable
    if resume:
        run_dir = Path(resume) if isinstance(resume, Path) else find_resumable(cfg.output_dir)
        check_resumable(run_dir, cfg)
        previous_run = (run_dir / RUN_ID_FILE).read_text().strip() if (run_dir / RUN_ID_FILE).is_file() else None
    else:
        run_dir, previous_run = _new_run_dir(cfg.output_dir), None
    dump_config(cfg, run_dir / "resolved_config.yaml")

    tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
    tags = {
        "medseg_version": medseg.__version__,
        "git_commit": git_commit(),
        "mlflow.source.git.commit": git_commit(),
        "manifest_sha256": file_sha256(manifest_path),
        "manifest": str(manifest_path),
        "task": str(cfg.task),
        "run_dir": str(run_dir.resolve()),
    }
    run_name = cfg.tracking.run_name or f"{cfg.task}-{cfg.model.name}-{run_dir.name}"
    run_id = tracker.start(run_name, tags, run_id=previous_run)
    atomic_write_text(run_dir / RUN_ID_FILE, run_id)
    tracker.log_params(flatten(config_to_dict(cfg)))
    tracker.log_artifact(run_dir / "resolved_config.yaml")
    ctx = PipelineContext(cfg, manifest_path, root, run_dir, tracker, resume=bool(resume), progress=progress)
    started = time.time()
    try:
        pipeline(ctx)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    summary = {
        "run_id": run_id,
        "model_uri": ctx.model_uri,
        "tracking_uri": cfg.tracking.uri,
        "experiment": cfg.tracking.experiment,
        "run_dir": str(run_dir.resolve()),
        "wall_minutes": (time.time() - started) / 60,
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in ctx.metrics.items()},
        "mlflow_ui": tracker.ui_hint(),
    }
    summary_path = atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    tracker.log_artifact(summary_path)
    tracker.end("FINISHED")
    return summary_path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
