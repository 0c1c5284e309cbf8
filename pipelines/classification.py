"""Classification: verify -> train -> evaluate (val, test with the selected checkpoint) -> package the model."""

from __future__ import annotations

from medseg.data.verify import verify_run_data
from medseg.runner import PipelineContext
from medseg.training import classification as cls
from medseg.training.loop import has_labelled_cases


def run(ctx: PipelineContext) -> None:
    cfg = ctx.cfg
    if ctx.dist.is_main:
        verify_run_data(cfg, ctx.manifest, ctx.root, ctx.run_dir, ctx.tracker, ctx.progress)
    ctx.dist.barrier()

    trained = cls.train(cfg, ctx.manifest, ctx.root, ctx.run_dir, ctx.tracker, resume=ctx.resume,
                        progress=ctx.progress)
    ctx.metrics.update(trained.metrics)
    if not ctx.dist.is_main:
        return
    ctx.tracker.log_artifact(trained.learning_curve, "plots")
    ctx.tracker.log_artifact(trained.history)

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
