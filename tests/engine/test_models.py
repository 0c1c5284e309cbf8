"""The one model registry: networks by (task, name); a wrong name says what was meant."""

from __future__ import annotations

import pytest
from torch import nn

import medseg
from medseg.engine import models
from medseg.engine.models import create_model, list_models, register_model
from medseg.errors import ModelError


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry of its own (two tasks' toy networks), so these tests see no other task's entries."""
    monkeypatch.setattr(models, "MODEL_REGISTRY", {})
    register_model("toy", "alpha")(lambda width: nn.Linear(width, 2))
    register_model("toy", "beta")(lambda width: nn.Linear(width, 3))
    register_model("detection", "gamma")(lambda width: nn.Linear(width, 4))


def test_create_model_passes_the_factory_its_task_arguments(toy_registry: None) -> None:
    net = create_model("toy", "beta", 5)
    assert isinstance(net, nn.Linear) and (net.in_features, net.out_features) == (5, 3)


def test_list_models_per_task_and_of_every_task(toy_registry: None) -> None:
    assert list_models("toy") == ["alpha", "beta"]
    assert list_models("detection") == ["gamma"]
    assert list_models("nobody") == []
    assert list_models() == ["detection/gamma", "toy/alpha", "toy/beta"]


def test_unknown_name_suggests_the_closest_and_lists_the_task_s_networks(toy_registry: None) -> None:
    with pytest.raises(ModelError, match=r"model.name 'alpah' is not a toy network; did you mean 'alpha'\?") as info:
        create_model("toy", "alpah", 5)
    assert "Registered for toy: ['alpha', 'beta']" in str(info.value)


def test_a_name_without_a_close_match_still_lists_the_task_s_networks(toy_registry: None) -> None:
    with pytest.raises(ModelError, match=r"'zzz' is not a toy network.*Registered for toy: \['alpha', 'beta'\]"):
        create_model("toy", "zzz", 5)


def test_a_name_of_another_task_says_which_task_it_belongs_to(toy_registry: None) -> None:
    with pytest.raises(ModelError, match=r"'gamma' is not a toy network \(it is a detection network\)"):
        create_model("toy", "gamma", 5)


def test_the_tasks_register_their_networks_and_a_cross_task_name_is_explained() -> None:
    everything = medseg.list_models()
    assert {"segmentation/unet", "segmentation/dynunet", "classification/resnet18", "classification/lenet",
            "reconstruction/unet_dc"} <= set(everything)
    assert medseg.list_models("classification") == [n.split("/", 1)[1] for n in everything
                                                     if n.startswith("classification/")]
    with pytest.raises(ModelError, match=r"'resnet18' is not a segmentation network \(it is a classification / "
                                         r"regression network\)"):
        create_model("segmentation", "resnet18")
    with pytest.raises(ModelError, match="did you mean 'resnet18'"):
        create_model("classification", "resnet19")
