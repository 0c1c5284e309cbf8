"""Pretraining a classification network (``medseg pretrain`` with ``model.name: resnet18``, ...): the
autoencoder's encoder is the classifier's own feature extractor, its tensors load into the classifier
by name (the head starts fresh), the fine-tuning run records the pretraining run, and a network of
another architecture is refused with Expected / Got / File / Fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import medseg
from medseg.engine.image_networks import IMAGE_NETWORKS, head_prefix
from medseg.engine.transfer import check_pretrained_network, initialise_from
from medseg.errors import ConfigError, ModelError
from medseg.tasks.pretraining.config import PRETRAINED_IMAGE_NETWORKS
from medseg.tasks.pretraining.encoder import transferred_names
from medseg.tasks.pretraining.image_encoder import DECODER, MaskedImageAutoencoder
from medseg.tasks.pretraining.training import build_network
from medseg.tasks.registry import get_task, validate_config
from tests.conftest import classification_config, train_run, write_medmnist_npz

#: The classification network of the end-to-end tests: an eighth-width ResNet-18 (8-16-32-64).
RESNET = ["model.name=resnet18", "model.widen_factor=0.125", "model.stem=small", "model.norm=batch"]


def pretraining_config(name: str, dims: int, size: tuple[int, ...], **model: object) -> object:
    return validate_config({"task": "pretraining", "data": {"manifest": "m.csv"},
                            "model": {"name": name, "spatial_dims": dims, "widen_factor": 0.125, "channels": [4, 8],
                                      **model},
                            "patch": {"size": list(size)}, "masking": {"block": [4] * dims}})


def test_the_pretrainable_image_networks_are_every_one_with_a_feature_map() -> None:
    assert set(PRETRAINED_IMAGE_NETWORKS) == set(IMAGE_NETWORKS) - {"mlp"}


@pytest.mark.parametrize("name", PRETRAINED_IMAGE_NETWORKS)
def test_the_encoder_is_the_classifiers_feature_extractor_under_its_names(name: str) -> None:
    size = (33, 29)  # odd: the decoder's grid overshoots and is cut back
    cfg = pretraining_config(name, 2, size)
    torch.manual_seed(0)
    autoencoder = build_network(cfg)
    assert isinstance(autoencoder, MaskedImageAutoencoder)
    classifier = IMAGE_NETWORKS[name](cfg.model, 1, 3, size)
    own, names = classifier.state_dict(), transferred_names(autoencoder, "encoder")
    assert names and all(tuple(own[n].shape) == tuple(autoencoder.state_dict()[n].shape) for n in names)
    assert not any(n.startswith(head_prefix(classifier) + ".") or n.startswith(DECODER) for n in names)
    assert transferred_names(autoencoder, "all") == names  # the decoder is no part of the classifier
    image = torch.randn(2, 1, *size)
    assert autoencoder(image).shape == image.shape


def test_a_3d_resnet_and_densenet_reconstruct_an_odd_volume() -> None:
    volume = torch.randn(2, 1, 13, 11, 9)
    for name, stem in (("resnet18", "strided"), ("densenet121", "small")):
        assert build_network(pretraining_config(name, 3, (13, 11, 9), stem=stem))(volume).shape == volume.shape
    with pytest.raises(ModelError, match=r"patch.size \[13, 11, 9\] is too small for DenseNet121's feature "
                                         r"extractor .*Fix: a larger patch.size"):
        build_network(pretraining_config("densenet121", 3, (13, 11, 9), stem="strided"))


def test_a_network_without_a_feature_map_is_refused_naming_those_that_can() -> None:
    with pytest.raises(ConfigError, match=r"(?s)model.name 'mlp' cannot be pretrained yet\. Expected: .*unet, "
                                          r"dynunet.*resnet18, resnet34.*googlenet.*Got: 'mlp'.*Fix:"):
        pretraining_config("mlp", 2, (28, 28))


# ------------------------------------------------------------------------------------- end to end, 2D


def medmnist(tmp_path: Path, shape: tuple[int, ...]) -> tuple[Path, Path]:
    npz = write_medmnist_npz(tmp_path / "tiny.npz", shape=shape, counts=(12, 4, 4))
    root = tmp_path / "images"
    medseg.import_medmnist(npz, tmp_path / "cases.csv", root, {0: "normal", 1: "lesion"}, progress=False)
    return tmp_path / "cases.csv", root


def pretrain_settings(tmp_path: Path, size: tuple[int, ...], *extra: str) -> list[str]:
    return [*RESNET, f"model.spatial_dims={len(size)}", f"patch.size={list(size)}", f"masking.block={[4] * len(size)}",
            "data.channels=[image]", "preprocess.orientation=null", "preprocess.intensity.mode=ct_window",
            "preprocess.intensity.window=[0,255]", "train.max_epochs=1", "train.batch_size=4", "train.num_threads=1",
            "train.num_workers=0", f"output_dir={tmp_path / 'pretrain_runs'}", "tracking.system_metrics=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def pretrained_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[medseg.PretrainResult, Path, Path]:
    """A 2D ResNet-18 pretrained on a synthetic MedMNIST manifest (labels unread), and that manifest."""
    home = tmp_path_factory.mktemp("pretrained_2d")
    manifest, root = medmnist(home, (21, 17))
    result = medseg.pretrain(manifest, overrides=pretrain_settings(home, (21, 17), f"data.root={root}"),
                             progress=False)
    assert result is not None
    return result, manifest, root


def resnet_classifier(tmp_path: Path, pretrained: medseg.PretrainResult, manifest: Path, root: Path,
                      **model: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return classification_config(tmp_path, manifest, root, str(pretrained.run.tracking_uri), dims=2, size=(21, 17),
                                 model={"name": "resnet18", "spatial_dims": 2, "widen_factor": 0.125, "stem": "small",
                                        "norm": "batch", "init_from": str(pretrained.weights), **model},
                                 train={"max_epochs": 1, "batch_size": 8, "val_interval": 1, "num_threads": 1})


def test_the_pretrained_encoder_is_copied_into_the_classifier_and_its_head_starts_fresh(
        tmp_path: Path, pretrained_2d) -> None:
    pretrained, manifest, root = pretrained_2d
    saved = load_file(str(pretrained.weights))
    assert set(saved) == set(pretrained.tensors) and "conv1.weight" in saved and "layer4.1.bn2.running_mean" in saved
    assert not any(name.startswith(("fc.", DECODER)) for name in saved)
    cfg = medseg.load_config(resnet_classifier(tmp_path, pretrained, manifest, root))
    torch.manual_seed(5)
    fresh = get_task("classification").build_network(cfg)  # the bare classifier, as a run without init_from
    network = get_task("classification").training_network(cfg)
    own = network.state_dict()
    assert all(torch.equal(own[name], saved[name]) for name in saved)  # every encoder tensor, copied
    assert not torch.equal(fresh.conv1.weight, own["conv1.weight"])
    about = json.loads(pretrained.metadata.read_text())
    assert about["network_task"] == "classification" and about["network"]["model"]["name"] == "resnet18"
    assert about["run_id"] == pretrained.run_id


def test_the_fine_tuning_run_records_the_pretraining_run(tmp_path: Path, pretrained_2d) -> None:
    pretrained, manifest, root = pretrained_2d
    result = train_run(resnet_classifier(tmp_path, pretrained, manifest, root))
    tags = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags
    assert tags["medseg.pretraining_run_id"] == pretrained.run_id
    assert tags["medseg.init_from"] == str(pretrained.weights)
    record = json.loads((result.run_dir / "init_from.json").read_text())
    assert record["loaded"] == sorted(pretrained.tensors) and record["fresh"] == ["fc.bias", "fc.weight"]
    assert record["pretraining_run_id"] == pretrained.run_id


def test_another_architecture_is_refused_with_expected_got_file_fix(tmp_path: Path, pretrained_2d) -> None:
    pretrained, manifest, root = pretrained_2d
    deeper = medseg.load_config(resnet_classifier(tmp_path / "deeper", pretrained, manifest, root, name="resnet34"))
    # every resnet18 tensor fits a resnet34 by name and shape: only the sidecar tells them apart
    with pytest.raises(ModelError, match=r"(?s)pretrained for another network \(model.name: resnet34\)\. Expected: "
                                         r"the network that was pretrained \(.*'name': 'resnet18'.*Got: model.name: "
                                         r"resnet34\. File: .*pretrained\.safetensors \(pretraining run .*Fix:"):
        check_pretrained_network(str(pretrained.weights), deeper.model)
    with pytest.raises(ModelError, match="pretrained for another network"):
        train_run(resnet_classifier(tmp_path / "run", pretrained, manifest, root, stem="strided"))
    wider = medseg.load_config(resnet_classifier(tmp_path / "wider", pretrained, manifest, root, widen_factor=0.25))
    with pytest.raises(ModelError, match=r"(?s)do not fit this network.*Expected: the network that was pretrained "
                                         r"\(.*'widen_factor': 0.125.*File: .*Fix:"):
        initialise_from(get_task("classification").build_network(wider), str(pretrained.weights))


# ------------------------------------------------------------------------------------- end to end, 3D


def test_a_3d_resnet_pretrains_on_volumes_and_initialises_the_3d_classifier(tmp_path: Path) -> None:
    manifest, root = medmnist(tmp_path, (11, 13, 9))
    size = (12, 12, 12)
    result = medseg.pretrain(manifest, overrides=pretrain_settings(tmp_path, size, f"data.root={root}",
                                                                   "model.stem=strided"), progress=False)
    assert result is not None
    saved = load_file(str(result.weights))
    cfg = medseg.load_config(classification_config(
        tmp_path, manifest, root, str(result.run.tracking_uri), dims=3, size=size,
        model={"name": "resnet18", "spatial_dims": 3, "widen_factor": 0.125, "stem": "strided", "norm": "batch",
               "init_from": str(result.weights)}))
    network = get_task("classification").training_network(cfg)
    assert network.conv1.weight.ndim == 5
    assert all(torch.equal(network.state_dict()[name], saved[name]) for name in saved)
