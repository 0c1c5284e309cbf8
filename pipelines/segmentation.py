"""Segmentation: verify -> train -> evaluate (val, test) -> package the model."""

from __future__ import annotations

from medseg.engine.runner import PipelineContext
from medseg.tasks.segmentation import training as seg


def run(ctx: PipelineContext) -> None:
    cfg = ctx.cfg
    trained = ctx.verify_and_train(seg.train)
    if trained is None:  # the other processes of a distributed run are done once training is
        return

    # The best checkpoint is re-scored on val (overlays, per-case CSV) and, once, on the held-out test split.
    for split, prefix in (("val", "best_val"), ("test", "test")):
        if seg.has_labelled_cases(cfg, ctx.manifest, split):
            evaluated = seg.evaluate(cfg, ctx.manifest, ctx.root, trained.best_checkpoint, ctx.run_dir, split,
                                     ctx.tracker, ctx.progress, prefix=prefix)
            ctx.metrics.update(evaluated.metrics)

    packaged = seg.package(cfg, trained.best_checkpoint, ctx.run_dir, ctx.tracker)
    ctx.model_uri = packaged.model_uri
