"""The operator's voxel and time limits hold for a medseg model served through MLflow
(:class:`medseg.serving.pyfunc.MedsegPyfunc`, what ``mlflow models serve`` runs), as they do for
``medseg serve``: an oversized scan is a failed row, never read; after the time limit the cases
not yet started are failed rows saying so."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medseg.serving.guard import ServeLimits
from medseg.serving.pyfunc import MedsegPyfunc
from tests.serving.serve_support import segmentation_model


@pytest.fixture(scope="module")
def model_and_scans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pyfunc_limits")
    model, dataset = segmentation_model(folder)
    return model, dataset / "imagesTr"


def _served(model: Path, scans: Path, out: Path, **limits: float) -> MedsegPyfunc:
    out.mkdir()
    return MedsegPyfunc(model, ServeLimits(input_root=scans, output_root=out, **limits), device="cpu")  # type: ignore[arg-type]


def test_a_scan_over_the_voxel_limit_is_a_failed_row_and_the_others_are_predicted(
        model_and_scans: tuple[Path, Path], tmp_path: Path) -> None:
    model, scans = model_and_scans
    voxels = 29 * 37 * 23  # the synthetic cases' shape
    served = _served(model, scans, tmp_path / "out", max_voxels=voxels)
    ok = served.predict(pd.DataFrame({"path": ["case_000.nii.gz"]}))
    assert list(ok["status"]) == ["ok"]

    small = _served(model, scans, tmp_path / "out_small", max_voxels=voxels - 1)
    frame = small.predict(pd.DataFrame({"path": ["case_000.nii.gz", "case_001.nii.gz"]}))
    assert list(frame["status"]) == ["failed", "failed"]
    assert all(f"{voxels} voxels in its header" in e and "MEDSEG_SERVE_MAX_VOXELS" in e for e in frame["error"])
    assert not any((tmp_path / "out_small").rglob("*.nii.gz"))  # nothing predicted, nothing written


def test_cases_not_started_within_the_time_limit_are_failed_rows_saying_so(
        model_and_scans: tuple[Path, Path], tmp_path: Path) -> None:
    model, scans = model_and_scans
    served = _served(model, scans, tmp_path / "out", timeout_s=1e-9)  # passed before the first case starts
    frame = served.predict(pd.DataFrame({"path": ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]}))
    assert list(frame["status"]) == ["failed"] * 3
    assert all("time limit of 1e-09 s passed before this case started" in e for e in frame["error"])
    assert not any((tmp_path / "out").rglob("*.nii.gz"))
