"""MLflow tracking: runs, metrics, artifacts, models with their I/O contract."""

from medseg.tracking.mlflow_tracker import MlflowTracker, NullTracker, default_tracking_uri

__all__ = ["MlflowTracker", "NullTracker", "default_tracking_uri"]
