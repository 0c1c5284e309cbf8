"""medseg.engine."""
