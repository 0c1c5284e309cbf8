"""Config loading: every shipped config validates; unknown keys and bad values fail helpfully."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medseg.config import ConfigError, RunConfig, apply_override, flatten, load_config, validate_config
from medseg.engine.models import create_model

from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _minimal() -> dict:
    return {
        "data": {"manifest": "m.csv", "labels": {0: "background", 1: "tumour"}},
        "patch": {"size": [16, 16, 16]},
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_and_build_their_model(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert (REPO / cfg.data.manifest).is_file(), f"{path.name} points at a manifest that is not in the repo"
    if str(cfg.task) == "reconstruction":
        from medseg.tasks.reconstruction.training import build_network

        model = build_network(cfg)
    elif cfg.patch is None:  # classification: the whole (resized) image is the input
        from medseg.tasks.classification.training import build_classifier

        model = build_classifier(cfg)
    else:
        model = create_model(cfg.model, len(cfg.data.channels), len(cfg.data.labels), cfg.patch.size)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shipped_configs_include_the_issue_keys() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo_segmentation.yaml", "msd_hippocampus.yaml", "recon_mri_4x.yaml", "recon_ct_sparse.yaml",
            "denoise_mri.yaml"} <= names
    cfg = load_config(REPO / "configs" / "demo_segmentation.yaml")
    keys = flatten(cfg.model_dump(mode="json"))
    for key in ("data.manifest", "train.max_epochs", "train.max_minutes", "tracking.uri", "tracking.experiment"):
        assert key in keys


def test_unknown_key_suggests_the_closest_valid_one(tmp_path: Path) -> None:
    raw = _minimal()
    raw["train"] = {"max_epoch": 3}
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_epoch'; did you mean 'train.max_epochs'"):
        validate_config(raw)


def test_unknown_top_level_section_suggests_a_section() -> None:
    raw = _minimal()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        validate_config(raw)


def test_unknown_key_inside_an_augmentation_names_its_position() -> None:
    raw = _minimal()
    raw["augment"] = [{"name": "flip", "prob": 0.5}, {"name": "affine", "rotate": 10}]
    with pytest.raises(ConfigError, match=r"unknown key 'augment.1.rotate'; did you mean 'augment.1.rotate_deg'"):
        validate_config(raw)


def test_unknown_augmentation_name_lists_the_valid_ones() -> None:
    raw = _minimal()
    raw["augment"] = [{"name": "flipp"}]
    with pytest.raises(ConfigError, match=r"augment\.0.*'flip'"):
        validate_config(raw)


def test_overrides_set_nested_values_and_parse_yaml_scalars(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    raw = _minimal()
    raw["augment"] = [{"name": "noise", "prob": 0.1}]
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, ["train.max_epochs=7", "train.max_minutes=0.5", "augment.0.prob=0.9",
                             "tracking.uri=http://127.0.0.1:5005"])
    assert cfg.train.max_epochs == 7 and cfg.train.max_minutes == 0.5
    assert cfg.augment[0].prob == 0.9
    assert cfg.tracking.uri == "http://127.0.0.1:5005"


@pytest.mark.parametrize("bad", ["train.max_epochs", "=3", "augment.4.prob=1"])
def test_malformed_override_is_a_clear_error(bad: str) -> None:
    raw = _minimal()
    raw["augment"] = [{"name": "noise"}]
    with pytest.raises(ConfigError, match="--set"):
        apply_override(raw, bad)


def test_override_with_a_typo_is_caught_by_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(path, ["optim.lrr=0.1"])


def test_label_map_must_start_at_background() -> None:
    raw = _minimal()
    raw["data"]["labels"] = {1: "tumour", 2: "oedema"}
    with pytest.raises(ConfigError, match="must map 0 to a name"):
        validate_config(raw)


def test_ct_window_mode_requires_a_window() -> None:
    raw = _minimal()
    raw["preprocess"] = {"intensity": {"mode": "ct_window"}}
    with pytest.raises(ConfigError, match="window is required"):
        validate_config(raw)


def test_patch_dimensions_must_match_the_model() -> None:
    raw = _minimal()
    raw["patch"] = {"size": [32, 32]}
    with pytest.raises(ConfigError, match="patch.size has 2 values but model.spatial_dims is 3"):
        validate_config(raw)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_missing_data_root_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSEG_DATA_ROOT", raising=False)
    cfg = validate_config(_minimal())
    with pytest.raises(ConfigError, match="MEDSEG_DATA_ROOT"):
        cfg.data.resolved_root()
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data/here")
    assert cfg.data.resolved_root() == Path("/data/here")


def test_rot90_needs_equal_patch_sizes_on_its_axes() -> None:
    raw = _minimal()
    raw["patch"] = {"size": [32, 48, 32]}
    raw["augment"] = [{"name": "rot90", "axes": [0, 1]}]
    with pytest.raises(ConfigError, match=r"augment.0 \(rot90\) turns spatial axes 0 and 1"):
        validate_config(raw)
    raw["augment"] = [{"name": "rot90", "axes": [0, 2]}]
    assert validate_config(raw).augment[0].axes == (0, 2)


def test_bad_yaml_in_an_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_override(_minimal(), "augment=[{name: flip")


# ----------------------------------------------------------------------------------- classification

def _classification(**changes) -> dict:
    raw = {"task": "classification", "data": {"manifest": "m.csv", "labels": {0: "normal", 1: "pneumonia"}},
           "preprocess": {"resize": [28, 28]}, "model": {"spatial_dims": 2}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_classification_defaults_are_its_own() -> None:
    cfg = validate_config(_classification())
    assert (str(cfg.loss.name), cfg.model.name, cfg.model.norm) == ("ce", "resnet18", "batch")
    assert cfg.patch is None


@pytest.mark.parametrize(("changes", "message"), [
    ({"patch": {"size": [28, 28]}}, "patch is for segmentation"),
    ({"preprocess": {"resize": None}}, "preprocess.resize is required"),
    ({"loss": {"name": "dice_ce"}}, "does not fit task: classification"),
    ({"loss": {"name": "ordinal"}}, "set data.ordinal: true"),
    ({"loss": {"class_weights": [1.0, 2.0, 3.0]}}, "3 values for 2 classes"),
    ({"model": {"spatial_dims": 2, "activation": "tanh"}}, "model.activation"),
    ({"preprocess": {"resize": [28, 28, 28]}}, "preprocess.resize has 3 values"),
])
def test_classification_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_classification(**changes))


def test_segmentation_still_needs_a_patch() -> None:
    with pytest.raises(ConfigError, match="patch is required"):
        validate_config({"data": {"manifest": "m.csv", "labels": {0: "bg", 1: "fg"}}})


def _reconstruction(**changes) -> dict:
    raw = {"task": "reconstruction", "data": {"manifest": "m.csv"}, "recon": {"problem": "mri"}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_reconstruction_defaults_are_its_own() -> None:
    cfg = validate_config(_reconstruction())
    assert (str(cfg.loss.name), cfg.model.spatial_dims, str(cfg.preprocess.intensity.mode)) == ("l1_ssim", 2, "none")
    assert cfg.data.labels is None and cfg.patch is None
    assert cfg.recon.resolved_center_fraction() == pytest.approx(0.08)
    eight = validate_config(_reconstruction(recon={"problem": "mri", "acceleration": 8}))
    assert eight.recon.resolved_center_fraction() == pytest.approx(0.04)


@pytest.mark.parametrize(("changes", "message"), [
    ({"loss": {"name": "dice_ce"}}, "does not fit task: reconstruction"),
    ({"model": {"name": "resnet18"}}, "not a reconstruction network"),
    ({"model": {"name": "unet_dc"}, "recon": {"problem": "ct"}}, "needs recon.problem: mri"),
    ({"model": {"name": "cascade"}, "recon": {"input": "magnitude"}}, "set recon.input: complex"),
    ({"model": {"spatial_dims": 3}}, "model.spatial_dims: 2"),
    ({"patch": {"size": [16, 16]}}, "patch is for segmentation"),
    ({"preprocess": {"intensity": {"mode": "zscore"}}}, "scales every volume to \\[0, 1\\] itself"),
    ({"recon": {"acceleration": 4, "center_fraction": 0.5}}, "exceeds the line budget"),
    ({"recon": {"problme": "ct"}}, "did you mean 'recon.problem'"),
])
def test_reconstruction_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_reconstruction(**changes))


def test_other_tasks_still_need_labels_and_refuse_a_recon_section() -> None:
    with pytest.raises(ConfigError, match="data.labels is required"):
        validate_config({"data": {"manifest": "m.csv"}, "patch": {"size": [16, 16, 16]}})
    with pytest.raises(ConfigError, match="recon is for task: reconstruction"):
        validate_config({**_minimal(), "recon": {"problem": "mri"}})
