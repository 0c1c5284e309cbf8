"""Image-to-image translation on the reconstruction engine (recon.problem: translation): a known
contrast map that histogram matching undoes exactly, the trusted mask's threshold by hand, a bad
target named with Expected/Got and the file, and a tiny run whose predictions come back on the
input's own oblique, anisotropic grid with their uncertainty and trusted mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.errors import CaseError, ConfigError
from medseg.io.discovery import InputCase
from medseg.tasks.reconstruction.translation import (
    histogram_matched,
    target_quantiles,
    trust_threshold,
    trusted_scores,
    volume_scores,
)
from medseg.tasks.reconstruction.translation_data import (
    TARGET_SCALE,
    monotone_contrast,
    write_monotone_phantoms,
)
from medseg.tasks.registry import load_config
from tests.conftest import oblique_affine, train_run, write_config

SHAPE = (23, 19, 7)  # odd in-plane sizes, fewer slices than the SSIM window
SPACING = (0.9, 1.3, 2.7)


def _volume(seed: int) -> np.ndarray:
    """A smooth awkward volume: blobs of different brightness on a dim background, a few hundred units."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    volume = 20.0 + np.zeros(SHAPE)
    for _ in range(4):
        centre, width = rng.uniform(-0.6, 0.6, 3)[:, None, None, None], rng.uniform(0.2, 0.5)
        volume += rng.uniform(50, 400) * np.exp(-((grid - centre) ** 2).sum(0) / (2 * width ** 2))
    return volume.astype(np.float32)


def test_the_phantom_map_commutes_with_min_max_scaling_and_histogram_matching_undoes_it() -> None:
    source = _volume(0)
    scaled = (source - source.min()) / (source.max() - source.min())
    target = monotone_contrast(scaled) * TARGET_SCALE
    target_scaled = (target - target.min()) / (target.max() - target.min())
    np.testing.assert_allclose(target_scaled, monotone_contrast(scaled), atol=1e-9)  # a perfect translator exists
    assert np.all(np.diff(monotone_contrast(np.linspace(0, 1, 101))) > 0)
    matched = histogram_matched(scaled, target_quantiles([target_scaled]))
    # the exact map, up to the 1001 stored quantiles (coarsest where few voxels are bright)
    assert np.abs(matched - target_scaled).mean() < 1e-3 and np.abs(matched - target_scaled).max() < 0.02
    assert volume_scores(torch.from_numpy(matched).permute(2, 0, 1)[:, None],
                         torch.from_numpy(target_scaled).permute(2, 0, 1)[:, None])["ssim"] > 0.999
    # the identity is far from it: the map is not a near-identity that any baseline gets right
    assert np.abs(scaled - target_scaled).max() > 0.05


def test_scores_are_monai_metrics_with_data_range_one() -> None:
    target = torch.rand(5, 1, 17, 13, generator=torch.Generator().manual_seed(0)).double()
    perfect, off = volume_scores(target, target), volume_scores(target + 0.1, target)
    assert perfect["mae"] == 0 and perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == float("inf")
    assert off["mae"] == pytest.approx(0.1) and off["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)


def test_the_trusted_threshold_keeps_the_error_budget_or_the_coverage() -> None:
    spread = np.array([0.4, 0.1, 0.3, 0.2])
    error = np.array([1.0, 0.0, 0.3, 0.0])
    # sorted by spread: errors 0, 0, 0.3, 1 -> running means 0, 0, 0.1, 0.325
    assert trust_threshold(spread, error, 0.1, 0.9) == pytest.approx(0.3)
    assert trust_threshold(spread, error, 0.5, 0.9) == pytest.approx(0.4)
    assert trust_threshold(spread, np.ones(4), 0.1, 0.9) == 0.0  # nothing is good enough
    assert trust_threshold(spread, error, None, 0.5) == pytest.approx(0.25)  # no budget: the median spread
    scores = trusted_scores(spread, error, 0.3)
    assert scores == {"trusted_fraction": 0.75, "trusted_mae": pytest.approx(0.1), "untrusted_mae": 1.0}


def _config(tmp_path: Path, manifest: Path, root: Path, translation: dict) -> dict:
    return {
        "task": "reconstruction", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(root), "channels": ["source", "target"]},
        "preprocess": {"orientation": "RAS"},
        "recon": {"problem": "translation", "image_size": [24, 24], "slice_axis": 2, "slices_per_volume": 2,
                  "translation": translation},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]}],
        "model": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        "train": {"max_epochs": 1, "batch_size": 2, "iterations_per_epoch": 2, "num_threads": 1},
        "validation": {"overlays": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}}


def _phantoms(tmp_path: Path, splits: list[str]) -> tuple[Path, Path, np.ndarray]:
    affine = oblique_affine(SPACING, (-12.0, 30.5, 7.0), angle_deg=23.0)
    root = tmp_path / "data"
    manifest = write_monotone_phantoms([(f"case{i}", _volume(i), affine, s) for i, s in enumerate(splits)], root,
                                       tmp_path / "manifest.csv")
    return manifest, root, affine


def test_a_target_that_is_not_a_channel_is_refused_with_expected_got_and_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config(tmp_path, tmp_path / "m.csv", tmp_path, {"target": "T1c"}), {})
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml.*target 'T1c'.*Expected: one of data\.channels "
                                          r"\['source', 'target'\]\. Got: 'T1c'"):
        load_config(path)
    missing = write_config(tmp_path, _config(tmp_path, tmp_path / "m.csv", tmp_path, {}), {})
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml.*translation.target"):
        load_config(missing)
    no_section = _config(tmp_path, tmp_path / "m.csv", tmp_path, {})
    del no_section["recon"]["translation"]
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml.*needs recon\.translation.*Expected"):
        load_config(write_config(tmp_path, no_section, {}))
    with pytest.raises(ConfigError, match=r"(?s)inputs \['target'\].*not the target"):
        load_config(write_config(tmp_path, _config(tmp_path, tmp_path / "m.csv", tmp_path,
                                                   {"target": "target", "inputs": ["target"]}), {}))


@pytest.mark.parametrize("codes", ["RAS", "PIL"])
def test_predictions_come_back_on_the_inputs_own_oblique_grid_with_uncertainty_and_trust(tmp_path: Path,
                                                                                        codes: str) -> None:
    """An untrained network is enough for geometry: every output has the input's shape and affine,
    whatever its voxel order (the model works in RAS, slice axis last); units and masks are right."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    from medseg.engine.model_loading import LoadedModel
    from medseg.engine.results import PredictOptions
    from medseg.tasks.reconstruction.translation_predict import TranslationPredictor
    from medseg.tasks.reconstruction.translation_training import (
        build_translation_network,
        translation_contract,
    )

    manifest, root, affine = _phantoms(tmp_path, ["test"])
    cfg = load_config(write_config(tmp_path, _config(tmp_path, manifest, root, {"target": "target"}), {}))
    torch.manual_seed(0)
    net = build_translation_network(cfg).eval()
    contract = {**translation_contract(cfg), "reference_quantiles": [0.0, 0.5, 1.0], "trust_threshold": 0.01}
    paths = []
    for index, source in enumerate(sorted(root.glob("images/case0_*.nii.gz"))):
        image = nib.load(source)
        stored = image.as_reoriented(ornt_transform(axcodes2ornt(nib.aff2axcodes(image.affine)), axcodes2ornt(codes)))
        paths.append(tmp_path / f"scan_{index:04d}.nii.gz")
        nib.save(stored, paths[-1])
    stored_shape, stored_affine = nib.load(paths[0]).shape, nib.load(paths[0]).affine
    predictor = TranslationPredictor(LoadedModel((net,), contract, ("test",), (None,)), PredictOptions(),
                                     torch.device("cpu"))
    prediction = predictor.predict(paths, "scan")
    np.testing.assert_allclose(prediction.affine, stored_affine, atol=1e-5)
    for name in ("reconstruction", "baseline", "variance", "label_map"):
        assert getattr(prediction, name).shape == stored_shape, name
    target = np.asarray(nib.load(paths[1]).dataobj)
    baseline = prediction.baseline
    assert baseline.min() >= target.min() - 1e-3 and baseline.max() <= target.max() + 1e-3  # the target's units
    assert set(np.unique(prediction.label_map)) <= {0, 1}
    assert np.isfinite([prediction.metrics[k] for k in ("psnr", "ssim", "mae", "histmatch_psnr")]).all()
    result = predictor.predict_case(InputCase("scan", paths[0], "file", channels=tuple(paths)), tmp_path / "out")
    for column in ("output", "histmatch_output", "uncertainty", "trusted"):
        written = nib.load(result.outputs[column])
        assert written.shape == stored_shape, column
        np.testing.assert_allclose(written.affine, affine if codes == "RAS" else stored_affine, atol=1e-4)

    measured = TranslationPredictor(LoadedModel((net,), contract, ("test",), (None,)), PredictOptions(measured=True),
                                    torch.device("cpu"))
    with pytest.raises(CaseError, match=r"Expected 1 contrast\(s\) \['source'\].*Got shape \(2,.*File: "):
        measured.predict(paths, "both")
    assert measured.predict(paths[:1], "source").reconstruction.shape == stored_shape


@pytest.mark.slow
def test_a_tiny_run_scores_beside_histogram_matching_and_predicts_on_the_inputs_own_grid(tmp_path: Path) -> None:
    manifest, root, affine = _phantoms(tmp_path, ["train", "train", "train", "val", "test"])
    config = write_config(tmp_path, _config(tmp_path, manifest, root, {"target": "target"}), {})
    result = train_run(config)
    for key in ("test/psnr", "test/ssim", "test/mae", "test/histmatch_psnr", "test/histmatch_mae", "test/ssim_gain",
                "test/uncertainty_mean", "test/trusted_fraction", "best_val/trust_threshold"):
        assert np.isfinite(result.metrics[key]), key
    assert 0 <= result.metrics["test/trusted_fraction"] <= 1

    (tmp_path / "in").mkdir()
    case = sorted(root.glob("images/case4_*.nii.gz"))
    for index, path in enumerate(case):  # the test case in a predict folder: case_0000 (source), case_0001 (target)
        (tmp_path / "in" / f"scan_{index:04d}.nii.gz").write_bytes(path.read_bytes())
    predictor = medseg.Predictor.from_uri(result.model_uri, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", progress=False)
    assert batch.n_failed == 0
    reference = nib.load(case[1])
    for suffix in ("translation", "histmatch", "uncertainty", "trusted"):
        written = nib.load(tmp_path / "out" / f"scan_{suffix}.nii.gz")
        assert written.shape == SHAPE, suffix
        np.testing.assert_allclose(written.affine, affine, atol=1e-4)  # the input's own oblique grid
    synthesised = np.asarray(nib.load(tmp_path / "out" / "scan_translation.nii.gz").dataobj)
    assert np.isfinite(synthesised).all() and abs(float(np.median(synthesised))) < 10 * TARGET_SCALE
    trusted = np.asarray(nib.load(tmp_path / "out" / "scan_trusted.nii.gz").dataobj)
    assert set(np.unique(trusted)) <= {0, 1}
    assert np.asarray(reference.dataobj).shape == SHAPE
