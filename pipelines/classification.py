"""Classification: verify -> train -> evaluate (val, test with the selected checkpoint) -> package the model."""

from __future__ import annotations

from medseg.data.verify import DataVerificationError, verify_stage
from medseg.runner import PipelineContext
from medseg.training import classification as cls
from medseg.training.loop import has_labelled_cases


def run(ctx: PipelineContext) -> None:
    cfg = ctx.cfg
    if ctx.dist.is_main:
        verified = verify_stage(ctx.manifest, ctx.root, list(cfg.data.labels), ctx.run_dir, ctx.progress,
                                require_labels_for=(cfg.data.train_split, cfg.data.val_split),
                                expected_channels=len(cfg.data.channels), spatial_dims=cfg.model.spatial_dims,
                                cross_split_duplicates=cfg.data.cross_split_duplicates,
                                class_labels=True)
        ctx.tracker.log_artifact(verified.report_path)
        if not verified.report.ok:
            raise DataVerificationError(verified.report, verified.report_path)
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
