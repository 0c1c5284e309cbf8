"""Small-component removal: the relabelling rule on tiny awkward volumes, the config's checks, the
search on validation predictions, and a tiny run whose chosen sizes reach postprocess.json, the
test split and the packaged contract (and, when the validation fold is trained on, no search)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import medseg
from medseg.data.build import build_manifest
from medseg.tasks.segmentation.config import SegmentationConfig
from medseg.tasks.segmentation.postprocess import (
    POSTPROCESS_FILE,
    mean_case_dice,
    read_chosen_sizes,
    remove_small_components,
    search_min_sizes,
)
from medseg.tasks.segmentation.predict import SegmentationPredictor
from medseg.tasks.segmentation.regions import Regions, decode_regions
from medseg.tasks.segmentation.training import _split_postprocess
from tests.conftest import tiny_config, train_run, write_msd_dataset

BRATS_LABELS = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
NECROSIS, EDEMA, ENHANCING = 1, 2, 3


def _tumour() -> np.ndarray:
    """An odd-shaped 3D map: a block of edema holding an enhancing speck (2 voxels), a large enhancing
    core, an isolated necrosis speck in the background, and a diagonal pair of enhancing voxels."""
    volume = np.zeros((11, 9, 7), dtype=np.uint8)
    volume[1:9, 1:8, 1:6] = EDEMA
    volume[4, 3, 2:4] = ENHANCING  # speck inside edema
    volume[5:8, 5:7, 2:5] = ENHANCING  # core: 3 * 2 * 3 = 18 voxels, touches edema only
    volume[10, 0, 0] = NECROSIS  # isolated speck in a corner
    volume[10, 8, 5] = ENHANCING  # two voxels touching only at an edge: two components of 1
    volume[9, 7, 5] = ENHANCING
    return volume


# ----------------------------------------------------------------------------------- removal


def test_a_speck_inside_edema_becomes_edema_and_an_isolated_speck_background() -> None:
    volume = _tumour()
    out = remove_small_components(volume, {ENHANCING: 3, NECROSIS: 2})
    assert out.dtype == volume.dtype and out.shape == volume.shape
    assert (out[4, 3, 2:4] == EDEMA).all()  # not a hole in the edema
    assert out[10, 0, 0] == 0
    assert out[10, 8, 5] == 0 and out[9, 7, 5] == 0  # face-connected: the edge-touching pair is two specks
    assert (out[5:8, 5:7, 2:5] == ENHANCING).all()  # 18 voxels >= 3: kept
    changed = out != volume
    assert changed.sum() == 2 + 1 + 2
    np.testing.assert_array_equal(volume, _tumour())  # the input is left alone


def test_a_component_of_exactly_the_size_is_kept_and_0_keeps_everything() -> None:
    volume = _tumour()
    np.testing.assert_array_equal(remove_small_components(volume, {ENHANCING: 2})[4, 3, 2:4], [ENHANCING] * 2)
    np.testing.assert_array_equal(remove_small_components(volume, {ENHANCING: 0, NECROSIS: 0}), volume)
    np.testing.assert_array_equal(remove_small_components(volume, {}), volume)
    assert (remove_small_components(volume, {ENHANCING: 19})[5:8, 5:7, 2:5] == EDEMA).all()  # the core is small now


def test_removal_in_2d_uses_the_shell_majority_and_ties_go_to_background() -> None:
    plane = np.zeros((5, 6), dtype=np.int64)
    plane[:, :3] = 2
    plane[2, 1] = 1  # inside label 2: all four neighbours are 2
    plane[2, 3] = 1  # on the border of 2 and background: shell 0, 0, 0 and 2 -> background
    plane[0, 5] = 1  # a corner: shell of two background voxels
    plane[4, 3] = 1  # one neighbour 2, two background -> background
    out = remove_small_components(plane, {1: 2})
    assert out[2, 1] == 2 and out[2, 3] == 0 and out[0, 5] == 0 and out[4, 3] == 0
    tie = np.array([[2, 1, 0]])  # shell: one 2, one 0 -> the lower value
    assert remove_small_components(tie, {1: 5}).tolist() == [[2, 0, 0]]
    full = np.ones((3, 4), dtype=np.uint8)  # no shell at all
    assert (remove_small_components(full, {1: 100}) == 0).all()


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"min_sizes\[3\] = -1: a component size is a voxel count >= 0"):
        remove_small_components(_tumour(), {3: -1})


# ----------------------------------------------------------------------------------- the search


def _noisy_cases(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predictions of a block of label 1 with false-positive specks of label 1 (which removal fixes),
    and a reference with a true small island of label 2 (which removal of label 2 would destroy)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(3):
        truth = np.zeros((13, 10, 7), dtype=np.uint8)
        truth[2:9, 2:8, 1:6] = 1
        truth[11, 1:3, 1] = 2
        pred = truth.copy()
        for _ in range(6):
            x, y, z = int(rng.integers(10, 13)), int(rng.integers(4, 10)), int(rng.integers(3, 7))
            pred[x, y, z] = 1 if pred[x, y, z] == 0 else pred[x, y, z]
        cases.append((pred, truth))
    return cases


def test_the_search_keeps_a_threshold_only_where_it_raises_the_mean_dice() -> None:
    cases = _noisy_cases()
    search = search_min_sizes(cases, [1, 2], [0, 4, 4, 100000])
    assert search.min_sizes == {1: 4}  # specks of 1 go; removing 2's true island would cost Dice
    assert set(search.per_label) == {1, 2} and set(search.per_label[1]) == {0, 4, 100000}
    assert search.per_label[1][4] > search.per_label[1][0] + 0.002
    assert search.per_label[2][4] < search.per_label[2][0]  # the island (2 voxels) would be removed
    assert search.after == pytest.approx(mean_case_dice(cases, [1, 2], {1: 4})) and search.after > search.before
    assert search.before == pytest.approx(mean_case_dice(cases, [1, 2], {}))
    # a gain that small is not taken
    assert search_min_sizes(cases, [1, 2], [4], min_gain=1.0).min_sizes == {}


def test_softmax_and_region_scores_of_removed_voxels_decode_to_their_new_label() -> None:
    consensus = torch.from_numpy(_tumour().astype(np.int64))
    expected = torch.from_numpy(remove_small_components(_tumour(), {ENHANCING: 3}).astype(np.int64))
    softmax = torch.softmax(torch.randn(4, *consensus.shape, generator=torch.Generator().manual_seed(0)), 0)
    fake = SimpleNamespace(min_sizes={ENHANCING: 3}, regions=None)
    out = SegmentationPredictor.remove_small_components(fake, softmax, consensus)  # type: ignore[arg-type]
    changed = expected != consensus
    torch.testing.assert_close(out.argmax(0)[changed], expected[changed])
    torch.testing.assert_close(out[:, ~changed], softmax[:, ~changed])
    regions = Regions(("whole", "core", "enhancing"), ((1, 2, 3), (1, 3), (3,)), (2, 1, 3))
    sigmoids = torch.rand(3, *consensus.shape, generator=torch.Generator().manual_seed(1))
    fake = SimpleNamespace(min_sizes={ENHANCING: 3}, regions=regions)
    out = SegmentationPredictor.remove_small_components(fake, sigmoids, consensus)  # type: ignore[arg-type]
    torch.testing.assert_close(decode_regions(out, regions).long()[changed], expected[changed])


# ----------------------------------------------------------------------------------- config


def _config(**postprocess: Any) -> SegmentationConfig:
    return SegmentationConfig.model_validate({
        "task": "segmentation", "data": {"manifest": "cases.csv", "labels": BRATS_LABELS},
        "patch": {"size": [16, 16, 8]}, "postprocess": postprocess})


@pytest.mark.parametrize(("postprocess", "message"), [
    ({"min_component_size": {"enhancng": 5}}, r"names 'enhancng', which is not a label of data.labels; "
                                              r"did you mean 'enhancing'\? use label names"),
    ({"min_component_size": {"3": 5}}, r"names '3', which is not a label.*use label names \(not values\)"),
    ({"min_component_size": {"background": 5}}, r"names 'background', the background \(label 0\).*remove that entry"),
    ({"min_component_size": {"edema": -2}}, r"\{'edema': -2\}: a size is a voxel count >= 0"),
    ({"search_min_component_size": []}, r"has no size > 0 to try.*e.g. \[10, 50, 200\]"),
    ({"search_min_component_size": [0]}, r"has no size > 0 to try"),
    ({"search_min_component_size": [10, -5]}, r"negative sizes \[-5\]"),
    ({"min_component_size_search": [10]}, r"Extra inputs are not permitted"),
])
def test_postprocess_config_errors_name_the_value_and_the_fix(postprocess: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(**postprocess)


def test_the_candidates_are_sorted_without_repeats() -> None:
    cfg = _config(min_component_size={"edema": 0, "enhancing": 12}, search_min_component_size=[50, 10, 50, 0])
    assert cfg.postprocess.search_min_component_size == [0, 10, 50]
    assert cfg.postprocess.min_component_size == {"edema": 0, "enhancing": 12}


def test_later_splits_use_the_sizes_the_validation_split_chose(tmp_path: Path, caplog) -> None:
    cfg = _config(min_component_size={"enhancing": 12}, search_min_component_size=[10, 50])
    (tmp_path / POSTPROCESS_FILE).write_text(json.dumps({"min_component_size": {"edema": 50}}))
    assert _split_postprocess(cfg, tmp_path, "test").min_sizes == {EDEMA: 50}
    val = _split_postprocess(cfg, tmp_path, "val")  # searches afresh: scored with no removal
    assert val.search == [10, 50] and val.min_sizes == {} and not (tmp_path / POSTPROCESS_FILE).exists()
    assert _split_postprocess(cfg, tmp_path, "test").min_sizes == {ENHANCING: 12}  # nothing chosen: the config's
    seen = cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": 0, "train_folds": "all"})})
    with caplog.at_level(logging.INFO, logger="medseg.tasks.segmentation.training"):
        skipped = _split_postprocess(seen, tmp_path, "val")
    assert skipped.search is None and skipped.min_sizes == {ENHANCING: 12}
    assert "not searched; the validation fold 0 is trained on too" in caplog.text
    (tmp_path / POSTPROCESS_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"postprocess.json: expected the JSON the validation search writes"):
        read_chosen_sizes(tmp_path)


# ----------------------------------------------------------------------------------- tiny runs


def test_a_run_chooses_sizes_on_validation_and_the_model_carries_them(tmp_path: Path) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=7)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.3, test_fraction=0.15, seed=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1},
                         validation={"overlays": 0, "hd95": False},
                         postprocess={"search_min_component_size": [1, 5, 40, 100000]})
    result = train_run(config)
    record = json.loads((result.run_dir / POSTPROCESS_FILE).read_text())
    assert set(record) == {"min_component_size", "searched", "val_dice_mean_before", "val_dice_mean_after",
                           "per_label"}
    assert record["searched"] == [1, 5, 40, 100000]
    assert set(record["per_label"]) == {"blob1", "blob2"}
    assert all(set(scores) == {"0", "1", "5", "40", "100000"} for scores in record["per_label"].values())
    assert set(record["min_component_size"]) <= {"blob1", "blob2"}
    # the search's "before" is the evaluation's own per-case mean: the same predictions, no removal
    assert record["val_dice_mean_before"] == pytest.approx(result.metrics["best_val/dice_mean_per_case"], abs=1e-5)
    assert record["val_dice_mean_after"] >= record["val_dice_mean_before"]
    assert result.metrics["val/postprocess/dice_mean_before"] == pytest.approx(record["val_dice_mean_before"], abs=1e-5)
    assert "val/postprocess/dice_mean_after" in result.metrics and "test/dice_mean" in result.metrics

    assert result.model_uri
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri)
    assert predictor.contract["postprocess"]["min_component_size"] == record["min_component_size"]
    assert predictor.contract["postprocess"]["search_min_component_size"] == [1, 5, 40, 100000]
    prediction = predictor.predict(dataset / "imagesTr" / "case_000.nii.gz")
    assert prediction.label_map is not None and prediction.probabilities is not None
    np.testing.assert_array_equal(prediction.label_map, prediction.probabilities.argmax(0))


def test_a_validation_fold_trained_on_is_not_searched_and_the_config_sizes_reach_predict(tmp_path: Path) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=6)
    manifest = tmp_path / "folds.csv"
    build_manifest(dataset, manifest, folds=2, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, data={"fold": 0, "train_folds": "all"},
                         train={"max_epochs": 1}, validation={"overlays": 0, "hd95": False},
                         postprocess={"min_component_size": {"blob1": 30}, "search_min_component_size": [5, 50]})
    result = train_run(config)
    assert not (result.run_dir / POSTPROCESS_FILE).exists()
    assert not any(k.startswith("val/postprocess/") for k in result.metrics)

    assert result.model_uri
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri)
    assert predictor.contract["postprocess"]["min_component_size"] == {"blob1": 30}
    prediction = predictor.predict(dataset / "imagesTr" / "case_000.nii.gz")
    mask, probabilities = prediction.label_map, prediction.probabilities
    assert mask is not None and probabilities is not None
    np.testing.assert_array_equal(mask, probabilities.argmax(0))  # the mask and the saved scores agree
