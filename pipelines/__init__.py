"""Pipelines: compositions of medseg stages, one per task. Nothing but the order of stages lives here."""

from pipelines import segmentation

PIPELINES = {"segmentation": segmentation.run}

__all__ = ["PIPELINES"]
