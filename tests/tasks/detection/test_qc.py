"""Detection QC against known answers: which scans are flagged and why (no boxes, too many confident
boxes, only low-confidence boxes, a confident box at the image's edge), the thresholds a contract
carries and ``--qc`` overrides, and the reasons in words on the review page."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medseg.engine.results import CaseResult
from medseg.engine.review import plain_reasons, qc_summary
from medseg.errors import PredictOptionError
from medseg.tasks.detection.qc import DEFAULT_QC, box_quality, contract_qc, edge_boxes, qc_thresholds


def _flags(**values: float) -> list[str]:
    quality = box_quality(values, DEFAULT_QC)
    assert quality["qc_flag"] == bool(quality["qc_reason"])
    return [r for r in quality["qc_reason"].split("; ") if r]


def test_each_flag_and_a_clean_scan() -> None:
    assert _flags(n_boxes=3, confident_boxes=2, max_score=0.93, edge_boxes=0) == []
    assert _flags(n_boxes=0, confident_boxes=0, max_score=math.nan, edge_boxes=0) == ["boxes 0 < 1"]
    assert _flags(n_boxes=40, confident_boxes=14, max_score=0.99, edge_boxes=0) == ["confident boxes 14 > 10"]
    assert _flags(n_boxes=5, confident_boxes=0, max_score=0.31, edge_boxes=0) == ["top score 0.310 < 0.5"]
    assert _flags(n_boxes=2, confident_boxes=1, max_score=0.8, edge_boxes=1) == ["edge boxes 1 > 0"]
    assert _flags(n_boxes=2, confident_boxes=1, max_score=0.8) == []  # edge unknown (input shape not given): not judged


def test_only_confident_boxes_at_the_edge_count() -> None:
    starts = np.array([[0.0, 10, 3], [5, 5, 2], [30, 2, 1], [12, 12, 0.4]])
    ends = np.array([[4.0, 14, 6], [9, 9, 4], [40, 6, 3], [15, 15, 2]])
    scores = np.array([0.9, 0.95, 0.7, 0.3])  # box 1 at x = 0, box 3 ends at x = 40 = the edge, box 4 unsure
    assert edge_boxes(starts, ends, scores, (40, 32, 11)) == 2
    assert edge_boxes(starts[1:2], ends[1:2], scores[1:2], (40, 32, 11)) == 0
    assert edge_boxes(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), (40, 32)) == 0


def test_thresholds_from_the_contract_the_validation_scans_and_overrides(tmp_path: Path) -> None:
    val_cases = tmp_path / "val_cases.csv"
    val_cases.write_text("case_id,reference_boxes,predicted_boxes,confident_boxes,confident_hits,max_score\n"
                         "a,3,7,2,2,0.9\nb,0,1,0,0,0.1\nc,5,9,4,3,0.8\n")
    assert contract_qc(val_cases) == {**DEFAULT_QC, "max_confident_boxes": 10.0}
    val_cases.write_text("case_id,reference_boxes\na,1\nb,2\n")
    assert contract_qc(val_cases)["max_confident_boxes"] == 4.0
    assert contract_qc(tmp_path / "missing.csv") == DEFAULT_QC
    contract = {"qc": {"max_confident_boxes": 4.0, "max_abs_volume_z": 3.0}}  # a foreign key is not taken
    assert qc_thresholds(contract, [("min_top_score", 0.8)]) == {**DEFAULT_QC, "max_confident_boxes": 4.0,
                                                                 "min_top_score": 0.8}
    assert qc_thresholds({}, []) == DEFAULT_QC  # a model packaged before detection had QC
    with pytest.raises(PredictOptionError, match="--qc max_mean_entropy=0.2: not a detection QC threshold; use one "
                                                 "of min_boxes, max_confident_boxes, min_top_score, max_edge_boxes"):
        qc_thresholds({}, [("max_mean_entropy", 0.2)])


def test_reasons_in_words_and_counted_by_kind() -> None:
    values = [dict(n_boxes=0.0, confident_boxes=0.0, max_score=math.nan, edge_boxes=0.0),
              dict(n_boxes=30.0, confident_boxes=14.0, max_score=0.99, edge_boxes=2.0),
              dict(n_boxes=5.0, confident_boxes=0.0, max_score=0.41, edge_boxes=0.0)]
    results = [CaseResult(f"scan_{i}", "x", "ok", values={**v, **box_quality(v, DEFAULT_QC)}) for i, v in enumerate(values)]
    assert plain_reasons(results[0], DEFAULT_QC) == ["no box found: a scan without lesions, or lesions the detector "
                                                     "missed"]
    assert plain_reasons(results[1], DEFAULT_QC) == [
        "14 confident boxes (score 0.5 or more), more than the 10 this model expects of a scan",
        "2 confident box(es) touching the image's edge (at most 0 expected): a lesion there may be cut off, or the "
        "box may be an artefact of the edge"]
    assert plain_reasons(results[2], DEFAULT_QC) == ["only low-confidence boxes: the best scores 0.41, below 0.5"]
    summary = qc_summary(results, DEFAULT_QC)
    assert summary["flagged"] == 3
    assert summary["by_reason"] == {"boxes": 1, "confident boxes": 1, "top score": 1, "edge boxes": 1}
