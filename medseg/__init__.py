"""medseg: medical imaging deep-learning pipelines on MONAI, tracked in MLflow.

The public API (see :mod:`medseg.api`)::

    import medseg
    cfg = medseg.load_config("configs/demo_segmentation.yaml")
    result = medseg.train(cfg)                       # -> RunResult (run id, model URI, run dir, metrics)
    report = medseg.verify("data_manifests/demo_hippocampus.csv", config=cfg)   # -> VerifyReport
    predictor = medseg.Predictor.from_uri(result.model_uri)
    prediction = predictor.predict("scan.nii.gz")    # -> Prediction (label map, volumes, ...)
    batch = predictor.predict_folder("scans/", "out/")  # -> BatchReport
    medseg.list_tasks(), medseg.list_models("segmentation")
    planned = medseg.plan("path/to/dataset", budget="30m", out="configs/mine.yaml")  # -> Plan

Names are imported on first use, so ``import medseg`` (and ``medseg --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medseg._version import __version__

#: public name -> module that defines it
_EXPORTS = {
    "load_config": "medseg.tasks.registry",
    "validate_config": "medseg.tasks.registry",
    "list_tasks": "medseg.tasks.registry",
    "get_task": "medseg.tasks.registry",
    "list_models": "medseg.api",
    "train": "medseg.api",
    "verify": "medseg.api",
    "evaluate": "medseg.api",
    "check_model": "medseg.api",
    "describe": "medseg.api",
    "build_manifest": "medseg.api",
    "build_manifest_from_layout": "medseg.api",
    "detect_layout": "medseg.api",
    "DatasetLayout": "medseg.api",
    "import_medmnist": "medseg.api",
    "calibrate_run": "medseg.api",
    "plan": "medseg.api",
    "race_plan": "medseg.api",
    "convert_model": "medseg.api",
    "export_model": "medseg.api",
    "Predictor": "medseg.api",
    "RunResult": "medseg.api",
    "Prediction": "medseg.engine.predict",
    "BatchReport": "medseg.engine.predict",
    "CaseResult": "medseg.engine.predict",
    "VerifyReport": "medseg.data.verify",
    "RunConfig": "medseg.config",
    "Task": "medseg.tasks.base",
}

__all__ = [
    "DatasetLayout", "build_manifest_from_layout", "detect_layout",
    "BatchReport", "CaseResult", "Prediction", "Predictor", "RunConfig", "RunResult", "Task", "VerifyReport",
    "__version__", "build_manifest", "calibrate_run", "convert_model", "check_model", "describe", "evaluate", "export_model", "get_task", "import_medmnist", "list_models", "list_tasks",
    "load_config", "plan", "race_plan", "train", "validate_config", "verify",
]

if TYPE_CHECKING:
    from medseg.api import (
        DatasetLayout,
        Predictor,
        RunResult,
        build_manifest,
        build_manifest_from_layout,
        calibrate_run,
        check_model,
        convert_model,
        describe,
        detect_layout,
        evaluate,
        export_model,
        import_medmnist,
        list_models,
        plan,
        race_plan,
        train,
        verify,
    )
    from medseg.config import RunConfig
    from medseg.data.verify import VerifyReport
    from medseg.engine.predict import BatchReport, CaseResult, Prediction
    from medseg.tasks.base import Task
    from medseg.tasks.registry import get_task, list_tasks, load_config, validate_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
