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
    "evaluate_downstream": "medseg.api",
    "demo": "medseg.api",
    "headline": "medseg.api",
    "check_model": "medseg.api",
    "describe": "medseg.api",
    "build_manifest": "medseg.api",
    "build_manifest_from_layout": "medseg.api",
    "detect_layout": "medseg.api",
    "DatasetLayout": "medseg.api",
    "import_medmnist": "medseg.api",
    "calibrate_run": "medseg.api",
    "plan": "medseg.api",
    "pretrain": "medseg.api",
    "PretrainResult": "medseg.api",
    "race_plan": "medseg.api",
    "convert_model": "medseg.api",
    "export_model": "medseg.api",
    "Predictor": "medseg.api",
    "predict_dataset": "medseg.api",
    "RayOptions": "medseg.engine.ray_predict",
    "RunResult": "medseg.api",
    "Prediction": "medseg.engine.results",
    "BatchReport": "medseg.engine.results",
    "CaseResult": "medseg.engine.results",
    "VerifyReport": "medseg.data.verify",
    "RunConfig": "medseg.config",
    "Task": "medseg.tasks.base",
}

__all__ = ["__version__", *_EXPORTS]  # noqa: PLE0605 - one list of the public names: _EXPORTS

if TYPE_CHECKING:  # the same names for type checkers (tests/test_architecture.py keeps them equal)
    from medseg.api import (
        DatasetLayout as DatasetLayout,
    )
    from medseg.api import (
        Predictor as Predictor,
    )
    from medseg.api import (
        PretrainResult as PretrainResult,
    )
    from medseg.api import (
        RunResult as RunResult,
    )
    from medseg.api import (
        build_manifest as build_manifest,
    )
    from medseg.api import (
        build_manifest_from_layout as build_manifest_from_layout,
    )
    from medseg.api import (
        calibrate_run as calibrate_run,
    )
    from medseg.api import (
        check_model as check_model,
    )
    from medseg.api import (
        convert_model as convert_model,
    )
    from medseg.api import (
        demo as demo,
    )
    from medseg.api import (
        describe as describe,
    )
    from medseg.api import (
        detect_layout as detect_layout,
    )
    from medseg.api import (
        evaluate as evaluate,
    )
    from medseg.api import (
        evaluate_downstream as evaluate_downstream,
    )
    from medseg.api import (
        export_model as export_model,
    )
    from medseg.api import (
        headline as headline,
    )
    from medseg.api import (
        import_medmnist as import_medmnist,
    )
    from medseg.api import (
        list_models as list_models,
    )
    from medseg.api import (
        plan as plan,
    )
    from medseg.api import (
        predict_dataset as predict_dataset,
    )
    from medseg.api import (
        pretrain as pretrain,
    )
    from medseg.api import (
        race_plan as race_plan,
    )
    from medseg.api import (
        train as train,
    )
    from medseg.api import (
        verify as verify,
    )
    from medseg.config import (
        RunConfig as RunConfig,
    )
    from medseg.data.verify import (
        VerifyReport as VerifyReport,
    )
    from medseg.engine.ray_predict import (
        RayOptions as RayOptions,
    )
    from medseg.engine.results import (
        BatchReport as BatchReport,
    )
    from medseg.engine.results import (
        CaseResult as CaseResult,
    )
    from medseg.engine.results import (
        Prediction as Prediction,
    )
    from medseg.tasks.base import (
        Task as Task,
    )
    from medseg.tasks.registry import (
        get_task as get_task,
    )
    from medseg.tasks.registry import (
        list_tasks as list_tasks,
    )
    from medseg.tasks.registry import (
        load_config as load_config,
    )
    from medseg.tasks.registry import (
        validate_config as validate_config,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
