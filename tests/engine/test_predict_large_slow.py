"""A CT-sized 512x512x300 volume goes through batch prediction within this machine's 24 GiB.

Slow (a few minutes on 2 cores): run with `pytest -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.engine.loop import log_network
from medseg.tasks.segmentation.training import build_network, model_contract
from medseg.tracking import MlflowTracker
from tests.conftest import REPO


@pytest.mark.slow
def test_512x512x300_volume_fits_in_memory_and_keeps_its_geometry(tmp_path: Path) -> None:
    cfg = medseg.load_config(REPO / "configs" / "msd_hippocampus.yaml", [
        "patch.size=[96,96,64]", "model.channels=[8,16,32,64]", "validation.overlap=0.25",
        "preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-160,240]"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "large")
    tracker.start("untrained", {})
    contract = model_contract(cfg)
    model_uri = log_network(build_network(cfg), cfg, contract, tmp_path, tracker)
    tracker.end()

    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, (512, 512, 300)).astype(np.int16)
    affine = np.array([[-0.7, 0.0, 0.0, 180.0], [0.0, -0.7, 0.0, 170.0], [0.0, 0.0, 1.5, -400.0], [0, 0, 0, 1]])
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), inputs / "ct.nii.gz")
    del volume

    out = tmp_path / "out"
    batch = medseg.Predictor.from_uri(model_uri, tracking_uri=uri).predict_folder(inputs, out, progress=False)
    assert batch.n_failed == 0 and batch.counts["ok"] == 1
    assert batch.summary_dict()["peak_rss_mb"] < 24 * 1024
    (case,) = batch.results
    assert case.outputs["output"] == str(out / "ct.nii.gz")
    mask = nib.load(out / "ct.nii.gz")
    assert mask.shape == (512, 512, 300)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
