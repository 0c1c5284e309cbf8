"""medseg.tasks.classification.metrics."""
