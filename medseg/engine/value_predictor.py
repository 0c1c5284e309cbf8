"""A case predictor for tasks whose answer is a few numbers per case (a regressed quantity, a
score): no output files; the values go into the batch report and their means into the summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from medseg.engine.results import CaseResult, Prediction
from medseg.io.discovery import InputCase


class ValuePredictor:
    """Subclasses set :attr:`value_columns` and implement :meth:`predict`, whose
    ``Prediction.metrics`` hold one value per column."""

    output_columns: tuple[str, ...] = ()
    value_columns: tuple[str, ...] = ()

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        raise NotImplementedError(f"{type(self).__name__}.predict(image, case_id) is the task's piece")

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return {}

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        prediction = self.predict(case.path, case.case_id)
        return CaseResult(case.case_id, str(case.path), "ok",
                          values={column: prediction.metrics.get(column) for column in self.value_columns})

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}  # nothing on disk to read back: a finished case without its report row is predicted again

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        """The mean of each value over the cases that have it (summary JSON and MLflow metrics)."""
        means: dict[str, float] = {}
        for column in self.value_columns:
            values = [float(r.values[column]) for r in results
                      if r.status == "ok" and isinstance(r.values.get(column), (int, float))]
            if values:
                means[column] = float(np.mean(values))
        return {"means": means}, {f"mean_{column}": value for column, value in means.items()}
