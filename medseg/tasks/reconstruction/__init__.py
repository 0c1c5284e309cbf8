"""medseg.tasks.reconstruction.operators."""
