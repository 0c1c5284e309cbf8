"""Reconstruction: (phantoms, before the run) -> verify -> train -> evaluate (val, test, real images)
with the selected checkpoint, each beside its classical baseline -> package the model."""

from __future__ import annotations

from medseg.engine.runner import PipelineContext
from medseg.tasks.base import Task


def run(ctx: PipelineContext, task: Task) -> None:
    trained = ctx.verify_and_train(task.train, task.verify_options(ctx.cfg))
    if trained is None:  # the other processes of a distributed run are done once training is
        return
    # The checkpoint with the best validation SSIM is scored on val, once on the held-out test
    # split, and on the real images the config lists.
    for split, prefix in (("val", "best_val"), ("test", "test"), ("real", "real")):
        ctx.metrics.update(task.evaluate(ctx, trained.best_checkpoint, split, prefix))
    ctx.model_uri = task.package(ctx, trained.best_checkpoint).model_uri
