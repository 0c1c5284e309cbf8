"""Repeated runs (--seeds, --folds) as MLflow parent and child runs, and ensembles of their models."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import EXIT_FAILED, EXIT_USAGE, main
from medseg.data.build import build_manifest
from medseg.engine.runner import aggregate
from medseg.errors import UsageError
from tests.conftest import tiny_config, train_run, write_msd_dataset


def _parent_and_children(uri: str) -> tuple:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    (parent,) = [r for r in runs if "medseg.repeat" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_seeds_make_one_parent_with_a_child_per_seed_and_mean_and_std(tmp_path: Path, tiny_run_inputs) -> None:
    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, seed=3, train={"max_epochs": 1, "num_threads": 1})
    result = train_run(config, seeds=2)

    client, parent, children = _parent_and_children(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["medseg.repeat"] == "seeds"
    assert sorted(c.data.params["seed"] for c in children) == ["3", "4"]
    assert all(c.info.status == "FINISHED" for c in children)
    for key in ("val/dice_mean", "train/loss", "best_val/dice_mean"):
        values = [c.data.metrics[key] for c in children]
        assert parent.data.metrics[key] == pytest.approx(statistics.mean(values))
        assert parent.data.metrics[f"{key}_std"] == pytest.approx(statistics.stdev(values))
        assert result.metrics[key] == pytest.approx(parent.data.metrics[key])
        assert result.metrics[f"{key}_std"] == pytest.approx(parent.data.metrics[f"{key}_std"])
    assert result.run_id == parent.info.run_id
    assert [c["name"] for c in result.children] == ["seed-3", "seed-4"]
    assert {c["run_id"] for c in result.children} == {c.info.run_id for c in children}
    parent_dir = result.run_dir
    assert len(json.loads((parent_dir / "ensemble.json").read_text())["models"]) == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ensemble.json", "summary.json"}


def test_folds_train_each_fold_and_predict_averages_the_fold_models(tmp_path: Path, capsys) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=6)
    manifest = tmp_path / "folds.csv"
    build_manifest(dataset, manifest, folds=2, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # train.folds in the config (what a plan writes for a fold ensemble) is --folds without the flag
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1, "num_threads": 1, "folds": 2})

    with pytest.raises(UsageError, match=r"has folds \[0, 1\]"):
        medseg.train(config, folds=3, progress=False)
    # the CLI's --folds: the same message, exit code 2
    assert main(["run", str(config), "--folds", "3", "--no-progress"]) == EXIT_USAGE
    assert "has folds [0, 1]" in capsys.readouterr().err
    with pytest.raises(UsageError, match="train.folds=null"):
        medseg.train(config, seeds=2, progress=False)
    result = train_run(config)
    _, parent, children = _parent_and_children(uri)
    assert result.run_id == parent.info.run_id
    assert sorted(c.data.params["data.fold"] for c in children) == ["0", "1"]
    model_uris = json.loads((result.run_dir / "ensemble.json").read_text())["models"]
    assert len(model_uris) == 2

    def predict(model: str | Path, out: Path) -> np.ndarray:
        predictor = medseg.Predictor.from_uri(model, tracking_uri=uri)
        batch = predictor.predict_folder(dataset / "imagesTr" / "case_000.nii.gz", out, save_probabilities=True,
                                         progress=False)
        assert batch.counts["ok"] == 1 and batch.n_failed == 0
        assert batch.summary_dict()["ensemble_size"] == len(predictor.model.networks)
        (case,) = batch.results
        return nib.load(case.outputs["probabilities"]).get_fdata()

    ensemble = predict(result.run_dir, tmp_path / "ens")
    assert json.loads((tmp_path / "ens" / "predict_summary.json").read_text())["ensemble_size"] == 2
    members = [predict(uri_i, tmp_path / f"m{i}") for i, uri_i in enumerate(model_uris)]
    np.testing.assert_allclose(ensemble, np.mean(members, axis=0), atol=1e-5)

    # The parent run's URI stands for the same ensemble.
    predict(f"runs:/{parent.info.run_id}", tmp_path / "byrun")
    byrun = json.loads((tmp_path / "byrun" / "predict_summary.json").read_text())
    assert byrun["ensemble_size"] == 2 and set(byrun["model_uri"].split(",")) == set(model_uris)


def test_a_resumed_parent_skips_finished_children(tmp_path: Path, tiny_run_inputs, capsys) -> None:
    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1, "num_threads": 1})
    first = train_run(config, seeds=2)
    parent_dir = first.run_dir
    # As if the job died while the second child ran: its summary and the parent's are missing.
    (parent_dir / "summary.json").unlink()
    (parent_dir / "seed-1" / "summary.json").unlink()
    # the CLI's --seeds with --resume: a different count is refused, exit code 1
    assert main(["run", str(config), "--seeds", "3", "--resume", "--no-progress"]) == EXIT_FAILED
    assert "was --seeds 2" in capsys.readouterr().err
    resumed = train_run(config, seeds=2, resume=True)
    assert resumed.run_id == first.run_id and resumed.run_dir == first.run_dir
    assert resumed.children[0]["run_id"] == first.children[0]["run_id"]  # not rerun
    assert resumed.children[1]["run_id"] == first.children[1]["run_id"]  # same child run continued
    _, parent, children = _parent_and_children(uri)
    assert len(children) == 2 and parent.info.status == "FINISHED"


def test_aggregate_takes_metrics_every_child_has() -> None:
    children = [{"metrics": {"a": 1.0, "b": 2.0, "note": "x"}}, {"metrics": {"a": 3.0}}]
    assert aggregate(children) == {"a": 2.0, "a_std": pytest.approx(2 ** 0.5)}


def test_a_sigterm_during_the_final_status_waits_until_the_status_is_stored() -> None:
    """torchrun's SIGTERM can land while a survivor marks its run FAILED: the mark must complete."""
    import os
    import signal

    from medseg.engine.runner import end_despite_sigterm

    class SlowTracker:
        stored: list[str] = []

        def end(self, status: str) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of writing the status
            for _ in range(1000):  # Python runs signal handlers between bytecodes: give it the chance
                pass
            self.stored.append(status)

    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    try:
        with pytest.raises(SystemExit):
            end_despite_sigterm(SlowTracker(), "FAILED")  # type: ignore[arg-type]
        assert SlowTracker.stored == ["FAILED"]  # stored first, then the SIGTERM took effect
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_wrapped_reader_error_surfaces_as_its_root_cause(tmp_path: Path, tiny_run_inputs, capsys) -> None:
    """MONAI wraps a reader's error in "applying transform <LoadImaged object at 0x...>"; a run
    reports the error underneath (the file and the problem), and the MLflow run is FAILED."""
    from medseg.engine.runner import run_pipeline
    from medseg.errors import VolumeReadError

    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = medseg.load_config(tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1}))

    def pipeline(ctx: object) -> None:
        try:
            raise VolumeReadError("case_3.nii.gz: the file is empty (0 bytes). Copy or export it again.")
        except VolumeReadError as err:
            raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object at 0x7f3>") from err

    with pytest.raises(VolumeReadError, match="case_3.nii.gz: the file is empty"):
        run_pipeline(cfg, pipeline, progress=False)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"


def test_a_nan_training_image_stops_the_run_before_training_naming_it(tmp_path: Path, capsys) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=4)
    image = sorted((dataset / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(image)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.25, seed=0)
    config = tiny_config(tmp_path, dataset, manifest, f"sqlite:///{tmp_path / 'mlflow.db'}", train={"max_epochs": 1})
    assert main(["run", str(config), "--no-progress"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert image.name in err and "1 NaN/Inf voxel(s)" in err and "applying transform" not in err, err


def test_the_headline_takes_the_task_patterns_and_keeps_the_spread_beside_each_figure() -> None:
    from medseg.engine.runner import headline

    metrics = {"val/dice_mean": 0.8, "test/dice_mean": 0.7, "test/dice_mean_std": 0.01, "test/dice/a": 0.6,
               "val/dice/a": 0.5, "train/loss": 0.1, "test/hd95/a": float("nan")}
    patterns = medseg.get_task("segmentation").headline_metrics
    assert headline(metrics, patterns) == {"val/dice_mean": 0.8, "test/dice_mean": 0.7, "test/dice_mean_std": 0.01,
                                           "test/dice/a": 0.6}
    assert headline({"test/auc": 0.9, "val/auc_std": 0.1}, medseg.get_task("classification").headline_metrics) == {
        "test/auc": 0.9}
