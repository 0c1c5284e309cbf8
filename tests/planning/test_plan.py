"""``medseg plan`` end to end: from a dataset folder to a commented config that runs, through
the API and the CLI, with the fingerprint logged beside the run in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import medseg
from medseg.cli import main
from tests.conftest import write_medmnist_npz, write_msd_dataset


@pytest.fixture
def ct_msd(tmp_path: Path) -> Path:
    """The synthetic MSD folder, its channel declared CT (nnU-Net's CT rule applies)."""
    root = write_msd_dataset(tmp_path / "ct", n_cases=6)
    info = json.loads((root / "dataset.json").read_text())
    info["modality"] = {"0": "CT"}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_plan_from_a_folder_builds_the_manifest_and_uses_dataset_json(ct_msd: Path, tmp_path: Path) -> None:
    planned = medseg.plan(ct_msd, budget="5m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    cfg = planned.config
    assert (tmp_path / "m.csv").is_file() and cfg["data"]["manifest"] == str(tmp_path / "m.csv")
    assert cfg["task"] == "segmentation" and cfg["data"]["labels"] == {0: "background", 1: "blob1", 2: "blob2"}
    assert cfg["data"]["channels"] == ["CT"]
    assert cfg["preprocess"]["intensity"]["mode"] == "clip_zscore"  # nnU-Net's CT rule, statistics filled in
    fp = planned.fingerprint
    assert cfg["preprocess"]["intensity"]["clip"] == [round(fp.channels[0].percentile_00_5, 2),
                                                      round(fp.channels[0].percentile_99_5, 2)]
    assert cfg["train"]["max_minutes"] == 5.0
    medseg.validate_config(cfg)  # an ordinary config
    assert {"preprocess.spacing", "patch.size", "model.strides", "train.precision"} <= set(planned.why)


def test_plan_writes_a_commented_config_that_loads_and_explains_itself(ct_msd: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "configs" / "planned.yaml"
    code = main(["plan", str(ct_msd), "--budget", "90s", "--manifest", str(tmp_path / "m.csv"), "--out", str(out),
                 "--no-probe", "--explain", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "nnU-Net default" in printed and "target spacing" in printed and "pooling per axis" in printed
    assert "predict memory (scores)" in printed and "slab by slab" in printed and "whole volume" in printed
    text = out.read_text()
    assert "# median spacing" in text or "median spacing of the training cases" in text
    assert "  # --budget" in text  # train.max_minutes says where it came from
    cfg = medseg.load_config(out)
    assert cfg.train.max_minutes == pytest.approx(1.5)
    assert cfg.data.fingerprint is not None and Path(cfg.data.fingerprint).is_file()
    raw = yaml.safe_load(text)
    assert raw["model"]["strides"] and raw["patch"]["size"]
    # nnU-Net mirrors every axis in every configuration, even in a 90-second plan
    assert {"name": "flip", "prob": 0.5} in raw["augment"]
    assert [a for a in cfg.augment if a.name == "flip"][0].axes is None


def test_the_probe_times_candidates_and_its_figures_go_in_the_plan(ct_msd: Path, tmp_path: Path) -> None:
    planned = medseg.plan(ct_msd, budget="1m", manifest=tmp_path / "m.csv", progress=False)
    timed = [p for p in planned.probe if p["seconds_per_step"] is not None]
    assert {p["precision"] for p in timed} >= {"fp32"} and len(timed) >= 3
    assert all(p["seconds_per_step"] > 0 for p in timed)
    step = planned.why["train.precision"]
    assert "probe:" in step and "s/step" in step
    assert "Probe (one training step" in planned.to_yaml()
    assert planned.config["train"]["precision"] in {"fp32", "bf16"}
    if planned.config["train"]["precision"] == "bf16":  # taken only after the loss-curve check said so
        assert any("loss curve" in p["name"] and "same curve" in p["note"] for p in planned.probe)


def test_run_with_plan_plans_trains_and_logs_the_fingerprint(ct_msd: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    # no mirroring TTA when scoring (tests/tasks/segmentation/test_evaluation_tta.py covers it): most of
    # this test's time went to 8 flips of every validation case, which nothing here looks at
    code = main(["run", "--plan", str(ct_msd), "--budget", "0.15m", "--home", str(home), "--no-progress",
                 "--set", "train.max_epochs=1", "--set", "validation.tta=false",
                 "--set", "tracking.system_metrics=false"])
    assert code == 0
    assert list(work.iterdir()) == []  # --home: nothing where the command was started
    written = list((home / "configs" / "planned").glob("*.yaml"))
    assert len(written) == 1 and list((home / "data_manifests").glob("*.csv"))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/runs/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert "fingerprint" in contexts and contexts["fingerprint"].name == "ct/fingerprint"
    assert contexts["fingerprint"].digest == contexts["train"].digest  # pinned to the manifest
    assert "ct.fingerprint.json" in {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "plan")}


def test_classification_plan_from_an_imported_medmnist_folder(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "tinymnist.npz", counts=(40, 8, 8))
    medseg.import_medmnist(npz, tmp_path / "m.csv", tmp_path / "imgs", {0: "no", 1: "yes"}, progress=False)
    planned = medseg.plan(tmp_path / "imgs", manifest=tmp_path / "m.csv", budget="1m", probe=False, progress=False)
    cfg = planned.config
    assert cfg["task"] == "classification" and cfg["data"]["labels"] == {0: "no", 1: "yes"}
    # the images as loaded (columns first, as every reader gives a 2D image): the 21 x 17 arrays are 17 x 21
    assert cfg["preprocess"]["resize"] == [17, 21] and cfg["model"]["spatial_dims"] == 2
    assert cfg["preprocess"]["intensity"]["mode"] == "ct_window"  # one dataset-wide map of the range to [0, 1]
    assert cfg["loss"]["class_weights"] is None  # balanced classes
    medseg.validate_config(cfg)


def test_bad_budget_and_tasks_without_planner_say_what_to_do(ct_msd: Path, tmp_path: Path) -> None:
    from medseg.errors import UsageError

    with pytest.raises(UsageError, match=r"--budget 'soon': expected a duration such as 30m"):
        medseg.plan(ct_msd, budget="soon", manifest=tmp_path / "m.csv", probe=False, progress=False)
    with pytest.raises(UsageError, match=r"--budget '0m': must be more than zero"):
        medseg.plan(ct_msd, budget="0m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    medseg.build_manifest(ct_msd, tmp_path / "x.csv")
    (tmp_path / "x.meta.json").unlink()  # a manifest written by hand: nothing says where its files are
    with pytest.raises(UsageError, match=r"is a manifest: give --root"):
        medseg.plan(tmp_path / "x.csv", budget="1m", probe=False, progress=False)


def test_a_built_manifest_plans_without_root(ct_msd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    medseg.build_manifest(ct_msd, tmp_path / "x.csv")
    monkeypatch.chdir(tmp_path)
    planned = medseg.plan(tmp_path / "x.csv", budget="1m", probe=False, progress=False)
    assert planned.config["data"]["labels"][0] == "background"
    assert Path(planned.config["data"]["root"]).resolve() == ct_msd.resolve()


def test_thick_slice_ct_in_dicom_and_nrrd_plans_in_plane_first_with_a_rare_class_sampler(tmp_path: Path) -> None:
    """The issue's CT-like case: 0.7 x 0.7 x 5 mm, half DICOM series + DICOM SEG, half NRRD, a rare
    lesion absent from some cases; planned from the folder alone (dataset.json says CT)."""
    pytest.importorskip("highdicom")
    from medseg.data.synthetic import write_synthetic_ct

    root = tmp_path / "sct"
    write_synthetic_ct(root, n_cases=6, seed=3, shape=(64, 56, 12))
    planned = medseg.plan(root, budget="10m", manifest=tmp_path / "sct.csv", probe=False, progress=False)
    cfg = planned.config
    assert planned.fingerprint.median_spacing() == pytest.approx([0.7, 0.7, 5.0])
    assert {c.orientation for c in planned.fingerprint.cases} == {"LPS"}  # as stored: DICOM and NRRD alike
    assert cfg["data"]["labels"] == {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
    first = cfg["model"]["strides"][0]
    assert first == [2, 2, 1]  # in-plane first: the 5 mm axis is not pooled at the first step
    assert cfg["preprocess"]["intensity"]["mode"] == "clip_zscore"
    assert cfg["patch"]["sampler"] == "per_class" and "lesion" in planned.why["patch.sampler"]
    assert planned.why["preprocess.spacing"].startswith("median spacing, axis 2 anisotropic")
    medseg.validate_config(cfg)


def test_a_class_per_folder_png_tree_plans_as_classification(tmp_path: Path) -> None:
    from medseg.data.imagefolder import write_imagefolder_from_medmnist

    npz = write_medmnist_npz(tmp_path / "tinymnist.npz", counts=(30, 8, 8))
    write_imagefolder_from_medmnist(npz, tmp_path / "png", labels={0: "normal", 1: "nodule"})
    planned = medseg.plan(tmp_path / "png", budget="1m", manifest=tmp_path / "png.csv", probe=False, progress=False)
    cfg = planned.config
    assert cfg["task"] == "classification" and cfg["data"]["labels"] == {0: "nodule", 1: "normal"}  # sorted folders
    assert cfg["model"]["spatial_dims"] == 2 and cfg["preprocess"]["resize"] == [17, 21]
    from medseg.data.manifest import read_manifest

    splits = {c.split for c in read_manifest(tmp_path / "png.csv").cases}
    assert splits == {"train", "val", "test"}  # the tree's own split folders are kept
    again = medseg.plan(tmp_path / "png", budget="1m", manifest=tmp_path / "png.csv", probe=False, progress=False)
    assert again.config["task"] == "classification"  # the manifest exists now: the layout still says what it is
    assert again.config["data"]["labels"] == cfg["data"]["labels"]


def test_2d_png_segmentation_plans_a_2d_network(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "seg2d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        label = np.zeros((45, 61), np.uint8)
        label[10 + i:25 + i, 20:40] = 1
        image = (rng.integers(0, 50, label.shape) + 150 * label).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(label).save(root / "labels" / f"c{i}.png")
    planned = medseg.plan(root, task="segmentation", budget="2m", manifest=tmp_path / "s.csv", probe=False,
                          progress=False)
    cfg = planned.config
    assert cfg["model"]["spatial_dims"] == 2 and len(cfg["patch"]["size"]) == 2
    assert cfg["preprocess"]["orientation"] is None
    assert planned.fingerprint.spatial_dims == 2 and planned.fingerprint.cases[0].shape == [61, 45]
    medseg.validate_config(cfg)


def test_manifest_build_says_which_layout_it_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.data.imagefolder import write_imagefolder_from_medmnist

    npz = write_medmnist_npz(tmp_path / "tinymnist.npz", counts=(12, 4, 4))
    write_imagefolder_from_medmnist(npz, tmp_path / "png", labels={0: "normal", 1: "nodule"})
    assert main(["manifest", "build", "--from", str(tmp_path / "png"), "--out", str(tmp_path / "m.csv")]) == 0
    printed = capsys.readouterr().out
    assert "ImageFolder" in printed or "imagefolder" in printed
    assert "nodule" in printed and "normal" in printed
