"""medseg.tasks.segmentation.metrics."""
