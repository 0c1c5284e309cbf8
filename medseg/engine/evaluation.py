"""The evaluate stage every task shares: the checkpoint loaded as predict loads it, the split's
files written and logged.

A task only scores: it gets an :class:`Evaluator` (the network ready to run, the split's dataset)
and returns :class:`SplitScores`. Loading, batch-norm folding, channels-last, autocast, the per-case
CSV, the metrics JSON and the MLflow logging are here once, so every task evaluates the network
exactly as ``medseg predict`` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import RunConfig
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.report import write_report
from medseg.engine.runtime import autocast_dtype, resolve_device, to_channels_last, use_channels_last
from medseg.engine.sliding import fold_batch_norms
from medseg.io.atomic import atomic_write_text
from medseg.tracking import MlflowTracker


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluate stage wrote: the per-case CSV, the metrics JSON and its figures."""

    per_case: Path
    metrics_file: Path
    figures: tuple[Path, ...]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Evaluator:
    """What a task's scoring gets: the checkpoint's network in eval mode (batch norms folded,
    channels-last where predict uses it), where and in which precision it runs, and the split.

    Attributes:
        dataset: the split's cases through the task's validation chain.
        split: the split's name (``val``, ``test``, or a task's own such as ``real``).
        prefix: what the metric names start with (``best_val``, ``test``).
        out_dir: the run directory (figures go to ``plots/``, state to ``evaluation/``).
    """

    network: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    dataset: Any
    split: str
    prefix: str
    out_dir: Path
    progress: bool = False


@dataclass
class SplitScores:
    """A task's scores of one split: the metrics (named ``<prefix>/...``), the per-case rows and
    their columns (empty: no per-case CSV), and the figures it drew."""

    metrics: dict[str, float]
    fields: Sequence[str] = ()
    rows: Sequence[dict[str, Any]] = ()
    figures: Sequence[Path] = field(default_factory=tuple)


def load_for_evaluation(build_network: Callable[[], nn.Module], cfg: RunConfig, checkpoint: Path) -> tuple[
        nn.Module, torch.device, torch.dtype | None]:
    """The checkpoint's network as prediction runs it, on the run's device, and its autocast dtype."""
    device = resolve_device(cfg.train.device)  # where training ran: the GPU when there is one
    network = build_network().to(device)
    network.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    network = fold_batch_norms(network.eval())
    if use_channels_last(cfg.train.channels_last, cfg.model.spatial_dims):
        network = to_channels_last(network, cfg.model.spatial_dims)
    return network, device, autocast_dtype(cfg.train.precision, device)


def write_evaluation(scores: SplitScores, out_dir: Path, split: str, tracker: MlflowTracker | None) -> EvalOutputs:
    """``evaluation/<split>_cases.csv`` (when there are rows) and ``<split>_metrics.json``, logged."""
    evaluation = out_dir / "evaluation"
    per_case = evaluation / f"{split}_cases.csv"
    if scores.rows:
        write_report(list(scores.rows), list(scores.fields) or list(scores.rows[0]), per_case)
    metrics_file = atomic_write_text(evaluation / f"{split}_metrics.json", json.dumps(scores.metrics, indent=2))
    return log_evaluation(tracker, EvalOutputs(per_case, metrics_file, tuple(scores.figures), scores.metrics))


def log_evaluation(tracker: MlflowTracker | None, outputs: EvalOutputs) -> EvalOutputs:
    """Log what an evaluate stage wrote to MLflow: its metrics, the per-case CSV and metrics JSON
    (under ``evaluation/``) and its figures (under ``plots/``)."""
    if tracker is not None:
        tracker.log_metrics(outputs.metrics, step=0)
        if outputs.per_case.is_file():
            tracker.log_artifact(outputs.per_case, "evaluation")
        tracker.log_artifact(outputs.metrics_file, "evaluation")
        for path in outputs.figures:
            tracker.log_artifact(path, "plots")
    return outputs
