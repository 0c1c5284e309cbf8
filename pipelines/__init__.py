"""Pipelines: compositions of medseg stages, one per task. Nothing but the order of stages lives here."""

from pipelines import classification, segmentation

PIPELINES = {"segmentation": segmentation.run, "classification": classification.run}

__all__ = ["PIPELINES"]
