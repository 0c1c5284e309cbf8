"""Everything a task package needs from medseg, in one place: the plug-in surface.

A new task (in this repository or in a package of its own, registered under the ``medseg.tasks``
entry-point group) imports from here and nowhere else in medseg. It subclasses :class:`TaskBase`
and supplies pieces (config, network, transforms, loss, ``score``, contract extras, a case
predictor); the engine owns training, evaluation, packaging and batch prediction, and a task
that needs more overrides a finer piece (``validation``, ``score_split``, ``packaged_contract``...).
See ``tests/plugin_task/medseg_toy_task`` for a whole task in under 120 lines.
"""

from __future__ import annotations

from medseg.config import LossConfig, ModelConfig, RunConfig
from medseg.engine.case_io import read_error, write_nifti
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.model_loading import LoadedModel
from medseg.engine.models import create_model, register_model
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.value_predictor import ValuePredictor
from medseg.errors import CaseError
from medseg.io.discovery import InputCase
from medseg.io.readers import make_load_transform
from medseg.tasks.base import TaskBase

__all__ = [
    "CaseError", "CaseResult", "Evaluator", "InputCase", "LoadedModel", "LossConfig", "ModelConfig", "Prediction",
    "PredictOptions", "RunConfig", "SplitScores", "TaskBase", "ValuePredictor", "create_model",
    "make_load_transform", "read_error", "register_model", "write_nifti",
]
