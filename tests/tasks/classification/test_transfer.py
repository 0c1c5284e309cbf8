"""init_from copies matching weights (a new head starts fresh); freeze fixes the named layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medseg.engine.checkpoint import save_checkpoint
from medseg.errors import ModelError
from medseg.tasks.classification.config import ClassificationModelConfig
from medseg.tasks.classification.networks import create_classifier
from medseg.tasks.classification.transfer import freeze, initialise_from

CFG = ClassificationModelConfig(name="resnet18", spatial_dims=2, widen_factor=0.25, norm="batch")


def test_init_from_a_checkpoint_with_another_class_count(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_classifier(CFG, 1, 2, (28, 28))
    save_checkpoint(tmp_path / "best.safetensors", {"model": source.state_dict(), "epoch": 3})
    torch.manual_seed(2)
    target = create_classifier(CFG, 1, 5, (28, 28))  # 5 classes: the head cannot be copied
    before_head = target.fc.weight.clone()
    report = initialise_from(target, str(tmp_path / "best.safetensors"))
    assert report["fresh"] == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert torch.equal(target.fc.weight, before_head)


def test_init_from_another_architecture_is_refused(tmp_path: Path) -> None:
    lenet = create_classifier(ClassificationModelConfig(name="lenet", spatial_dims=2, channels=(4, 8)), 1, 2,
                              (28, 28))
    save_file(lenet.state_dict(), str(tmp_path / "lenet.safetensors"))
    with pytest.raises(ModelError, match="none of its .* tensors matches"):
        initialise_from(create_classifier(CFG, 1, 2, (28, 28)), str(tmp_path / "lenet.safetensors"))


def test_a_pickled_state_dict_is_refused_with_the_conversion_command(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(ModelError, match=r"pickled PyTorch file.*medseg model convert .*weights\.pt --out"):
        initialise_from(create_classifier(CFG, 1, 2, (28, 28)), str(tmp_path / "weights.pt"))


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    net = create_classifier(CFG, 1, 3, (28, 28))
    frozen = freeze(net, ["backbone"])
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert "conv1.weight" in frozen
    before = net.conv1.weight.clone()
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    optimiser.step()
    assert torch.equal(net.conv1.weight, before)


def test_freeze_prefixes_and_a_typo() -> None:
    net = create_classifier(CFG, 1, 2, (28, 28))
    frozen = freeze(net, ["conv1", "layer1"])
    assert frozen and all(n.startswith(("conv1.", "layer1.")) for n in frozen)
    assert net.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ModelError, match="did you mean 'layer2'"):
        freeze(create_classifier(CFG, 1, 2, (28, 28)), ["layr2"])
