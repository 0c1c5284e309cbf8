"""Classification: verify -> train -> evaluate (val, test with the selected checkpoint) -> package the model."""

from __future__ import annotations

from medseg.engine.runner import PipelineContext
from medseg.tasks.classification import training as cls
from medseg.engine.loop import has_labelled_cases


def run(ctx: PipelineContext) -> None:
    cfg = ctx.cfg
    trained = ctx.verify_and_train(cls.train)
    if trained is None:  # the other processes of a distributed run are done once training is
        return

    # The checkpoint with the best validation AUC, not the last epoch, is scored on val and,
    # once, on the held-out test split (with the t-SNE map there).
    for split, prefix in (("val", "best_val"), ("test", "test")):
        if has_labelled_cases(cfg, ctx.manifest, split):
            evaluated = cls.evaluate(cfg, ctx.manifest, ctx.root, trained.best_checkpoint, ctx.run_dir, split,
                                     ctx.tracker, ctx.progress, prefix=prefix,
                                     tsne=split == "test" and cfg.validation.tsne)
            ctx.metrics.update(evaluated.metrics)

    packaged = cls.package(cfg, trained.best_checkpoint, ctx.run_dir, ctx.tracker)
    ctx.model_uri = packaged.model_uri
