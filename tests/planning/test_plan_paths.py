"""Where ``medseg plan`` writes: the manifest, the runs and their store beside ``--out`` (else in the
current folder), never elsewhere; the planned config names them relative to itself, so it loads
from any folder and its folder can move whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import medseg
from medseg.cli import main
from tests.conftest import write_msd_dataset


def _written(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_plan_out_writes_beside_the_config_and_the_config_loads_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_msd_dataset(tmp_path / "Task09_Tiny", n_cases=5)
    cwd, study = tmp_path / "cwd", tmp_path / "study" / "plans"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    code = main(["plan", str(dataset), "--budget", "1m", "--out", str(study / "tiny.yaml"), "--no-probe",
                 "--no-progress"])

    assert code == 0
    assert not _written(cwd), "nothing in the current folder when --out is given"
    assert {"tiny.yaml", "data_manifests/task09_tiny.csv"} <= _written(study)
    raw = yaml.safe_load((study / "tiny.yaml").read_text(encoding="utf-8"))
    assert raw["data"]["manifest"] == "data_manifests/task09_tiny.csv"
    assert raw["data"]["fingerprint"] == "data_manifests/task09_tiny.fingerprint.json"
    assert raw["output_dir"] == "runs/task09_tiny" and raw["tracking"]["uri"] == "sqlite:///runs/mlflow.db"
    assert raw["data"]["root"] == str(dataset)  # outside the plan's folder: absolute

    moved = tmp_path / "elsewhere" / "plans"
    shutil.move(str(study), moved)
    monkeypatch.chdir(tmp_path)
    cfg = medseg.load_config(moved / "tiny.yaml")
    assert cfg.data.manifest == moved / "data_manifests" / "task09_tiny.csv" and cfg.data.manifest.is_file()
    assert cfg.output_dir == moved / "runs" / "task09_tiny"
    assert cfg.tracking.uri == f"sqlite:///{moved}/runs/mlflow.db"
    assert cfg.data.root == dataset


def test_a_dataset_inside_the_plan_folder_is_named_relative_to_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_msd_dataset(tmp_path / "work" / "Task09_Tiny", n_cases=5)
    monkeypatch.chdir(tmp_path / "work")
    medseg.plan("Task09_Tiny", budget="1m", out="tiny.yaml", probe=False, progress=False)
    raw = yaml.safe_load((tmp_path / "work" / "tiny.yaml").read_text(encoding="utf-8"))
    assert raw["data"]["root"] == "Task09_Tiny"
    assert medseg.load_config(tmp_path / "work" / "tiny.yaml").data.root == dataset


def test_without_out_the_plan_writes_in_the_current_folder_and_holds_absolute_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_msd_dataset(tmp_path / "Task09_Tiny", n_cases=5)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    planned = medseg.plan(dataset, budget="1m", probe=False, progress=False)
    assert planned.config["data"]["manifest"] == str(cwd / "data_manifests" / "task09_tiny.csv")
    assert planned.config["output_dir"] == str(cwd / "runs" / "task09_tiny")
    assert planned.config["tracking"]["uri"] == f"sqlite:///{cwd}/runs/mlflow.db"
    assert _written(cwd) == {"data_manifests", "data_manifests/task09_tiny.csv",
                             "data_manifests/task09_tiny.meta.json", "data_manifests/task09_tiny.fingerprint.json"}


def test_a_repository_layout_plan_names_everything_relative_to_configs_planned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What benchmarks/bench_plan.py runs: the plan in configs/planned/, its home the repository
    (--home .), the data beside the repository named by a relative path: the committed file names
    everything relative to itself, as configs/planned/*.yaml do."""
    write_msd_dataset(tmp_path / "shared" / "Task09_Tiny", n_cases=5)
    repo = tmp_path / "repo"
    (repo / "data_manifests").mkdir(parents=True)
    monkeypatch.chdir(repo)
    medseg.build_manifest(Path("../shared/Task09_Tiny"), Path("data_manifests/tiny.csv"))

    assert main(["plan", "../shared/Task09_Tiny", "--manifest", "data_manifests/tiny.csv", "--budget", "1m",
                 "--out", "configs/planned/tiny.yaml", "--home", ".", "--no-probe", "--no-progress"]) == 0

    raw = yaml.safe_load((repo / "configs" / "planned" / "tiny.yaml").read_text(encoding="utf-8"))
    assert raw["data"]["manifest"] == "../../data_manifests/tiny.csv"
    assert raw["data"]["root"] == "../../../shared/Task09_Tiny"  # given relatively: kept relative
    assert raw["output_dir"] == "../../runs/tiny" and raw["tracking"]["uri"] == "sqlite:///../../runs/mlflow.db"
    assert not (repo / "configs" / "planned" / "data_manifests").exists()
