"""nnU-Net's 2D configuration as a race candidate on thick-slice scans: a 3D DynUNet one slice
thick, whose every convolution is in-plane, trained and predicted through the ordinary 3D paths."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.planning.probe import with_overrides
from medseg.tasks.segmentation.slice_plan import slice_candidate, slice_topology
from tests.conftest import make_case


def _thick_slice_dataset(root: Path, n_cases: int = 5) -> Path:
    """An MSD folder of 0.8 x 0.8 x 4 mm scans (oblique affines), 9 slices each."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for i in range(n_cases):
        image, label, affine = make_case((47, 41, 9), seed=i, spacing=(0.8, 0.8, 4.0))
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "blob1", "2": "blob2"},
                                                   "training": training, "modality": {"0": "MRI"}}))
    return root


def test_the_slice_topology_is_in_plane_at_every_stage() -> None:
    topology = slice_topology([0.8, 0.8, 4.0], [47.0, 41.0, 9.0], thick_axis=2)
    assert topology.patch[2] == 1 and topology.pools_per_axis[2] == 0
    assert all(k[2] == 1 for k in topology.kernels) and all(s[2] == 1 for s in topology.strides)
    assert all(k[:2] == [3, 3] for k in topology.kernels)
    # in-plane: below the median slice so crops move, divisible by the pooling
    assert topology.patch[0] < 47 and topology.patch[1] < 41
    assert all(p % d == 0 for p, d in zip(topology.patch, topology.divisor))
    # the thick axis may be any axis
    first = slice_topology([5.0, 0.7, 0.7], [10.0, 64.0, 64.0], thick_axis=0)
    assert first.patch[0] == 1 and all(k[0] == 1 for k in first.kernels)


def test_no_slice_candidate_without_a_thick_axis_or_on_2d_data() -> None:
    shapes, spacings = [(40, 40, 40)] * 3, [(1.0, 1.0, 1.0)] * 3
    assert slice_candidate([1.0, 1.0, 1.0], shapes, spacings, None) is None
    assert slice_candidate([1.0, 1.0], [(40, 40)], [(1.0, 1.0)], 1) is None


def test_a_thick_slice_plan_races_the_2d_network_which_trains_and_predicts_on_the_input_grid(
        tmp_path: Path) -> None:
    root = _thick_slice_dataset(tmp_path / "thick")
    planned = medseg.plan(root, budget="30m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    assert planned.why["preprocess.spacing"].startswith("median spacing, axis")  # the thick axis was found
    (two_d,) = [c for c in planned.candidates if c.name.startswith("2d")]
    assert planned.candidates[0].overrides == {}  # the rules' own 3D choice comes first
    patch = two_d.overrides["patch.size"]
    thick = patch.index(1)
    assert all(k[thick] == 1 for k in two_d.overrides["model"]["kernels"])
    raw = with_overrides(planned.config, {
        **two_d.overrides, "output_dir": str(tmp_path / "runs"), "train.max_minutes": None, "train.max_epochs": 1,
        "train.folds": None, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "validation.hd95": False,
        # no mirroring TTA in the evaluate stage: it was half this test's time (8 flips of every
        # case), and flipping is the network's business nowhere; tests/tasks/segmentation/
        # test_evaluation_tta.py covers evaluation with mirroring
        "validation.overlays": 0, "validation.tta": False, "tracking.system_metrics": False})
    result = medseg.train(medseg.validate_config(raw), progress=False)
    assert result is not None and np.isfinite(result.metrics["val/dice_mean"])
    scan = root / "imagesTr" / "case_004.nii.gz"
    batch = medseg.Predictor.from_uri(result.model_uri, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").predict_folder(
        scan, tmp_path / "pred", progress=False)
    assert batch.n_failed == 0
    mask = nib.load(batch.results[0].outputs["output"])
    source = nib.load(scan)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-4)


@pytest.mark.parametrize("thick_axis", [0, 1, 2])
def test_the_2d_network_sees_one_slice_whatever_axis_is_thick(thick_axis: int) -> None:
    import torch

    from medseg.tasks.registry import get_task
    from medseg.tasks.segmentation.networks import create_segmentation_network
    from medseg.tasks.segmentation.slice_plan import slice_network

    spacing = [0.8, 0.8, 0.8]
    spacing[thick_axis] = 4.0
    median = [40.0, 40.0, 40.0]
    median[thick_axis] = 9.0
    topology = slice_topology(spacing, median, thick_axis)
    model_cfg = get_task("segmentation").config_type.model_fields["model"].annotation.model_validate(
        slice_network(topology))
    network = create_segmentation_network(model_cfg, 1, 3, topology.patch).eval()
    with torch.no_grad():
        out = network(torch.randn(2, 1, *topology.patch))
    assert list(out.shape) == [2, 3, *topology.patch]
