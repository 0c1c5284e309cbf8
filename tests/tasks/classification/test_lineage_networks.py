"""AlexNet, VGG and GoogLeNet: the originals' parameter counts at 224 px, small and odd inputs in
2D and 3D, their config keys, and the errors a bad config gets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg import load_config
from medseg.engine.classic_networks import INCEPTION_LAYERS, VGG_LAYERS
from medseg.engine.image_networks import AuxiliaryLoss, head_prefix
from medseg.errors import ConfigError, ModelError
from medseg.tasks.classification.config import ClassificationModelConfig
from medseg.tasks.classification.networks import create_classifier

LINEAGE = ("alexnet", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "googlenet")
CONFIG = "configs/medmnist_pneumonia.yaml"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin: int, cout: int, kernel: int, dims: int = 2) -> int:
    return cin * cout * kernel**dims + cout


def _linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def _imagenet(name: str, **options: object) -> nn.Module:
    cfg = ClassificationModelConfig(name=name, spatial_dims=2, stem="imagenet", **options)
    with torch.device("meta"):  # shapes only: 138M parameters neither allocated nor initialised
        return create_classifier(cfg, 3, 1000, (224, 224))


def test_alexnet_at_224_px_has_the_paper_s_62_3_million_parameters() -> None:
    widths = (3, 96, 256, 384, 384, 256)
    derived = sum(_conv(a, b, k) for a, b, k in zip(widths[:-1], widths[1:], (11, 5, 3, 3, 3), strict=True))
    derived += _linear(256 * 6 * 6, 4096) + _linear(4096, 4096) + _linear(4096, 1000)
    assert _count(_imagenet("alexnet")) == derived == 62_378_344  # one device: no two-GPU grouping


@pytest.mark.parametrize(("name", "known"), [("vgg11", 132_863_336), ("vgg16", 138_357_544),
                                             ("vgg11_bn", 132_868_840), ("vgg16_bn", 138_365_992)])
def test_vgg_at_224_px_has_the_published_parameter_counts(name: str, known: int) -> None:
    widths = [3] + [w for w in VGG_LAYERS[name.removesuffix("_bn")] if isinstance(w, int)]
    derived = sum(_conv(a, b, 3) + (2 * b if name.endswith("_bn") else 0) for a, b in zip(widths[:-1], widths[1:], strict=True))
    derived += _linear(512 * 7 * 7, 4096) + _linear(4096, 4096) + _linear(4096, 1000)
    assert _count(_imagenet(name)) == derived == known


def _inception_parameters(aux: bool) -> int:
    stem = _conv(3, 64, 7) + _conv(64, 64, 1) + _conv(64, 192, 3)
    total, cin = stem, 192
    outputs_after = []
    for layer in INCEPTION_LAYERS:
        if isinstance(layer, str):
            continue
        c1, r3, c3, r5, c5, pool = layer
        total += _conv(cin, c1, 1) + _conv(cin, r3, 1) + _conv(r3, c3, 3) + _conv(cin, r5, 1) + _conv(r5, c5, 5)
        total += _conv(cin, pool, 1)
        cin = c1 + c3 + c5 + pool
        outputs_after.append(cin)
    total += _linear(cin, 1000)
    if aux:  # after 4a (512) and 4d (528): 1x1 conv to 128, 4x4 grid, 1024 units, logits
        total += sum(_conv(c, 128, 1) + _linear(128 * 16, 1024) + _linear(1024, 1000) for c in outputs_after[2:6:3])
    return total


@pytest.mark.parametrize("aux", [False, True])
def test_googlenet_at_224_px_matches_the_count_of_the_paper_s_layers(aux: bool) -> None:
    assert _count(_imagenet("googlenet", aux_classifiers=aux)) == _inception_parameters(aux)


@pytest.mark.parametrize("name", LINEAGE)
@pytest.mark.parametrize(("size", "stem"), [((28, 28), "small"), ((33, 29), "small"), ((28, 28, 28), "strided"),
                                            ((17, 20, 15), "small")])
def test_small_odd_inputs_give_one_logit_per_class(name: str, size: tuple[int, ...], stem: str) -> None:
    torch.manual_seed(0)
    cfg = ClassificationModelConfig(name=name, spatial_dims=len(size), stem=stem, widen_factor=0.125)
    model = create_classifier(cfg, 2, 3, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, *size)).shape == (2, 3)


def test_googlenet_side_heads_train_and_stay_out_of_prediction() -> None:
    torch.manual_seed(0)
    cfg = ClassificationModelConfig(name="googlenet", spatial_dims=3, widen_factor=0.125, aux_classifiers=True)
    model = create_classifier(cfg, 1, 4, (12, 11, 13))
    x, target = torch.randn(2, 1, 12, 11, 13), torch.tensor([1, 3])
    logits, aux1, aux2 = model.train()(x)
    assert logits.shape == aux1.shape == aux2.shape == (2, 4)
    ce = nn.CrossEntropyLoss()
    combined = AuxiliaryLoss(ce)((logits, aux1, aux2), target)
    assert torch.allclose(combined, ce(logits, target) + 0.3 * (ce(aux1, target) + ce(aux2, target)))
    combined.backward()
    assert all(p.grad is not None for p in model.aux.parameters())
    assert model.eval()(x).shape == (2, 4)
    assert head_prefix(model) == "head.3"  # the main head, not a side head: what freeze and t-SNE use


def test_the_originals_dropout_lrn_and_norm_are_defaults_and_options() -> None:
    assert ClassificationModelConfig(name="alexnet").dropout == 0.5
    assert ClassificationModelConfig(name="googlenet").dropout == 0.4
    assert ClassificationModelConfig(name="vgg16", dropout=0.1).dropout == 0.1
    assert ClassificationModelConfig(name="resnet18").dropout == 0.0

    def kinds(name: str, **options: object) -> list[str]:
        cfg = ClassificationModelConfig(name=name, spatial_dims=2, widen_factor=0.125, **options)
        return [type(m).__name__ for m in create_classifier(cfg, 1, 2, (32, 32)).modules()]

    assert kinds("alexnet").count("LocalResponseNorm") == 2
    assert kinds("googlenet").count("LocalResponseNorm") == 2
    assert "LocalResponseNorm" not in kinds("alexnet", local_response_norm=False)
    assert kinds("vgg11_bn").count("BatchNorm2d") == 8 and "BatchNorm2d" not in kinds("vgg11")
    assert kinds("vgg16_bn", norm="instance").count("InstanceNorm2d") == 13
    assert [m for m in kinds("vgg16") if m == "Dropout"] == ["Dropout", "Dropout"]


def test_head_grid_sets_the_classifier_input() -> None:
    cfg = ClassificationModelConfig(name="vgg11", spatial_dims=3, widen_factor=0.125, head_grid=3)
    first = next(m for m in create_classifier(cfg, 1, 2, (28, 28, 28)).modules() if isinstance(m, nn.Linear))
    assert first.in_features == 64 * 3**3
    default = ClassificationModelConfig(name="alexnet", spatial_dims=3, widen_factor=0.125)
    first = next(m for m in create_classifier(default, 1, 2, (28, 28, 28)).modules() if isinstance(m, nn.Linear))
    assert first.in_features == 32 * 2**3 and math.prod((2, 2, 2)) == 8


def test_an_input_too_small_for_the_paper_s_stem_is_a_clear_error() -> None:
    cfg = ClassificationModelConfig(name="alexnet", spatial_dims=2, stem="imagenet")
    with pytest.raises(ModelError, match=r"alexnet: input size \[28, 28\] is too small.*model.stem: small"):
        create_classifier(cfg, 1, 2, (28, 28))
    with pytest.raises(ModelError, match=r"googlenet: input size \[20, 20\] is too small"):
        create_classifier(ClassificationModelConfig(name="googlenet", spatial_dims=2, stem="imagenet"), 1, 2, (20, 20))


def test_bad_network_configs_name_the_key_and_the_choices() -> None:
    cfg = load_config(CONFIG, ["model.name=vgg19"])  # a name is checked where the registry is: at build
    with pytest.raises(ModelError, match=r"model.name 'vgg19' is not a classification network; did you mean "
                                         r"'vgg16'\?.*'googlenet'.*'vgg16_bn'"):
        create_classifier(cfg.model, 1, 2, (28, 28))
    with pytest.raises(ConfigError, match=r"model.spatial_dims: Input should be 2 or 3 \(got 4\)"):
        load_config(CONFIG, ["model.spatial_dims=4"])
    with pytest.raises(ConfigError, match=r"'model.aux_classifier'; did you mean 'model.aux_classifiers'"):
        load_config(CONFIG, ["model.name=googlenet", "model.aux_classifier=true"])
    with pytest.raises(ConfigError, match=r"model.head_grid"):
        load_config(CONFIG, ["model.name=alexnet", "model.head_grid=0"])
