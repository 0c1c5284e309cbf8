"""ValuePredictor: a task that answers with numbers gets report rows and summary means without writing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.engine.results import CaseResult, Prediction
from medseg.engine.value_predictor import ValuePredictor
from medseg.io.discovery import InputCase


class Lengths(ValuePredictor):
    value_columns = ("length", "width")

    def predict(self, image: object, case_id: str) -> Prediction:
        return Prediction(case_id, "toy", np.eye(4), metrics={"length": float(len(case_id)), "width": 2.0})


def test_a_case_becomes_a_row_of_values_and_the_summary_their_means(tmp_path: Path) -> None:
    predictor = Lengths()
    case = InputCase("abcd", tmp_path / "abcd.nii.gz", "file")
    result = predictor.predict_case(case, tmp_path)
    assert result.status == "ok" and result.values == {"length": 4.0, "width": 2.0}
    assert predictor.expected_outputs(case, tmp_path) == {} and list(tmp_path.iterdir()) == []
    failed = CaseResult("x", "x.nii.gz", "failed", error="unreadable")
    entries, metrics = predictor.summarise([result, CaseResult("ab", "ab.nii.gz", values={"length": 2.0}), failed])
    assert entries == {"means": {"length": pytest.approx(3.0), "width": pytest.approx(2.0)}}
    assert metrics == {"mean_length": pytest.approx(3.0), "mean_width": pytest.approx(2.0)}


def test_a_subclass_without_predict_says_what_is_missing() -> None:
    with pytest.raises(NotImplementedError, match="ValuePredictor.predict"):
        ValuePredictor().predict("scan.nii.gz", "scan")
