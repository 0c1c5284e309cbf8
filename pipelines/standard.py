"""The stage list: verify -> train -> evaluate the selected checkpoint on the task's splits -> package."""

from __future__ import annotations

from medseg.engine.runner import PipelineContext
from medseg.tasks.base import Task


def run(ctx: PipelineContext, task: Task) -> None:
    ctx.headline_patterns = task.headline_metrics
    trained = ctx.verify_and_train(task.train, task.verify_options(ctx.cfg))
    if trained is None:  # the other processes of a distributed run are done once training is
        return
    # The best checkpoint, not the last epoch, is re-scored on val and, once, on the held-out test
    # split (and whatever else the task scores: reconstruction's real images).
    for split, prefix in task.evaluated_splits:
        ctx.metrics.update(task.evaluate(ctx, trained.best_checkpoint, split, prefix))
    ctx.model_uri = task.package(ctx, trained.best_checkpoint).model_uri
