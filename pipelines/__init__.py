"""Pipelines: compositions of medseg stages, one per task. Nothing but the order of stages lives here."""

from pipelines import classification, reconstruction, segmentation

PIPELINES = {"segmentation": segmentation.run, "classification": classification.run,
             "reconstruction": reconstruction.run}

__all__ = ["PIPELINES"]
