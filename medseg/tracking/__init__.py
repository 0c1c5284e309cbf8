"""MLflow tracking: runs, metrics, artifacts, models with their I/O contract."""

from medseg.tracking.mlflow_tracker import MlflowTracker, default_tracking_uri

__all__ = ["MlflowTracker", "default_tracking_uri"]
