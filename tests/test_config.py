"""Config loading: every shipped config validates into its task's class; unknown keys, options of
another task, missing sections and bad values fail with a message that says what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg.config import (
    Rot90Aug,
    RunConfig,
    apply_override,
    config_to_dict,
    flatten,
    read_config_file,
)
from medseg.config import validate_config as validate_as
from medseg.errors import ConfigError
from medseg.tasks.classification.config import ClassificationConfig
from medseg.tasks.detection.config import DetectionConfig
from medseg.tasks.pretraining.config import PretrainingConfig
from medseg.tasks.reconstruction.config import ReconstructionConfig
from medseg.tasks.registry import config_types, get_task, load_config, validate_config
from medseg.tasks.regression.config import RegressionConfig
from medseg.tasks.segmentation.config import SegmentationConfig
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CLASSES: dict[str, type[RunConfig]] = {"segmentation": SegmentationConfig, "classification": ClassificationConfig,
                                       "reconstruction": ReconstructionConfig, "regression": RegressionConfig,
                                       "detection": DetectionConfig, "pretraining": PretrainingConfig}


def _with(raw: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``raw`` with sections merged in (a dict updates the section, anything else replaces it)."""
    out = dict(raw)
    for key, value in changes.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def _segmentation(**changes: Any) -> dict[str, Any]:
    raw = {"data": {"manifest": "m.csv", "labels": {0: "background", 1: "tumour"}}, "patch": {"size": [16, 16, 16]}}
    return _with(raw, **changes)


def _classification(**changes: Any) -> dict[str, Any]:
    raw = {"task": "classification", "data": {"manifest": "m.csv", "labels": {0: "normal", 1: "pneumonia"}},
           "preprocess": {"resize": [28, 28]}, "model": {"spatial_dims": 2}}
    return _with(raw, **changes)


def _reconstruction(**changes: Any) -> dict[str, Any]:
    raw = {"task": "reconstruction", "data": {"manifest": "m.csv"}, "recon": {"problem": "mri"}}
    return _with(raw, **changes)


# ----------------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_into_their_task_class_and_build_their_model(path: Path) -> None:
    cfg = load_config(path)
    assert type(cfg) is CLASSES[yaml.safe_load(path.read_text())["task"]]
    assert (REPO / cfg.data.manifest).is_file(), f"{path.name} points at a manifest that is not in the repo"
    model = get_task(cfg.task).build_network(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_resolved_config_reads_back_as_the_same_config(path: Path) -> None:
    cfg = load_config(path)  # what a stage writes next to its outputs, and --resume compares
    assert validate_config(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg


def test_shipped_configs_include_the_issue_keys() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo_segmentation.yaml", "msd_hippocampus.yaml", "recon_mri_4x.yaml", "recon_ct_sparse.yaml",
            "denoise_mri.yaml"} <= names
    cfg = load_config(REPO / "configs" / "demo_segmentation.yaml")
    keys = flatten(cfg.model_dump(mode="json"))
    for key in ("data.manifest", "train.max_epochs", "train.max_minutes", "tracking.uri", "tracking.experiment"):
        assert key in keys


def test_each_task_validates_with_its_own_class() -> None:
    assert config_types() == CLASSES
    assert type(validate_config(_segmentation())) is SegmentationConfig  # no task: segmentation
    assert type(validate_config(_classification())) is ClassificationConfig
    assert type(validate_config(_reconstruction())) is ReconstructionConfig


def test_an_unregistered_task_names_the_closest_one() -> None:
    with pytest.raises(ConfigError, match=r"task 'segmentaton' is not registered; did you mean 'segmentation'"):
        validate_config(_segmentation(task="segmentaton"))


def test_the_config_module_imports_without_torch() -> None:
    code = "import sys, medseg.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------------- unknown keys

def test_unknown_key_suggests_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_epoch'; did you mean 'train.max_epochs'"):
        validate_config(_segmentation(train={"max_epoch": 3}))


def test_unknown_top_level_section_suggests_a_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        validate_config(_segmentation(trian={}))


def test_unknown_key_inside_an_augmentation_names_its_position() -> None:
    raw = _segmentation(augment=[{"name": "flip", "prob": 0.5}, {"name": "affine", "rotate": 10}])
    with pytest.raises(ConfigError, match=r"unknown key 'augment.1.rotate'; did you mean 'augment.1.rotate_deg'"):
        validate_config(raw)


def test_unknown_augmentation_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"augment\.0.*'flip'"):
        validate_config(_segmentation(augment=[{"name": "flipp"}]))


def test_a_typo_in_a_task_section_suggests_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'recon.problme'; did you mean 'recon.problem'"):
        validate_config(_reconstruction(recon={"problme": "ct"}))


# ----------------------------------------------------------------------------- options of another task

@pytest.mark.parametrize(("raw", "message"), [
    (_segmentation(loss={"focal_gamma": 2.0}),
     r"loss.focal_gamma does not apply to task: segmentation \(it is an option of task: classification\); remove it"),
    (_segmentation(recon={"problem": "mri"}), r"recon does not apply to task: segmentation \(it is an option of "
     r"task: reconstruction\)"),
    (_segmentation(model={"cascades": 2}), r"model.cascades does not apply to task: segmentation \(it is an option "
     r"of task: reconstruction\)"),
    (_segmentation(model={"widen_factor": 0.5}), r"model.widen_factor does not apply to task: segmentation"),
    (_segmentation(validation={"tsne": False}), r"validation.tsne does not apply to task: segmentation \(it is an "
     r"option of task: classification\)"),
    (_segmentation(data={"ordinal": True}), r"data.ordinal does not apply to task: segmentation"),
    (_classification(patch={"size": [28, 28]}), r"patch does not apply to task: classification \(it is an option "
     r"of task: (\w+ and )*segmentation\)"),
    (_classification(postprocess={"keep_largest_component": True}), r"postprocess does not apply to task: "
     r"classification"),
    (_classification(model={"strides": [2, 2]}), r"model.strides does not apply to task: classification \(it is an "
     r"option of task: (\w+ and )*reconstruction and segmentation\)"),
    (_classification(validation={"overlays": 2}), r"validation.overlays does not apply to task: classification"),
    (_reconstruction(loss={"lambda_dice": 1.0}), r"loss.lambda_dice does not apply to task: reconstruction \(it is "
     r"an option of task: segmentation\)"),
    (_reconstruction(preprocess={"resize": [64, 64]}), r"preprocess.resize does not apply to task: reconstruction "
     r"\(it is an option of task: classification\)"),
    (_reconstruction(data={"labels": {0: "a", 1: "b"}}), r"data.labels does not apply to task: reconstruction"),
    (_reconstruction(preprocess={"crop_foreground": True}), r"preprocess.crop_foreground does not apply to task: "
     r"reconstruction"),
])
def test_an_option_of_another_task_is_refused_naming_that_task(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


@pytest.mark.parametrize(("raw", "message"), [
    (_segmentation(loss={"name": "ce"}), r"loss.name: 'ce' does not fit task: segmentation \(it is an option of "
     r"task: classification\); input should be 'dice_ce', 'dice' or 'dice_focal'"),
    (_classification(loss={"name": "dice_ce"}), r"'dice_ce' does not fit task: classification \(it is an option of "
     r"task: segmentation\)"),
    (_reconstruction(loss={"name": "dice_ce"}), r"'dice_ce' does not fit task: reconstruction"),
])
def test_a_loss_of_another_task_is_refused_naming_that_task(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


def test_without_the_other_tasks_an_option_of_theirs_is_just_unknown() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'loss.focal_gamma'"):
        validate_as(_segmentation(loss={"focal_gamma": 2.0}), SegmentationConfig)
    cfg = validate_as(_segmentation(), SegmentationConfig, others={"classification": ClassificationConfig})
    assert cfg.patch.size == (16, 16, 16)


# ------------------------------------------------------------------------------- required sections

@pytest.mark.parametrize(("raw", "message"), [
    (_segmentation(patch=None), r"patch: required for task: segmentation, e.g. patch: \{size: \[96, 96, 96\]\}"),
    ({"data": {"manifest": "m.csv", "labels": {0: "bg", 1: "fg"}}}, r"patch: required for task: segmentation"),
    ({"data": {"manifest": "m.csv"}, "patch": {"size": [16, 16, 16]}},
     r"data.labels: required for task: segmentation, e.g. labels: \{0: background, 1: tumour\}"),
    ({"patch": {"size": [16, 16, 16]}}, r"data: required for task: segmentation, e.g. data: \{manifest: "),
    ({k: v for k, v in _classification().items() if k != "preprocess"},
     r"preprocess: required for task: classification, e.g. preprocess: \{resize: \[28, 28\]\}"),
    (_classification(preprocess={"resize": None}), r"preprocess.resize: required for task: classification, "
     r"e.g. resize: \[28, 28\]"),
    (_classification(data={"labels": None}), r"data.labels: required for task: classification"),
])
def test_a_missing_task_section_is_an_error_naming_it(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


# ----------------------------------------------------------------------------------- overrides, files

def test_overrides_set_nested_values_and_parse_yaml_scalars(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_segmentation(augment=[{"name": "noise", "prob": 0.1}])))
    cfg = load_config(path, ["train.max_epochs=7", "train.max_minutes=0.5", "augment.0.prob=0.9",
                             "tracking.uri=http://127.0.0.1:5005"])
    assert cfg.train.max_epochs == 7 and cfg.train.max_minutes == 0.5
    assert cfg.augment[0].prob == 0.9
    assert cfg.tracking.uri == "http://127.0.0.1:5005"


def test_read_config_file_returns_the_raw_mapping_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_classification()))
    raw = read_config_file(path, ["loss.focal_gamma=3"])
    assert raw["loss"] == {"focal_gamma": 3} and raw["task"] == "classification"


@pytest.mark.parametrize("bad", ["train.max_epochs", "=3", "augment.4.prob=1", "seed.value=1"])
def test_malformed_override_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        apply_override(_segmentation(augment=[{"name": "noise"}], seed=0), bad)


def test_override_with_a_typo_is_caught_by_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_segmentation()))
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(path, ["optim.lrr=0.1"])


def test_bad_yaml_in_an_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_override(_segmentation(), "augment=[{name: flip")


def test_missing_file_bad_yaml_and_a_non_mapping_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n- patch\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping of sections, got list"):
        read_config_file(listed)


def test_missing_data_root_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEG_DATA_ROOT", raising=False)
    cfg = validate_config(_segmentation())
    with pytest.raises(ConfigError, match="MEDSEG_DATA_ROOT"):
        cfg.data.resolved_root()
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data/here")
    assert cfg.data.resolved_root() == Path("/data/here")


# ----------------------------------------------------------------------------------- segmentation

def test_segmentation_defaults() -> None:
    cfg = validate_config(_segmentation())
    assert isinstance(cfg, SegmentationConfig)
    assert (str(cfg.loss.name), cfg.model.name, cfg.model.norm, cfg.validation.overlap) == ("dice_ce", "unet",
                                                                                              "instance", 0.5)
    assert cfg.postprocess.keep_largest_component is False


def test_label_map_must_start_at_background() -> None:
    with pytest.raises(ConfigError, match="must map 0 to a name"):
        validate_config(_segmentation(data={"labels": {1: "tumour", 2: "oedema"}}))


def test_ct_window_mode_requires_a_window() -> None:
    with pytest.raises(ConfigError, match="window is required"):
        validate_config(_segmentation(preprocess={"intensity": {"mode": "ct_window"}}))


def test_patch_dimensions_must_match_the_model() -> None:
    with pytest.raises(ConfigError, match="patch.size has 2 values but model.spatial_dims is 3"):
        validate_config(_segmentation(patch={"size": [32, 32]}))
    with pytest.raises(ConfigError, match="preprocess.spacing has 2 values but model.spatial_dims is 3"):
        validate_config(_segmentation(preprocess={"spacing": [1.0, 1.0]}))


def test_rot90_needs_equal_patch_sizes_on_its_axes() -> None:
    raw = _segmentation(patch={"size": [32, 48, 32]}, augment=[{"name": "rot90", "axes": [0, 1]}])
    with pytest.raises(ConfigError, match=r"augment.0 \(rot90\) turns spatial axes 0 and 1"):
        validate_config(raw)
    raw["augment"] = [{"name": "rot90", "axes": [0, 2]}]
    turn = validate_config(raw).augment[0]
    assert isinstance(turn, Rot90Aug) and turn.axes == (0, 2)


# ----------------------------------------------------------------------------------- classification

def test_classification_defaults_are_its_own() -> None:
    cfg = validate_config(_classification())
    assert isinstance(cfg, ClassificationConfig)
    assert (str(cfg.loss.name), cfg.model.name, cfg.model.norm, str(cfg.model.stem)) == ("ce", "resnet18", "batch",
                                                                                          "small")
    assert (cfg.loss.focal_gamma, cfg.validation.tsne, cfg.data.ordinal) == (2.0, True, False)
    assert not hasattr(cfg, "patch")


@pytest.mark.parametrize(("changes", "message"), [
    ({"loss": {"name": "ordinal"}}, "set data.ordinal: true"),
    ({"loss": {"class_weights": [1.0, 2.0, 3.0]}}, "3 values for 2 classes"),
    ({"model": {"spatial_dims": 2, "activation": "tanh"}}, "model.activation"),
    ({"preprocess": {"resize": [28, 28, 28]}}, "preprocess.resize has 3 values but model.spatial_dims is 2"),
])
def test_classification_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_classification(**changes))


# ----------------------------------------------------------------------------------- reconstruction

def test_reconstruction_defaults_are_its_own() -> None:
    cfg = validate_config(_reconstruction())
    assert isinstance(cfg, ReconstructionConfig)
    assert (str(cfg.loss.name), cfg.model.spatial_dims, str(cfg.preprocess.intensity.mode)) == ("l1_ssim", 2, "none")
    assert cfg.data.labels is None and str(cfg.recon.problem) == "mri"
    assert cfg.recon.resolved_center_fraction() == pytest.approx(0.08)
    eight = validate_as(_reconstruction(recon={"problem": "mri", "acceleration": 8}), ReconstructionConfig)
    assert eight.recon.resolved_center_fraction() == pytest.approx(0.04)
    bare = validate_as({"task": "reconstruction", "data": {"manifest": "m.csv"}}, ReconstructionConfig)
    assert str(bare.recon.problem) == "mri"


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"name": "resnet18"}}, "not a reconstruction network"),
    ({"model": {"name": "unet_dc"}, "recon": {"problem": "ct"}}, "needs recon.problem: mri"),
    ({"model": {"name": "cascade"}, "recon": {"input": "magnitude"}}, "set recon.input: complex"),
    ({"model": {"spatial_dims": 3}}, "model.spatial_dims: 2"),
    ({"preprocess": {"intensity": {"mode": "zscore"}}}, r"scales every volume to \[0, 1\] itself"),
    ({"recon": {"acceleration": 4, "center_fraction": 0.5}}, "exceeds the line budget"),
    ({"data": {"channels": ["t1", "t2"]}}, r"set data.channels: \[image\]"),
])
def test_reconstruction_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_reconstruction(**changes))
