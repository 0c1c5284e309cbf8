"""The batch driver and the local files it writes: its lock, where its outputs may go, long case
names, spreadsheet-safe report cells and a report whose cost grows linearly with the cases."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.engine import predict as driver
from medseg.engine import report as report_module
from medseg.engine.model_loading import LoadedModel
from medseg.engine.predict import predict_folder
from medseg.engine.results import CaseResult, PredictOptions
from medseg.errors import RunError, UsageError
from medseg.io.discovery import Discovery, InputCase
from medseg.io.naming import NAME_MAX, name_fits
from tests.conftest import make_case

MODEL = LoadedModel((), {"task": "fake"}, ("fake",), (None,), weights_sha256=("0" * 64,))


class FakePredictor:
    """Writes one small file per case (named by :func:`medseg.io.naming.output_paths`), values from a table."""

    output_columns = ("output",)
    value_columns = ("value", "note")

    def __init__(self, values: dict[str, dict[str, Any]] | None = None, stop_at: str | None = None):
        self.values = values or {}
        self.stop_at = stop_at
        self.predicted: list[str] = []

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        from medseg.io.naming import output_paths

        return output_paths(output_dir, case.case_id, {"output": ".nii.gz"})

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        if case.case_id == self.stop_at:
            raise KeyboardInterrupt  # a kill: not one case's failure
        self.predicted.append(case.case_id)
        path = self.expected_outputs(case, output_dir)["output"]
        path.write_bytes(b"mask")
        values = self.values.get(case.case_id, {"value": 0.5, "note": ""})
        return CaseResult(case.case_id, str(case.path), "ok", outputs={"output": str(path)}, values=values)

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        return {}, {}


def _cases(folder: Path, ids: Sequence[str]) -> Discovery:
    return Discovery(cases=[InputCase(i, folder / f"{i}.nii.gz", "file") for i in ids])


def _run(predictor: FakePredictor, output: Path, found: Discovery, input_dir: Path | None = None,
         **options: Any) -> driver.BatchReport:
    return predict_folder(predictor, MODEL, input_dir or output.parent / "in", output,  # type: ignore[arg-type]
                          PredictOptions(progress=False, review=False, **options), torch.device("cpu"), found=found)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- the lock


def test_a_link_planted_as_the_predict_lock_stops_the_batch_and_leaves_its_target_alone(tmp_path: Path) -> None:
    canary = tmp_path / "precious.txt"
    canary.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".medseg_predict.lock").symlink_to(canary)
    with pytest.raises(RunError, match=r"\.medseg_predict\.lock: the lock file of the output folder .* is a symbolic "
                                       r"link \(to .*precious\.txt\).*Remove the link"):
        _run(FakePredictor(), out, _cases(tmp_path, ["a"]))
    assert canary.read_text() == "keep me\n"
    assert not (out / "predictions.csv").exists()


# ----------------------------------------------------------------------------------- output inside input


def _scans(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _, affine = make_case((9, 11, 7), seed=70 + i)
        nib.save(nib.Nifti1Image(image, affine), folder / f"scan_{i}.nii.gz")
    return folder


@pytest.mark.parametrize("where", ["same", "nested", "link"])
def test_an_output_folder_at_or_inside_the_input_folder_is_refused_with_the_fix(tmp_path: Path, where: str) -> None:
    scans = _scans(tmp_path / "scans")
    if where == "same":
        out = scans
    elif where == "nested":
        out = scans / "masks"
    else:  # a link elsewhere that resolves inside the input
        (scans / "hidden").mkdir()
        (tmp_path / "out_link").symlink_to(scans / "hidden")
        out = tmp_path / "out_link"
    before = sorted(p.name for p in scans.rglob("*"))
    with pytest.raises(UsageError, match=rf"--output {out}: is (the --input folder|inside the --input folder {scans})"
                                         rf".*Choose an --output outside {scans}, e\.g\. .*scans_predictions"):
        predict_folder(FakePredictor(), MODEL, scans, out, PredictOptions(progress=False),  # type: ignore[arg-type]
                       torch.device("cpu"))
    assert sorted(p.name for p in scans.rglob("*")) == before  # nothing written, nothing replaced


def test_an_output_beside_the_input_file_that_would_replace_it_is_a_failed_case(tmp_path: Path) -> None:
    scans = _scans(tmp_path / "scans", 1)
    scan = scans / "scan_0.nii.gz"
    content = scan.read_bytes()
    found = driver.discover_inputs(scan)  # one file: its folder is not searched
    for overwrite in (False, True):
        report = predict_folder(FakePredictor(), MODEL, scan, scans, PredictOptions(progress=False, review=False,
                                                                                      overwrite=overwrite),
                                torch.device("cpu"), found=found)  # type: ignore[arg-type]
        (result,) = report.results
        assert result.status == "failed" and "would replace the input itself" in result.error
        assert scan.read_bytes() == content


def test_the_cli_refuses_an_output_inside_the_input(trained_segmentation: dict[str, str], tmp_path: Path,
                                                    capsys) -> None:
    scans = _scans(tmp_path / "scans", 1)
    code = main(["predict", "--model", trained_segmentation["model_uri"], "--tracking-uri",
                 trained_segmentation["tracking_uri"], "--input", str(scans), "--output", str(scans / "out"),
                 "--no-progress", "--no-tracking"])
    assert code == 2
    assert "is inside the --input folder" in capsys.readouterr().err
    assert not (scans / "out").exists()


# ----------------------------------------------------------------------------------- long names


def test_long_case_names_are_predicted_under_shortened_names_and_the_report_keeps_them_whole(
        trained_segmentation: dict[str, str], tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    deep = scans.joinpath(*["folder_" + "d" * 90] * 3)  # each part fits; the case name (the joined path) does not
    inputs = [scans / ("s" * 223 + ".nii.gz"), scans / ("t" * 248 + ".nii.gz"), deep / "scan.nii.gz",
              scans / "short.nii.gz"]  # file names of 230 and 255 characters, a path of 300
    for i, path in enumerate(inputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        image, _, affine = make_case((11, 13, 9), seed=80 + i)
        nib.save(nib.Nifti1Image(image, affine), path)
    out = tmp_path / "out"
    args = ["predict", "--model", trained_segmentation["model_uri"], "--tracking-uri",
            trained_segmentation["tracking_uri"], "--input", str(scans), "--output", str(out), "--no-progress",
            "--no-tracking"]
    assert main(args) == 0
    rows = {r["case_id"]: r for r in _rows(out / "predictions.csv")}
    assert [r["status"] for r in rows.values()] == ["ok"] * 4, rows
    assert {"s" * 223, "t" * 248} <= set(rows) and any(len(case_id) > NAME_MAX for case_id in rows)  # names kept
    for case_id, row in rows.items():
        mask = Path(row["output"])
        assert mask.is_file() and len(mask.name) <= NAME_MAX
        assert (mask.name == f"{case_id}.nii.gz") == name_fits(f"{case_id}.nii.gz")
        assert nib.load(mask).shape == nib.load(row["input"]).shape
    assert sum(not name_fits(f"{case_id}.nii.gz") for case_id in rows) == 2  # the 255 and the 300 shortened
    assert main(args) == 0  # the rerun finds the shortened files: nothing predicted again
    assert [r["status"] for r in _rows(out / "predictions.csv")] == ["skipped"] * 4


# ----------------------------------------------------------------------------------- report cells


def test_report_cells_that_would_run_as_formulas_are_escaped_and_read_back_on_resume(tmp_path: Path) -> None:
    ids = ["=HYPERLINK(\"evil.example\",\"x\")", "@SUM(A1)", "plain"]
    values = {ids[0]: {"value": -0.5, "note": "+cmd|' /C calc'!A0"}, ids[1]: {"value": "-0.25", "note": "-x"},
              ids[2]: {"value": 1.0, "note": "fine"}}
    out = tmp_path / "out"
    _run(FakePredictor(values), out, _cases(tmp_path, ids))
    text = (out / "predictions.csv").read_text()
    rows = _rows(out / "predictions.csv")
    assert [r["case_id"] for r in rows] == ["'" + ids[0], "'" + ids[1], "plain"]
    assert [r["value"] for r in rows] == ["-0.5", "-0.25", "1"]  # numbers stay numbers
    assert [r["note"] for r in rows] == ["'+cmd|' /C calc'!A0", "'-x", "fine"]
    assert "\n=" not in text and ",=" not in text and ",@" not in text
    rerun = FakePredictor(values)
    report = _run(rerun, out, _cases(tmp_path, ids))
    assert rerun.predicted == [] and [r.status for r in report.results] == ["skipped"] * 3
    assert [r.values["note"] for r in report.results] == ["+cmd|' /C calc'!A0", "-x", "fine"]  # unescaped
    again = _rows(out / "predictions.csv")
    assert [(r["case_id"], r["value"], r["note"]) for r in again] == [(r["case_id"], r["value"], r["note"]) for r in rows]


def test_evaluation_csvs_escape_formula_cells_too(tmp_path: Path) -> None:
    from medseg.engine.loop import write_csv

    path = write_csv(tmp_path / "val_cases.csv", ["case_id", "dice"], [{"case_id": "=1+1", "dice": "-0.5"}])
    assert path.read_text().splitlines()[1] == "'=1+1,-0.5"


# ----------------------------------------------------------------------------------- linear report


class _CountingAppender(report_module.ReportAppender):
    made: list[_CountingAppender] = []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.whole_writes = 0
        _CountingAppender.made.append(self)

    def _write_whole(self, rows: Any) -> Path:
        self.whole_writes += 1
        return super()._write_whole(rows)


def _report_cost(tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    _CountingAppender.made = []
    monkeypatch.setattr(driver, "ReportAppender", _CountingAppender)
    _run(FakePredictor(), tmp_path / f"out{n}", _cases(tmp_path, [f"case_{i:05d}" for i in range(n)]))
    (appender,) = _CountingAppender.made
    return appender.bytes_written, appender.whole_writes


def test_the_report_costs_linear_bytes_in_the_number_of_cases(tmp_path: Path, monkeypatch) -> None:
    small, small_writes = _report_cost(tmp_path, 100, monkeypatch)
    large, large_writes = _report_cost(tmp_path, 800, monkeypatch)
    assert small_writes == large_writes == 2  # the header at the start, the whole report once at the end
    assert 7 < large / small < 9  # 8 times the cases, 8 times the bytes (rewritten per case: ~60 times)


def test_a_batch_killed_midway_keeps_its_finished_rows_and_the_rerun_predicts_only_the_rest(tmp_path: Path) -> None:
    ids = [f"case_{i}" for i in range(6)]
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(FakePredictor(stop_at="case_3"), out, _cases(tmp_path, ids))
    assert [r["case_id"] for r in _rows(out / "predictions.csv")] == ids[:3]
    rerun = FakePredictor()
    report = _run(rerun, out, _cases(tmp_path, ids))
    assert rerun.predicted == ids[3:]
    assert [(r["case_id"], r["status"]) for r in _rows(report.report)] == \
        [(i, "skipped") for i in ids[:3]] + [(i, "ok") for i in ids[3:]]
    assert [r["value"] for r in _rows(report.report)] == ["0.5"] * 6  # the skipped rows keep their values


def test_a_row_cut_short_by_a_kill_is_not_taken_as_finished(tmp_path: Path) -> None:
    path = tmp_path / "predictions.csv"
    path.write_text("case_id,input,status,error,seconds,output,value\na,x,ok,,0.1,m.nii.gz,0.5\nb,y,ok\n")
    assert list(report_module.finished_rows(path)) == ["a"]


def test_numbers_in_a_report_are_not_escaped() -> None:
    text = report_module.csv_text([{"a": "-1.5", "b": np.float64(-2.0), "c": -3}], ["a", "b", "c"])
    assert text.splitlines()[1] == "-1.5,-2.0,-3"
