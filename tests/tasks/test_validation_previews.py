"""The pictures each task logs at every validation (``TrainTask.preview``): the same first validation
cases each time, as square-ish RGB arrays that survive MLflow's 256-pixel thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset

import medseg
from medseg.data.build import build_manifest
from medseg.data.datasets import records
from medseg.data.manifest import read_manifest
from medseg.data.medmnist import import_medmnist
from medseg.engine.loop import split_cases
from tests.conftest import (
    classification_config,
    tiny_config,
    write_config,
    write_medmnist_npz,
    write_msd_dataset,
)

CPU = torch.device("cpu")


def _check_pictures(pictures: dict[str, np.ndarray], keys: list[str]) -> None:
    assert sorted(pictures) == sorted(keys)
    for key, picture in pictures.items():
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3, key
        height, width = picture.shape[:2]
        # three panels in a row (1:3) would be a sliver as a 256-pixel thumbnail
        assert 0.5 < height / width < 2, f"{key}: {width} x {height}"


def test_segmentation_overlays_the_first_validation_cases_with_their_dice(tmp_path: Path, tiny_run_inputs) -> None:
    from medseg.data.transforms import validation_transforms
    from medseg.tasks.segmentation import training

    dataset_root, manifest = tiny_run_inputs
    cfg = medseg.load_config(tiny_config(tmp_path, dataset_root, manifest, "sqlite:///unused.db",
                                         validation={"overlays": 1}))
    cases = split_cases(cfg, read_manifest(manifest), "val")
    dataset = Dataset(records(cases, dataset_root), validation_transforms(cfg.preprocess))
    from medseg.tasks.segmentation.metrics import SegmentationMetrics

    shown: list = []
    preview = training._overlay_preview(cfg, shown)
    network = training.build_network(cfg)
    metrics = SegmentationMetrics(cfg.data.labels, hd95=False)
    scores = training.validate(network, dataset, cfg, metrics, CPU, None, keep=(1, shown))
    # the picture shows what validation predicted, not a second prediction
    assert [c.case_id for c in shown] == [cases[0].case_id] and len(metrics.per_case) == len(cases)
    assert np.array_equal(shown[0].pred, training.predict_segmentation(network, dataset[0]["image"], cfg, CPU,
                                                                        None).numpy())
    assert shown[0].dice == {k.removeprefix("dice/"): v for k, v in metrics.per_case[0].items()
                             if k.startswith("dice/")}
    first = preview(network, dataset, CPU, None)
    _check_pictures(first, [f"val/overlay/{cases[0].case_id}"])
    training.validate(network, dataset, cfg, metrics, CPU, None, keep=(1, shown))
    again = preview(network, dataset, CPU, None)
    assert all(np.array_equal(again[k], first[k]) for k in first)  # same case, same slice, same picture
    assert "val/dice_mean" in scores


def test_a_failing_preview_warns_and_training_goes_on(tmp_path: Path, tiny_run_inputs, monkeypatch, caplog) -> None:
    from medseg.tasks.segmentation import training
    from tests.conftest import train_run

    def broken(cfg, shown):  # noqa: ANN001, ANN202 - stands in for _overlay_preview
        def preview(*_args):  # noqa: ANN002, ANN202
            raise RuntimeError("the plotting backend fell over")
        return preview

    monkeypatch.setattr(training, "_overlay_preview", broken)
    dataset_root, manifest = tiny_run_inputs
    config = tiny_config(tmp_path, dataset_root, manifest, f"sqlite:///{tmp_path / 'mlflow.db'}",
                         train={"max_epochs": 1, "batch_size": 2, "num_threads": 1},
                         validation={"overlays": 1, "hd95": False})
    with caplog.at_level("WARNING"):
        result = train_run(config)
    assert result.model_uri and "best_val/dice_mean" in result.metrics
    assert "validation pictures not logged (RuntimeError: the plotting backend fell over)" in caplog.text


def test_classification_shows_a_grid_of_validation_images_with_their_probabilities(tmp_path: Path) -> None:
    from medseg.tasks.classification import training
    from medseg.tasks.classification.transforms import classification_transforms

    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(8, 6, 4))
    import_medmnist(npz, tmp_path / "manifest.csv", tmp_path / "images", labels={0: "normal", 1: "lesion"},
                    progress=False)
    cfg = medseg.load_config(classification_config(tmp_path, tmp_path / "manifest.csv", tmp_path / "images",
                                                   "sqlite:///unused.db"))
    cases = split_cases(cfg, read_manifest(tmp_path / "manifest.csv"), "val")
    dataset = Dataset(records(cases, tmp_path / "images", class_labels=True),
                      classification_transforms(cfg.preprocess, (), cfg.model.spatial_dims))
    pictures = training._prediction_preview(cfg, training.head_kind(cfg))(training.build_classifier(cfg), dataset,
                                                                           CPU, None)
    _check_pictures(pictures, ["val/predictions"])


def test_reconstruction_shows_input_output_and_target_of_one_slice(tmp_path: Path) -> None:
    from medseg.tasks.reconstruction import training

    dataset_root = write_msd_dataset(tmp_path / "dataset", n_cases=3)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset_root, manifest, val_fraction=0.67, seed=1)
    cfg = medseg.load_config(write_config(tmp_path, {
        "task": "reconstruction", "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(dataset_root), "channels": ["mri"]},
        "recon": {"problem": "mri", "image_size": [32, 24], "slices_per_volume": 2},
        "model": {"name": "unet_dc", "channels": [4, 8, 16], "num_res_units": 1},
        "validation": {"overlays": 2}}, {}))
    from medseg.tasks.reconstruction.transforms import reconstruction_eval_transforms

    items = records(split_cases(cfg, read_manifest(manifest), "val"), dataset_root, with_label=False)
    dataset = Dataset(items, reconstruction_eval_transforms(cfg.preprocess, cfg.recon))
    pictures = training._slice_preview(cfg)(training.build_network(cfg), dataset, CPU, None)
    _check_pictures(pictures, [f"val/reconstruction/{item['case_id']}" for item in items[:2]])
