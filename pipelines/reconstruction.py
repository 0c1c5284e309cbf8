"""Reconstruction: (phantoms, before the run) -> verify -> train -> evaluate (val, test, real images)
with the selected checkpoint, each beside its classical baseline -> package the model."""

from __future__ import annotations

from medseg.engine.runner import PipelineContext
from medseg.tasks.reconstruction import training as recon


def run(ctx: PipelineContext) -> None:
    cfg = ctx.cfg
    trained = ctx.verify_and_train(recon.train)
    if trained is None:  # the other processes of a distributed run are done once training is
        return

    # The checkpoint with the best validation SSIM is scored on val, once on the held-out test
    # split, and on the real images the config lists.
    for split, prefix in (("val", "best_val"), ("test", "test")):
        items = recon.split_items(cfg, ctx.manifest, ctx.root, split)
        if items:
            evaluated = recon.evaluate(cfg, items, trained.best_checkpoint, ctx.run_dir, split, ctx.tracker,
                                       ctx.progress, prefix=prefix)
            ctx.metrics.update(evaluated.metrics)
    real = recon.resolve_real_images(cfg, ctx.root)
    if real:
        evaluated = recon.evaluate(cfg, real, trained.best_checkpoint, ctx.run_dir, "real", ctx.tracker, ctx.progress)
        ctx.metrics.update(evaluated.metrics)

    packaged = recon.package(cfg, trained.best_checkpoint, ctx.run_dir, ctx.tracker)
    ctx.model_uri = packaged.model_uri
