"""medseg: medical imaging deep-learning pipelines on MONAI, tracked in MLflow."""

__version__ = "0.1.0"
