"""Runs a pipeline (a list of stages) inside one MLflow run and writes ``summary.json``.

The runner owns the run's lifecycle: run directory, resolved config, tags and params, status
FAILED on any exception, and the summary that scripts read.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from medseg._version import __version__ as medseg_version
from medseg.config import RunConfig, config_to_dict, dump_config, flatten
from medseg.data.manifest import Manifest, file_sha256, read_manifest
from medseg.data.verify import VerifyOptions, verify_run_data
from medseg.engine import distributed
from medseg.engine.loop import split_cases
from medseg.errors import RunError, UsageError, medseg_cause
from medseg.io.atomic import atomic_write_text, remove_stale_temporaries
from medseg.tracking import MlflowTracker, NullTracker
from medseg.tracking.mlflow_tracker import DatasetRecord, absolute_tracking_uri, git_commit

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"


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
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    #: the task's headline metrics (patterns, see :func:`headline`): the run's MLflow description
    headline_patterns: tuple[str, ...] = ()

    def verify_and_train(self, train: Callable[[PipelineContext], Any], verify: VerifyOptions) -> Any | None:
        """The stages every task opens with: verify the data (main process; errors stop the run),
        then ``train(ctx)`` in every process.

        Returns the training outputs on the main process, after logging the learning curve and the
        history; None on the other processes of a distributed run, which are then done.
        """
        if self.dist.is_main:
            verify_run_data(verify, self.manifest, self.root, self.run_dir, self.tracker, self.progress)
        self.dist.barrier()
        trained = train(self)
        self.metrics.update(trained.metrics)
        if not self.dist.is_main:
            return None
        self.tracker.log_artifact(trained.learning_curve, "plots")
        self.tracker.log_artifact(trained.history)
        return trained


Pipeline = Callable[[PipelineContext], None]
DataPreparer = Callable[[RunConfig, Path, bool], None]


def _new_run_dir(base: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    candidate = base / stamp
    suffix = 1
    while True:
        try:  # mkdir claims the name atomically: two runs started in the same second get two folders
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate = base / f"{stamp}-{suffix}"
            suffix += 1


def _clear_killed_writes(run_dir: Path) -> None:
    """A run killed inside an atomic write leaves its temporary file; the resumed run removes them."""
    for path in remove_stale_temporaries(run_dir):
        log.info("removed %s, left by a write that was interrupted", path)


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.safetensors").is_file()


def _started(run_dir: Path) -> bool:
    """Whether a run started its MLflow run in ``run_dir`` (it may have stopped before any checkpoint);
    a ``--seeds``/``--folds`` parent is not such a run (see :func:`find_resumable_parent`)."""
    return _has_checkpoint(run_dir) or ((run_dir / RUN_ID_FILE).is_file() and not (run_dir / REPEAT_FILE).is_file())


def find_resumable(base: Path) -> Path:
    """The newest run directory under ``base`` that started (a last checkpoint, or at least its MLflow
    run) and has no summary."""
    candidates = sorted((d for d in base.glob("*") if _started(d) and not (d / "summary.json").is_file()),
                        key=lambda d: d.stat().st_mtime)
    if not candidates:
        raise RunError(f"--resume: no unfinished run (a run folder with checkpoints/last.safetensors or {RUN_ID_FILE}) "
                       f"under {base}; start a new run instead")
    return candidates[-1]


#: Config keys a resumed run may change: budgets only, never what was trained or how.
RESUMABLE_CHANGES = ("train.max_epochs", "train.max_minutes", "train.early_stopping_patience",
                     "train.checkpoint_interval_minutes", "tracking.uri", "tracking.system_metrics")


def check_resumable(run_dir: Path, cfg: RunConfig, require_checkpoint: bool = True) -> None:
    """Refuse to resume a directory that has nothing to resume, is finished, or ran another config.

    A run killed before its first checkpoint has nothing to continue from but its MLflow run; it
    is resumable (it starts again from epoch 0 in that run).
    """
    import yaml

    if require_checkpoint and not _started(run_dir):
        raise RunError(f"--resume {run_dir}: no checkpoints/last.safetensors (nor {RUN_ID_FILE}) there; check the "
                       "path or start a new run")
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


def run_pipeline(cfg: RunConfig, pipeline: Pipeline, *, resume: bool | Path = False, progress: bool = True,
                 run_dir: Path | None = None, parent_run_id: str | None = None,
                 prepare_data: DataPreparer | None = None) -> Path | None:
    """Execute ``pipeline`` as one MLflow run.

    In a distributed job every process calls this; the main process owns the run directory and
    the MLflow run and tells the others where they are.

    Args:
        cfg: validated config.
        pipeline: composition of stages (see ``pipelines/``).
        resume: False for a new run; True to continue the newest unfinished run under
            ``cfg.output_dir``; a path to continue that run directory.
        progress: progress bars on or off.
        run_dir: for a new run, this directory instead of a fresh ``output_dir/<timestamp>``.
        parent_run_id: make the MLflow run a child of this one (``--seeds`` / ``--folds``).
        prepare_data: ``prepare_data(cfg, root, progress)`` writes the data a config generates itself
            (the task's hook), on the main process, before anything reads the manifest.

    Returns:
        Path of ``summary.json`` (keys ``run_id``, ``model_uri``, ``tracking_uri``, ``metrics``);
        None on the non-main processes of a distributed run.
    """
    dist = distributed.current()
    root = cfg.data.resolved_root()
    manifest_path = cfg.data.manifest
    tracker: MlflowTracker = NullTracker(cfg.tracking.uri)
    run_id = ""
    if dist.is_main:
        if prepare_data is not None:
            prepare_data(cfg, root, progress)
        if not root.is_dir():
            raise RunError(f"data root {root} is not a folder (working directory {Path.cwd()}); "
                           "set data.root, --set data.root=... or $MEDSEG_DATA_ROOT")
        # fail before creating anything if the manifest is unusable (or data.fold is not one of its folds)
        datasets = manifest_datasets(cfg, read_manifest(manifest_path))
        run_dir, previous_run = _run_dir_of(cfg, resume, run_dir)
        dump_config(cfg, run_dir / "resolved_config.yaml")
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
        tags = {
            "medseg_version": medseg_version,
            "git_commit": git_commit(),
            "mlflow.source.git.commit": git_commit(),
            "manifest_sha256": file_sha256(manifest_path),
            "manifest": str(manifest_path),
            "task": str(cfg.task),
            "run_dir": str(run_dir.resolve()),
            "world_size": str(dist.world_size),
        }
        run_name = cfg.tracking.run_name or default_run_name(cfg, run_dir.name)
        run_id = tracker.start(run_name, tags, run_id=previous_run, parent_run_id=parent_run_id)
        atomic_write_text(run_dir / RUN_ID_FILE, run_id)
        tracker.log_params(flatten(config_to_dict(cfg)))
        tracker.log_dataset_inputs(datasets)
        tracker.log_artifact(run_dir / "resolved_config.yaml")
        _log_fingerprint(cfg, tracker)
        if cfg.tracking.system_metrics:  # stopped by tracker.end, whichever way the run ends
            tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s, resume=previous_run is not None)
    shared_dir, resumed = dist.broadcast((run_dir, bool(resume)))  # where the main process put the run
    ctx = PipelineContext(cfg, manifest_path, root, Path(str(shared_dir)), tracker, resume=resumed, progress=progress, dist=dist)
    started = time.time()
    try:
        pipeline(ctx)
    except KeyboardInterrupt:
        end_despite_sigterm(tracker, "KILLED")
        raise
    except BaseException as err:
        end_despite_sigterm(tracker, "FAILED")
        cause = medseg_cause(err) if isinstance(err, Exception) else None
        if cause is not None and cause is not err:  # the file and the problem, not "applying transform ..."
            raise cause from err
        raise
    if not dist.is_main:
        return None
    return _finish_run(ctx, run_id, dist.world_size, started)


def _run_dir_of(cfg: RunConfig, resume: bool | Path, run_dir: Path | None) -> tuple[Path, str | None]:
    """The run directory (resumed, given or new) and the MLflow run id it already has, if any."""
    if resume:
        run_dir = Path(resume) if isinstance(resume, Path) else find_resumable(cfg.output_dir)
        check_resumable(run_dir, cfg)
        _clear_killed_writes(run_dir)
        previous_run = (run_dir / RUN_ID_FILE).read_text().strip() if (run_dir / RUN_ID_FILE).is_file() else None
        if not _has_checkpoint(run_dir):
            log.info("--resume %s: it stopped before its first checkpoint; training starts again from epoch 0 "
                     "in the same MLflow run %s", run_dir, previous_run)
        return run_dir, previous_run
    if run_dir is None:
        return _new_run_dir(cfg.output_dir), None
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear_killed_writes(run_dir)
    # A child of --seeds/--folds that died before its first checkpoint starts over, but in
    # its own MLflow run rather than leaving that one behind as a stray RUNNING child.
    return run_dir, (run_dir / RUN_ID_FILE).read_text().strip() if (run_dir / RUN_ID_FILE).is_file() else None


def _finish_run(ctx: PipelineContext, run_id: str, world_size: int, started: float) -> Path:
    """Write and log ``summary.json`` and end the MLflow run as FINISHED."""
    cfg, tracker = ctx.cfg, ctx.tracker
    summary = {
        "run_id": run_id,
        "model_uri": ctx.model_uri,
        "tracking_uri": absolute_tracking_uri(cfg.tracking.uri),  # readable from any folder
        "experiment": cfg.tracking.experiment,
        "run_dir": str(ctx.run_dir.resolve()),
        "world_size": world_size,
        "wall_minutes": (time.time() - started) / 60,
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in ctx.metrics.items()},
        "mlflow_ui": tracker.ui_hint(),
    }
    summary_path = atomic_write_text(ctx.run_dir / "summary.json",
                                     json.dumps(summary, indent=2, default=_json_default))
    tracker.log_artifact(summary_path)
    tags = {"mlflow.note.content": run_description(cfg, ctx.metrics, ctx.headline_patterns)}
    if ctx.model_uri:  # lets `medseg predict --model runs:/<parent>` find the members of an ensemble
        tags["medseg.model_uri"] = ctx.model_uri
    tracker.set_tags(tags)
    tracker.end("FINISHED")
    return summary_path


def default_run_name(cfg: RunConfig, tail: str) -> str:
    """A run name that says what differs between runs of one experiment: network, budget (minutes,
    else epochs) and the run folder's name (its time, or ``seed1`` / ``fold2`` for a child)."""
    budget = f"{cfg.train.max_minutes:g}min" if cfg.train.max_minutes else f"{cfg.train.max_epochs}ep"
    return f"{cfg.task}-{cfg.model.name}-{budget}-{tail}"


def headline(metrics: dict[str, Any], patterns: Sequence[str]) -> dict[str, float]:
    """The metrics whose name matches one of ``patterns`` (regular expressions, a task's
    ``headline_metrics``), with their ``_std`` beside them when a parent run has one."""
    shown = {k: v for k, v in metrics.items()
             if isinstance(v, (int, float)) and any(re.search(p, k) for p in patterns) and not k.endswith("_std")}
    for key in list(shown):
        if isinstance(metrics.get(f"{key}_std"), (int, float)):
            shown[f"{key}_std"] = metrics[f"{key}_std"]
    return shown


def run_description(cfg: RunConfig, metrics: dict[str, Any], patterns: Sequence[str]) -> str:
    """The run's description in the MLflow UI: what was trained, for how long, and its headline figures."""
    epochs, minutes = metrics.get("train/epochs"), metrics.get("train/minutes")
    trained = f"{cfg.task}, {cfg.model.name}" + (f", {epochs:g} epochs" if isinstance(epochs, (int, float)) else "") + (
        f" in {minutes:.1f} min" if isinstance(minutes, (int, float)) else "")
    figures = ", ".join(f"{k} {v:.4f}" for k, v in headline(metrics, patterns).items())
    return trained + (f": {figures}" if figures else "")


#: MLflow keeps at most 36 characters of a dataset digest; the run's ``manifest_sha256`` tag has all 64.
MANIFEST_DIGEST_LENGTH = 16


def manifest_datasets(cfg: RunConfig, manifest: Manifest) -> list[DatasetRecord]:
    """The manifest as the run's MLflow datasets: one per role (``train``, ``val``, ``test``) that
    has cases, named ``<manifest stem>/<role>``, with the manifest's SHA-256 as digest.

    MLflow keeps one input per dataset name and digest, hence a name per role; the digest is the
    manifest's, so runs on the same manifest file share it whatever their split or fold.
    """
    if manifest.path is None:
        return []
    digest = file_sha256(manifest.path)[:MANIFEST_DIGEST_LENGTH]
    split_names = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    records = []
    for role, split in split_names.items():
        cases = split_cases(cfg, manifest, role)
        if not cases:
            continue
        profile: dict[str, Any] = {"cases": len(cases), "split": split, "labelled": sum(1 for c in cases if c.label)}
        if cfg.data.fold is not None and role != "test":
            profile["fold"] = cfg.data.fold
        records.append(DatasetRecord(f"{manifest.path.stem}/{role}", digest, manifest.path, role, profile))
    fingerprint = fingerprint_record(cfg, manifest.path, digest)
    return records + ([fingerprint] if fingerprint else [])


def fingerprint_record(cfg: RunConfig, manifest_path: Path, digest: str) -> DatasetRecord | None:
    """``data.fingerprint`` (what ``medseg plan`` measured) as a dataset of context ``fingerprint``
    whose digest is the manifest's: the run page shows which data the plan was made from."""
    path = getattr(cfg.data, "fingerprint", None)
    if path is None or not Path(path).is_file():
        return None
    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        log.warning("data.fingerprint %s is not readable JSON; not logged", path)
        return None
    if not str(measured.get("manifest_sha256", "")).startswith(digest):
        log.warning("data.fingerprint %s was measured on another version of %s; re-plan to refresh it", path,
                    manifest_path)
    cases = measured.get("cases") or []
    profile = {"cases": len(cases), "spatial_dims": measured.get("spatial_dims"),
               "channels": ", ".join(measured.get("channel_names") or []),
               "fingerprint_seconds": measured.get("elapsed_s")}
    return DatasetRecord(f"{manifest_path.stem}/fingerprint", digest, Path(path), "fingerprint", profile)


def _log_fingerprint(cfg: RunConfig, tracker: MlflowTracker) -> None:
    path = getattr(cfg.data, "fingerprint", None)
    if path is not None and Path(path).is_file():
        tracker.log_artifact(Path(path), "plan")


def end_despite_sigterm(tracker: MlflowTracker, status: str) -> None:
    """End the MLflow run with ``status`` even while torchrun is stopping this process.

    When one worker dies, the survivors see a collective fail and torchrun sends them SIGTERM at
    about the same moment; a SIGTERM landing inside ``tracker.end`` would leave the run RUNNING
    for ever. It waits here until the store has the status (torchrun allows seconds before SIGKILL),
    then takes effect.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        tracker.end(status)
        return
    pending: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: pending.append((signum, frame)))
    try:
        tracker.end(status)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if pending and callable(previous):
        previous(*pending[0])


# ----------------------------------------------------------------------------------- repeated runs

REPEAT_FILE = "repeat.json"
ENSEMBLE_FILE = "ensemble.json"


class RepeatKind(str, Enum):
    SEEDS = "seeds"
    FOLDS = "folds"


def child_configs(cfg: RunConfig, kind: RepeatKind, count: int) -> list[tuple[str, RunConfig]]:
    """``(child name, config)`` for each run of ``--seeds K`` (seed, seed+1, ...) or ``--folds K``.

    Raises:
        UsageError: K < 1, or a fold count the manifest does not have.
    """
    if count < 1:
        raise UsageError(f"--{kind.value} {count}: must be at least 1")
    if kind == RepeatKind.SEEDS:
        return [(f"seed-{cfg.seed + i}", cfg.model_copy(update={"seed": cfg.seed + i})) for i in range(count)]
    manifest = read_manifest(cfg.data.manifest)
    folds = sorted({c.fold for c in manifest.cases if c.fold is not None and c.fold >= 0})
    if folds[:count] != list(range(count)):
        raise UsageError(f"--folds {count}: the manifest {cfg.data.manifest} has folds {folds or 'none'}; rebuild "
                         f"it with `medseg manifest build --folds {count} ...` or ask for at most {len(folds)}")
    one_run = cfg.train.model_copy(update={"folds": None})  # a member is one run, not an ensemble of its own
    return [(f"fold-{i}", cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": i}), "train": one_run}))
            for i in range(count)]


def find_resumable_parent(base: Path) -> Path:
    """The newest ``--seeds``/``--folds`` parent directory under ``base`` without a summary."""
    candidates = sorted((d for d in base.glob("*") if (d / REPEAT_FILE).is_file() and not (d / "summary.json").is_file()),
                        key=lambda d: d.stat().st_mtime)
    if not candidates:
        raise RunError(f"--resume: no unfinished --seeds/--folds run under {base}; start a new one instead")
    return candidates[-1]


def aggregate(children: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample standard deviation (n-1) of every numeric metric all children have.

    ``test/dice_mean`` becomes ``test/dice_mean`` (the mean, so parents and single runs compare
    under one name in the MLflow UI) and ``test/dice_mean_std``.
    """
    keys = set.intersection(*(set(k for k, v in c["metrics"].items() if isinstance(v, (int, float)))
                              for c in children)) if children else set()
    out: dict[str, float] = {}
    for key in sorted(keys):
        values = np.asarray([float(c["metrics"][key]) for c in children], dtype=np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def run_repeated(cfg: RunConfig, pipeline: Pipeline, kind: RepeatKind, count: int, *, resume: bool | Path = False,
                 progress: bool = True, prepare_data: DataPreparer | None = None) -> Path | None:
    """Run ``pipeline`` once per seed or fold as MLflow child runs of one parent run.

    The parent directory holds one child run directory per seed/fold, ``summary.json`` with the
    aggregate (mean, ``_std``) and ``ensemble.json`` listing the child models, which
    ``medseg predict --model <parent dir>`` averages. A resumed parent skips finished children
    and resumes an interrupted one.

    Returns:
        The parent's ``summary.json`` (None on non-main processes).
    """
    dist = distributed.current()
    children = child_configs(cfg, kind, count)
    plan: tuple[Path, str] | None = None
    tracker: MlflowTracker = NullTracker(cfg.tracking.uri)
    datasets: list[DatasetRecord] = []
    if dist.is_main:
        if resume:
            parent_dir = Path(resume) if isinstance(resume, Path) else find_resumable_parent(cfg.output_dir)
            if not (parent_dir / REPEAT_FILE).is_file():
                raise RunError(f"--resume {parent_dir}: not a --seeds/--folds run (no {REPEAT_FILE})")
            saved = json.loads((parent_dir / REPEAT_FILE).read_text())
            if (saved["kind"], saved["count"]) != (kind.value, count):
                raise RunError(f"--resume {parent_dir}: that run was --{saved['kind']} {saved['count']}, "
                               f"not --{kind.value} {count}")
            check_resumable(parent_dir, cfg, require_checkpoint=False)
        else:
            parent_dir = _new_run_dir(cfg.output_dir)
        previous = (parent_dir / RUN_ID_FILE).read_text().strip() if (parent_dir / RUN_ID_FILE).is_file() else None
        dump_config(cfg, parent_dir / "resolved_config.yaml")
        datasets = manifest_datasets(cfg, read_manifest(cfg.data.manifest))
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
        name = cfg.tracking.run_name or default_run_name(cfg, f"{parent_dir.name}-{count}{kind.value}")
        parent_id = tracker.start(name, {"medseg_version": medseg_version, "git_commit": git_commit(),
                                         "manifest_sha256": file_sha256(cfg.data.manifest), "task": str(cfg.task),
                                         "medseg.repeat": kind.value, "medseg.repeat_count": str(count),
                                         "run_dir": str(parent_dir.resolve())}, run_id=previous)
        atomic_write_text(parent_dir / RUN_ID_FILE, parent_id)
        # Written once the parent run exists: a directory with it is always a resumable parent.
        atomic_write_text(parent_dir / REPEAT_FILE, json.dumps(
            {"kind": kind.value, "count": count, "children": [name for name, _ in children]}, indent=2))
        plan = (parent_dir, parent_id)
    parent_dir, parent_id = dist.broadcast(plan)  # type: ignore[misc]
    results: list[dict[str, Any]] = []
    try:
        tracker.log_params({**flatten(config_to_dict(cfg)), "repeat.kind": kind.value, "repeat.count": count})
        tracker.log_dataset_inputs(datasets)
        tracker.log_artifact(parent_dir / "resolved_config.yaml")
        _log_fingerprint(cfg, tracker)
        for child_name, child_cfg in children:
            child_dir = parent_dir / child_name
            if child_cfg.tracking.run_name is None:
                child_cfg = child_cfg.model_copy(update={"tracking": child_cfg.tracking.model_copy(
                    update={"run_name": f"{cfg.task}-{cfg.model.name}-{parent_dir.name}-{child_name}"})})
            finished = dist.broadcast((child_dir / "summary.json").is_file())
            if finished:
                log.info("%s: finished earlier, skipped", child_dir)
            else:
                interrupted = dist.broadcast((child_dir / "checkpoints" / "last.safetensors").is_file())
                log.info("%s run %s of %d", kind.value[:-1], child_name, count)
                run_pipeline(child_cfg, pipeline, resume=child_dir if interrupted else False, progress=progress,
                             run_dir=child_dir, parent_run_id=parent_id, prepare_data=prepare_data)
            if dist.is_main:
                results.append({"name": child_name, **json.loads((child_dir / "summary.json").read_text())})
        return _finish_parent(cfg, kind, parent_dir, parent_id, results, tracker) if dist.is_main else None
    except BaseException:
        end_despite_sigterm(tracker, "FAILED")
        raise


def _finish_parent(cfg: RunConfig, kind: RepeatKind, parent_dir: Path, parent_id: str,
                   results: list[dict[str, Any]], tracker: MlflowTracker) -> Path:
    """Aggregate the children onto the parent: metrics, ``ensemble.json``, ``summary.json``."""
    metrics = aggregate(results)
    tracker.log_metrics(metrics, step=0)
    models = [r["model_uri"] for r in results if r.get("model_uri")]
    ensemble = atomic_write_text(parent_dir / ENSEMBLE_FILE, json.dumps(
        {"kind": kind.value, "models": models, "runs": [r["run_id"] for r in results]}, indent=2))
    summary = {
        "run_id": parent_id,
        "kind": kind.value,
        "model_uri": str(parent_dir.resolve()),  # `medseg predict --model` takes the directory: an ensemble
        "model_uris": models,
        "tracking_uri": absolute_tracking_uri(cfg.tracking.uri),  # readable from any folder
        "experiment": cfg.tracking.experiment,
        "run_dir": str(parent_dir.resolve()),
        "metrics": metrics,
        "children": [{"name": r["name"], "run_id": r["run_id"], "run_dir": r["run_dir"], "metrics": r["metrics"]}
                     for r in results],
        "mlflow_ui": tracker.ui_hint(),
    }
    summary_path = atomic_write_text(parent_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    tracker.log_artifact(ensemble)
    tracker.log_artifact(summary_path)
    tracker.end("FINISHED")
    return summary_path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
