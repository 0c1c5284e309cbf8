"""Long case names give output names that fit, the same ones every time; CSV cells escaped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from medseg.errors import CaseError
from medseg.io.atomic import atomic_write_text, temp_name_bytes
from medseg.io.csv_cells import escape_cell, unescape_cell
from medseg.io.naming import NAME_MAX, name_fits, output_paths, output_stem

SUFFIXES = {"output": ".nii.gz", "probabilities": "_probabilities.nii.gz", "dicom_seg": "_seg.dcm"}


def test_a_short_name_is_kept_as_it_is() -> None:
    assert output_stem("case_001", SUFFIXES) == "case_001"


@pytest.mark.parametrize("length", [228, 230, 255, 300, 2000])
def test_a_long_name_is_shortened_with_its_hash_and_every_file_and_temp_file_fits(tmp_path: Path, length: int) -> None:
    case_id = "x" * (length - 4) + f"{length:04d}"
    paths = output_paths(tmp_path, case_id, SUFFIXES)
    stem = paths["output"].name.removesuffix(".nii.gz")
    assert stem.endswith("-" + hashlib.sha256(case_id.encode()).hexdigest()[:12])
    assert case_id.startswith(stem[:-13])
    for column, path in paths.items():
        assert path.name == stem + SUFFIXES[column]
        assert len(path.name.encode()) <= NAME_MAX and temp_name_bytes(path.name) <= NAME_MAX
        atomic_write_text(path, column)  # the file system takes it, temporary file included
    assert output_paths(tmp_path, case_id, SUFFIXES) == paths  # deterministic: a rerun finds its files


def test_names_that_differ_only_at_the_end_get_different_stems() -> None:
    a, b = "a" * 300 + "1", "a" * 300 + "2"
    assert output_stem(a, SUFFIXES) != output_stem(b, SUFFIXES)


def test_a_multibyte_name_is_cut_on_a_character_boundary() -> None:
    stem = output_stem("é" * 200, [".nii.gz"])
    assert name_fits(stem + ".nii.gz") and stem.startswith("é")


def test_no_name_fits_beside_an_impossible_suffix() -> None:
    with pytest.raises(CaseError, match="no output name fits"):
        output_stem("case", ["_" + "s" * 300])


def test_an_output_folder_path_too_long_for_any_file_is_a_case_error(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 200] * 21)
    with pytest.raises(CaseError, match="shorter path"):
        output_paths(deep, "case", SUFFIXES)


@pytest.mark.parametrize(("value", "written"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+cmd", "'+cmd"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("-0.5", "-0.5"), ("+3", "+3"), ("-1e-3", "-1e-3"), ("case_1", "case_1"),
    ("'=x", "''=x"), ("", ""), (-0.5, -0.5), (None, None)])
def test_csv_cells_that_start_a_formula_are_quoted_and_numbers_are_not(value: object, written: object) -> None:
    assert escape_cell(value) == written
    if isinstance(value, str):
        assert unescape_cell(escape_cell(value)) == value
