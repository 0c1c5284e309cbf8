"""Relative paths in a config: a file's start at its folder, ``--set`` and dict values at the
current directory, URIs with a scheme stay as they are; every path is absolute once validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import medseg
from medseg.config import config_to_dict
from medseg.config.paths import PathKind, path_keys, resolve_path_value
from medseg.tasks.registry import every_path_key


def _project(tmp_path: Path) -> Path:
    """A project whose config sits two folders below the data it names, every path relative."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "m.csv").write_text("case_id,image,label,split\n", encoding="utf-8")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    config = tmp_path / "configs" / "nested" / "run.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({
        "output_dir": "../../runs/x",
        "data": {"manifest": "../../data/m.csv", "root": "../../data/images", "cache_dir": "cache",
                 "labels": {0: "background", 1: "tumour"}},
        "patch": {"size": [16, 16, 16]},
        "model": {"init_from": "../../weights.safetensors"},
        "tracking": {"uri": "sqlite:///../../runs/mlflow.db"},
    }), encoding="utf-8")
    return config


def _paths(cfg: medseg.RunConfig) -> dict[str, str]:
    return {"output_dir": str(cfg.output_dir), "manifest": str(cfg.data.manifest), "root": str(cfg.data.root),
            "cache_dir": str(cfg.data.cache_dir), "init_from": str(cfg.model.init_from), "uri": cfg.tracking.uri}


def test_a_nested_config_names_the_same_files_from_any_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    from_top = _paths(medseg.load_config("configs/nested/run.yaml"))
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    from_elsewhere = _paths(medseg.load_config(Path("../..") / "configs" / "nested" / "run.yaml"))

    assert from_top == from_elsewhere == {
        "output_dir": str(tmp_path / "runs" / "x"), "manifest": str(tmp_path / "data" / "m.csv"),
        "root": str(tmp_path / "data" / "images"), "cache_dir": str(config.parent / "cache"),
        "init_from": str(tmp_path / "weights.safetensors"), "uri": f"sqlite:///{tmp_path}/runs/mlflow.db"}
    assert Path(from_top["manifest"]).is_file() and Path(from_top["root"]).is_dir()
    assert not (tmp_path / "runs").exists()  # loading a config creates nothing


def test_set_values_start_at_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _project(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = medseg.load_config(config, ["data.root=scans", "output_dir=out", "tracking.uri=sqlite:///store.db",
                                      "data.manifest=/abs/m.csv"])
    assert cfg.data.root == work / "scans" and cfg.output_dir == work / "out"
    assert cfg.tracking.uri == f"sqlite:///{work}/store.db"
    assert cfg.data.manifest == Path("/abs/m.csv")
    assert cfg.model.init_from == str(tmp_path / "weights.safetensors")  # not overridden: from the file's folder


def test_a_dict_config_and_the_defaults_start_at_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = medseg.validate_config({"data": {"manifest": "m.csv", "labels": {0: "background", 1: "tumour"}},
                                  "patch": {"size": [16, 16, 16]}})
    assert cfg.data.manifest == tmp_path / "m.csv"
    assert cfg.output_dir == tmp_path / "runs" / "medseg"  # the default, made absolute
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert cfg.data.root is None  # unset stays unset ($MEDSEG_DATA_ROOT then)
    again = medseg.validate_config(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg  # a resolved config reads back as itself


@pytest.mark.parametrize("value", ["sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "file:///srv/mlruns",
                                   "file:mlruns", "s3://bucket/mlruns", "runs:/0123abcd/model",
                                   "models:/hippocampus@champion", "databricks", "sqlite://", "sqlite:///:memory:"])
def test_uris_with_a_scheme_and_absolute_paths_are_left_as_they_are(value: str) -> None:
    assert resolve_path_value(value, Path("/work/configs"), PathKind.TRACKING) == value
    assert resolve_path_value(value, Path("/work/configs"), PathKind.MODEL) == (
        "/work/configs/databricks" if value == "databricks" else value)  # only a store is known by that name


def test_relative_paths_and_sqlite_files_resolve_from_the_folder_given() -> None:
    base = Path("/work/project/configs")
    tracking = PathKind.TRACKING
    assert resolve_path_value("sqlite:///../runs/mlflow.db", base, tracking) == "sqlite:////work/project/runs/mlflow.db"
    assert resolve_path_value("sqlite:///mlflow.db", base, tracking) == "sqlite:////work/project/configs/mlflow.db"
    assert resolve_path_value("../data/./m.csv", base) == "/work/project/data/m.csv"
    assert resolve_path_value("mlruns", base, tracking) == "/work/project/configs/mlruns"  # a file store: a folder
    assert resolve_path_value("~/data", base) == str(Path("~/data").expanduser())


def test_a_regression_targets_file_resolves_from_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "configs" / "volumes.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"task": "regression", "data": {
        "manifest": "../m.csv", "targets": {"file": "../volumes.csv", "columns": ["volume"]}},
        "preprocess": {"size": [8, 8, 8]}}), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "configs")
    cfg = medseg.load_config(config.name)
    assert cfg.data.targets.file == tmp_path / "volumes.csv"  # type: ignore[attr-defined]


def test_the_path_keys_come_from_the_schema() -> None:
    keys = every_path_key()
    assert keys == {"output_dir": PathKind.PATH, "data.manifest": PathKind.PATH, "data.root": PathKind.PATH,
                    "data.cache_dir": PathKind.PATH, "data.fingerprint": PathKind.PATH,
                    "data.targets.file": PathKind.PATH, "data.boxes.file": PathKind.PATH,  # regression, detection
                    "model.init_from": PathKind.MODEL, "pretrain": PathKind.PATH,  # segmentation
                    "tracking.uri": PathKind.TRACKING}
    assert "data.targets.file" not in path_keys(type(medseg.validate_config(
        {"data": {"manifest": "m.csv", "labels": {0: "a", 1: "b"}}, "patch": {"size": [8, 8, 8]}})))
