"""``medseg predict --tta`` with a super-resolution model: the output is the mean over the in-plane
flips of the slices that the model's contract allows (``tta_axes``, those its training flipped),
on the thin grid of the thick scan, in either mode; other reconstruction problems refuse it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, ornt_transform
from torch import nn

from medseg.cli import main
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import PredictOptions
from medseg.errors import PredictOptionError
from medseg.tasks.reconstruction.config import SuperResolutionConfig
from medseg.tasks.reconstruction.predict import ReconstructionPredictor
from medseg.tasks.reconstruction.slice_profile import simulate_thick, thin_affine
from medseg.tasks.reconstruction.super_resolution import restore_slices
from tests.conftest import oblique_affine, write_config

CPU = torch.device("cpu")
#: The thin RAS grid (R, A, S): sagittal (A, S) slices of 9 x 15 once the thick S axis (5 slices of 3)
#: is back on it, odd in every axis; the network's training size is that slice, so one window covers it.
THIN_SHAPE = (5, 9, 15)
SLICE = [9, 15]


class Mirrored(nn.Module):
    """``flip(net(flip(x)))`` over in-plane ``axes`` of (N, C, H, W) slices: one TTA term, written out."""

    def __init__(self, net: nn.Module, axes: tuple[int, ...]):
        super().__init__()
        self.net, self.dims = net, [2 + a for a in axes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flip(self.dims)).flip(self.dims) if self.dims else self.net(x)


def _flips(axes: list[int]) -> list[tuple[int, ...]]:
    return [(), *[(a,) for a in axes], *([tuple(axes)] if len(axes) == 2 else [])]


def _seeded_sr_network_and_contract(tmp_path: Path, context: int = 1) -> tuple[nn.Module, dict[str, Any], Any]:
    """The tiny 2.5D SR U-Net of a config trained with in-plane flips, seeded, its zero-initialised head
    (an untrained network is the identity, which every flip leaves alone) given random weights."""
    from medseg import load_config
    from medseg.engine.loop import network_spec
    from medseg.tasks.registry import get_task

    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "manifest.csv").write_text("case_id,image,label,split\n")
    config = write_config(tmp_path, {
        "task": "reconstruction", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(tmp_path / "manifest.csv"), "root": str(tmp_path / "data")},
        "preprocess": {"orientation": "RAS"},
        "recon": {"problem": "sr", "image_size": SLICE, "slice_axis": 0,
                  "sr": {"factor": 3, "axis": 2, "profile": "gaussian", "context": context}},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]}],
        "model": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'unused.db'}"}}, {})
    cfg = load_config(config)
    task = get_task(str(cfg.task))
    torch.manual_seed(0)
    net = task.build_network(cfg).eval()
    with torch.no_grad():
        for param in net.get_submodule("block.head").parameters():
            param.normal_(0.0, 0.5)
    return net, task.contract(cfg), network_spec(cfg)


def _thick_scan(folder: Path) -> tuple[Path, np.ndarray]:
    """A seeded thick scan (3 mm Gaussian slices from an oblique, anisotropic thin grid) stored with
    its thick axis first (SLA): its file and affine."""
    thin = np.random.default_rng(3).random(THIN_SHAPE).astype(np.float32) * 400.0 + 50.0
    thin_grid = oblique_affine((1.3, 0.8, 1.1), (-20.0, 3.5, 41.0), angle_deg=23.0)
    thick, thick_grid = simulate_thick(thin, thin_grid, 2, SuperResolutionConfig(factor=3, axis=2))
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(thick_grid)), axcodes2ornt(("S", "L", "A")))
    image = nib.Nifti1Image(thick, thick_grid).as_reoriented(transform)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(image, folder / "scan.nii.gz")
    return folder / "scan.nii.gz", image.affine


def _predict(net: nn.Module, contract: dict[str, Any], scan: Path, tta: bool, measured: bool = True) -> Any:
    model = LoadedModel(networks=(net,), contract=contract, uris=("test-model",), source_run_ids=(None,))
    return ReconstructionPredictor(model, PredictOptions(measured=measured, tta=tta), CPU).predict(scan, "scan")


def test_restore_slices_with_tta_is_the_mean_of_each_whole_flipped_slice_through_the_sliding_window() -> None:
    """Slices larger than the window (several windows, Gaussian-blended) with neighbours as channels:
    each flip goes through the sliding window whole and comes back flipped, and only the allowed axes flip."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, (3, 5), padding=(1, 2))).eval()
    volume = torch.rand(1, 13, 11, 7)  # (1, H, W, S): 7 slices of 13 x 11, 2.5D context 1

    def restore(vol: torch.Tensor, **tta: Any) -> torch.Tensor:
        return restore_slices(net, vol, (8, 6), CPU, None, batch_size=3, context=1, **tta)

    plain = restore(volume)
    for axes in ([0, 1], [1]):
        expected = torch.stack([restore(volume.flip([1 + a for a in flip])).flip([2 + a for a in flip])
                                for flip in _flips(axes)]).mean(0)
        torch.testing.assert_close(restore(volume, tta=True, axes=axes), expected, rtol=1e-5, atol=1e-6)
    assert (restore(volume, tta=True) - plain).abs().max() > 1e-3  # the flips matter to this network
    torch.testing.assert_close(restore(volume, tta=True), restore(volume, tta=True, axes=[0, 1]))  # None: both


@pytest.mark.parametrize("allowed", [[0, 1], [1]])
def test_sr_predict_with_tta_averages_the_contracts_flips_on_the_thin_grid(tmp_path: Path, allowed: list[int]) -> None:
    """``--measured --tta`` on a thick SLA-stored oblique scan: the mean of one prediction per allowed flip
    (each written out as a mirrored network), in the input's units on the thin grid of the file's own order."""
    net, contract, _ = _seeded_sr_network_and_contract(tmp_path)
    contract = {**contract, "tta_axes": allowed}
    scan, thick_affine = _thick_scan(tmp_path / "thick")
    with_tta = _predict(net, contract, scan, tta=True)
    terms = [_predict(Mirrored(net, flip), contract, scan, tta=False).reconstruction for flip in _flips(allowed)]
    np.testing.assert_allclose(with_tta.reconstruction, np.mean(terms, axis=0), rtol=1e-5, atol=1e-3)
    assert np.abs(with_tta.reconstruction - terms[0]).max() > 0.1  # not the plain prediction
    assert with_tta.reconstruction.shape == (15, 5, 9)  # 5 thick slices -> 15 thin ones, S first as stored
    np.testing.assert_allclose(with_tta.affine, thin_affine(thick_affine, 0, 3), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(with_tta.affine[:3, :3], axis=0), [1.1, 1.3, 0.8], atol=1e-6)


def test_sr_predict_with_tta_in_the_retrospective_mode_averages_the_same_flips(tmp_path: Path) -> None:
    """Without ``--measured`` (a thin scan; its thick slices simulated): the same mean over flips."""
    net, contract, _ = _seeded_sr_network_and_contract(tmp_path, context=0)
    thin = np.random.default_rng(4).random(THIN_SHAPE).astype(np.float32)
    affine = oblique_affine((1.3, 0.8, 1.1), (5.0, -2.0, 7.0))
    (tmp_path / "thin").mkdir()
    nib.save(nib.Nifti1Image(thin, affine), tmp_path / "thin" / "scan.nii.gz")
    scan = tmp_path / "thin" / "scan.nii.gz"
    with_tta = _predict(net, contract, scan, tta=True, measured=False)
    terms = [_predict(Mirrored(net, flip), contract, scan, tta=False, measured=False).reconstruction
             for flip in _flips([0, 1])]
    np.testing.assert_allclose(with_tta.reconstruction, np.mean(terms, axis=0), rtol=1e-5, atol=1e-5)
    assert with_tta.reconstruction.shape == THIN_SHAPE and np.allclose(with_tta.affine, affine)


def test_medseg_predict_tta_reaches_an_sr_model_folder(tmp_path: Path) -> None:
    """The CLI's ``--tta`` passes the task's option check and is the API's TTA prediction, on the thin grid."""
    from medseg.engine.model_format import write_model_folder

    net, contract, spec = _seeded_sr_network_and_contract(tmp_path)
    write_model_folder(tmp_path / "model", net, spec, contract)
    scan, thick_affine = _thick_scan(tmp_path / "thick")
    assert main(["predict", "--model", str(tmp_path / "model"), "--measured", "--tta", "-i", str(tmp_path / "thick"),
                 "-o", str(tmp_path / "thin"), "--device", "cpu"]) == 0
    written = cast(nib.Nifti1Image, nib.load(tmp_path / "thin" / "scan_reconstruction.nii.gz"))
    np.testing.assert_allclose(written.affine, thin_affine(thick_affine, 0, 3), atol=1e-4)
    np.testing.assert_allclose(np.asarray(written.dataobj), _predict(net, contract, scan, tta=True).reconstruction,
                               rtol=1e-5, atol=1e-3)


def test_tta_is_refused_where_a_mirrored_input_was_never_learned(tmp_path: Path) -> None:
    net, contract, _ = _seeded_sr_network_and_contract(tmp_path)
    scan, _ = _thick_scan(tmp_path / "thick")
    with pytest.raises(PredictOptionError, match="--tta: model test-model was trained without flip augmentation"):
        _predict(net, {**contract, "tta_axes": []}, scan, tta=True)
    denoising = {**contract, "recon": {**contract["recon"], "problem": "denoise"}}
    with pytest.raises(PredictOptionError, match="recon.problem denoise; among reconstruction models only super-res"):
        _predict(net, denoising, scan, tta=True)
    assert _predict(net, {**contract, "tta_axes": []}, scan, tta=False).reconstruction.shape == (15, 5, 9)
