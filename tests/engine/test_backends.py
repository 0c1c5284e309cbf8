"""Exported networks and inference backends: every network family, exported once, gives torch's
outputs on ONNX Runtime and OpenVINO for batches and sizes other than the export's."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import medseg.tasks.classification.networks  # noqa: F401 - fills the registry
import medseg.tasks.reconstruction.networks  # noqa: F401
import medseg.tasks.segmentation.networks  # noqa: F401
from medseg.config import UNetModelConfig
from medseg.engine import backends
from medseg.engine.backends import (
    BACKENDS,
    EXPORT_FORMATS,
    OnnxRuntimeNetwork,
    OpenVinoNetwork,
    available_backends,
    backend_network,
    export_network,
    export_onnx,
    export_torchscript,
)
from medseg.engine.models import create_model
from medseg.engine.sliding import fold_batch_norms
from medseg.errors import ModelError, UsageError
from medseg.tasks.classification.config import ClassificationModelConfig
from medseg.tasks.reconstruction.config import ReconConfig, ReconstructionModelConfig
from medseg.tasks.reconstruction.operators import cartesian_mask, undersample

BACKEND_CLASSES = {"onnxruntime": OnnxRuntimeNetwork, "openvino": OpenVinoNetwork}
#: Agreement with torch: absolute near zero, relative for large values (an FFT's rounding grows with them).
ATOL = RTOL = 1e-4


def trained_like(network: nn.Module) -> nn.Module:
    """Seeded weights a trained network could have, folded for prediction: batch-norm statistics
    that are not the identity, and the zero-initialised residual heads made non-zero (otherwise a
    reconstruction network is the identity, and any backend "matches" it)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for param in network.parameters():
            if not param.any():
                param.normal_(0.0, 0.1, generator=generator)
    return fold_batch_norms(network.eval())


def images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def mri_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """What an MRI network sees: zero-filled real and imaginary parts and the 4x equispaced mask."""
    n, _, height, width = shape
    target = torch.rand((n, 1, height, width), generator=torch.Generator().manual_seed(seed))
    return undersample(target, cartesian_mask("equispaced", width, 4.0, 0.08, seed))


@dataclass(frozen=True)
class Family:
    """One registered network, the batch it is exported with and the awkward batches it must then take."""

    build: Callable[[], nn.Module]
    example: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # batch 3, then batch 1, through the same session
    dynamic_spatial: bool = True
    inputs: Callable[[tuple[int, ...], int], torch.Tensor] = images
    pads_in_forward: bool = False  # computes its padding from the input size in Python (a trace fixes it)


def _recon(name: str, problem: str = "mri", cascades: int = 2) -> nn.Module:
    model = ReconstructionModelConfig(name=name, spatial_dims=2, channels=(4, 8), norm="instance", cascades=cascades)
    return create_model("reconstruction", name, model, ReconConfig(problem=problem))


FAMILIES = {
    # sliding windows: the patch size, in batches whose last one is smaller; other multiples of 2 too
    "segmentation-unet-3d": Family(
        lambda: create_model("segmentation", "unet", UNetModelConfig(spatial_dims=3, channels=(4, 8), norm="batch"),
                             1, 3, (16, 16, 16)),
        (2, 1, 16, 16, 16), ((3, 1, 16, 16, 16), (1, 1, 8, 24, 12))),
    "segmentation-dynunet-2d": Family(
        lambda: create_model("segmentation", "dynunet", UNetModelConfig(name="dynunet", spatial_dims=2,
                                                                         channels=(4, 8, 8), norm="instance"),
                             2, 3, (16, 16)),
        (2, 2, 16, 16), ((3, 2, 16, 16), (1, 2, 24, 36))),
    # a fixed input size (preprocess.resize)
    "classification-resnet18-2d": Family(
        lambda: create_model("classification", "resnet18", ClassificationModelConfig(
            spatial_dims=2, widen_factor=0.125, norm="batch"), 1, 2, (28, 28)),
        (2, 1, 28, 28), ((3, 1, 28, 28), (1, 1, 28, 28)), dynamic_spatial=False),
    "classification-densenet121-3d": Family(
        lambda: create_model("classification", "densenet121", ClassificationModelConfig(
            name="densenet121", spatial_dims=3, norm="batch"), 1, 3, (12, 12, 12)),
        (2, 1, 12, 12, 12), ((3, 1, 12, 12, 12), (1, 1, 12, 12, 12)), dynamic_spatial=False),
    # slices of any size (64x64 training, 320x260 real): sizes the U-Net's padding must round up
    "reconstruction-unet_dc-mri": Family(
        lambda: _recon("unet_dc"), (2, 3, 32, 32), ((3, 3, 40, 26), (1, 3, 21, 37)), inputs=mri_inputs,
        pads_in_forward=True),
    "reconstruction-unet-ct": Family(
        lambda: _recon("unet", problem="ct"), (2, 1, 32, 32), ((3, 1, 40, 26), (1, 1, 21, 37)),
        pads_in_forward=True),
    "reconstruction-cascade-mri": Family(
        lambda: _recon("cascade"), (2, 3, 32, 32), ((3, 3, 26, 40), (1, 3, 37, 21)), inputs=mri_inputs,
        pads_in_forward=True),
}
#: Exports that take long on 2 cores (DenseNet-121's hundreds of layers; the symbolic size reasoning of
#: free axes through several padded U-Nets): the default run keeps one network per task.
SLOW = {"segmentation-dynunet-2d", "classification-densenet121-3d", "reconstruction-cascade-mri",
        "reconstruction-unet-ct"}


@dataclass(frozen=True)
class Built:
    name: str
    family: Family
    network: nn.Module


@dataclass(frozen=True)
class Exported(Built):
    path: Path


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                        for name in FAMILIES])
def built(request: pytest.FixtureRequest) -> Built:
    """Each family's network, built once for every test of this module."""
    family = FAMILIES[request.param]
    torch.manual_seed(0)
    return Built(request.param, family, trained_like(family.build()))


@pytest.fixture(scope="module")
def exported(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Each family's network exported once for every test of this module."""
    pytest.importorskip("onnxscript")
    family = built.family
    path = export_onnx(built.network, family.inputs(family.example, 0),
                       tmp_path_factory.mktemp(built.name) / "network.onnx", dynamic_spatial=family.dynamic_spatial)
    return Exported(built.name, family, built.network, path)


def test_export_onnx_writes_a_checked_graph_with_free_batch_and_spatial_axes(exported: Exported) -> None:
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(exported.path), full_check=True)
    model = onnx.load(str(exported.path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["output"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    example = exported.family.example
    assert dims[0].dim_param and dims[1].dim_value == example[1]
    if exported.family.dynamic_spatial:
        assert all(d.dim_param for d in dims[2:])
    else:
        assert [d.dim_value for d in dims[2:]] == list(example[2:])
    digest = {p.key: p.value for p in model.metadata_props}[backends.DIGEST_KEY]
    assert digest == backends.network_digest(exported.network, torch.zeros(example), exported.family.dynamic_spatial)
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["network.onnx"]  # no temp file left


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_gives_torch_s_outputs_for_other_batches_and_sizes(exported: Exported, backend: str) -> None:
    pytest.importorskip(backend)
    wrapped = BACKEND_CLASSES[backend](exported.path, threads=2)
    assert wrapped.backend == backend and list(wrapped.parameters()) == []
    for seed, shape in enumerate(exported.family.shapes, start=1):
        x = exported.family.inputs(shape, seed)
        with torch.no_grad():
            expected = exported.network(x)
            got = wrapped(x)
        assert got.dtype == torch.float32 and got.device == x.device and got.shape == expected.shape
        assert expected.std() > 1e-2  # a real output, not a constant both could agree on
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, shape=shape: f"{backend}, batch {shape}: {m}")


@pytest.mark.parametrize("built", ["segmentation-unet-3d"], indirect=True)
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_takes_channels_last_and_bfloat16_batches(exported: Exported, backend: str) -> None:
    """What the predictor may hand it: channels-last windows (3D) and autocast's bfloat16."""
    pytest.importorskip(backend)
    wrapped = BACKEND_CLASSES[backend](exported.path, threads=1)
    x = exported.family.inputs(exported.family.shapes[0], 7)
    with torch.no_grad():
        expected = exported.network(x)
        got = wrapped(x.to(memory_format=torch.channels_last_3d))
        rounded = wrapped(x.to(torch.bfloat16))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert rounded.dtype == torch.float32
    torch.testing.assert_close(rounded, exported.network(x.to(torch.bfloat16).float()).detach(), atol=ATOL, rtol=RTOL)


def test_export_torchscript_matches_torch_at_the_example_size(built: Built, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    family = built.family
    with caplog.at_level(logging.WARNING, logger="medseg.engine.backends"):
        path = export_torchscript(built.network, family.inputs(family.example, 0), tmp_path / "network.pt")
    traced = torch.jit.load(str(path))
    x = family.inputs((3, *family.example[1:]), 5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), built.network(x), atol=1e-5, rtol=1e-5)
    # a network that pads to a multiple of the input size is told it is fixed; instance norm's checks are not
    assert ("use it only for inputs of shape" in caplog.text) == family.pads_in_forward


# ----------------------------------------------------------------------------------- backend_network


def tiny_network() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, kernel_size=1)).eval()


EXAMPLE = (2, 2, 8, 8)


def any_onnx_backend() -> str:
    for backend in ("onnxruntime", "openvino"):
        if backend in available_backends():
            return backend
    pytest.skip("neither onnxruntime nor openvino is installed")


def test_available_backends_lists_torch_then_every_importable_one() -> None:
    found = available_backends()
    assert found[0] == "torch" and set(found) <= set(BACKENDS)
    for backend in found[1:]:
        assert __import__(backend)


def test_torch_backend_is_the_network_itself(tmp_path: Path) -> None:
    network = tiny_network()
    assert backend_network(network, "torch", torch.zeros(EXAMPLE), tmp_path) is network
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_lists_the_backends(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--backend 'tensorrt' is not an inference backend; use one of "
                                         r"\['torch', 'onnxruntime', 'openvino'\]"):
        backend_network(tiny_network(), "tensorrt", torch.zeros(EXAMPLE), tmp_path)


@pytest.mark.parametrize(("backend", "extra"), [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_missing_backend_package_names_it_and_the_pip_command(backend: str, extra: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # `import` now fails as if it were not installed
    with pytest.raises(UsageError, match=rf"--backend {backend} needs the Python package '{backend}'.*"
                                         rf"pip install 'medseg\[{extra}\]'"):
        backend_network(tiny_network(), backend, torch.zeros(EXAMPLE), tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before exporting anything
    assert backend not in available_backends()


def test_export_without_onnxscript_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # (onnx is checked first, where it is missing too)
    with pytest.raises(UsageError, match=r"ONNX export needs the Python package 'onnx(script)?'.*"
                                         r"pip install 'medseg\[onnx\]'"):
        export_onnx(tiny_network(), torch.zeros(EXAMPLE), tmp_path / "network.onnx")


def test_backend_network_exports_once_and_reuses_the_file_while_the_weights_are_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = any_onnx_backend()
    network = tiny_network()
    x = images((3, 2, 12, 10), 4)
    first = backend_network(network, backend, images(EXAMPLE, 0), tmp_path)
    exported_file = tmp_path / "network.onnx"
    assert isinstance(first, backends.BackendNetwork) and first.onnx_path == exported_file
    torch.testing.assert_close(first(x), network(x).detach(), atol=ATOL, rtol=RTOL)

    exports: list[Path] = []
    real_export = backends.export_onnx

    def counting_export(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a spy with the export's arguments
        exports.append(args[2])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(backends, "export_onnx", counting_export)
    written = exported_file.stat().st_mtime_ns
    again = backend_network(network, backend, images(EXAMPLE, 9), tmp_path)  # other values, same shape
    assert exports == [] and exported_file.stat().st_mtime_ns == written
    torch.testing.assert_close(again(x), network(x).detach(), atol=ATOL, rtol=RTOL)

    with torch.no_grad():  # another model's weights: the old graph must not serve it
        network[0].bias.add_(1.0)
    changed = backend_network(network, backend, images(EXAMPLE, 0), tmp_path)
    assert exports == [exported_file]
    torch.testing.assert_close(changed(x), network(x).detach(), atol=ATOL, rtol=RTOL)


def test_backend_network_runs_a_given_onnx_file_without_exporting(tmp_path: Path) -> None:
    backend = any_onnx_backend()
    network = tiny_network()
    given = export_onnx(network, images(EXAMPLE, 0), tmp_path / "exported" / "model.onnx")
    work_dir = tmp_path / "work"
    pinned = backends.file_sha256(given)  # what `medseg export` records beside it
    wrapped = backend_network(network, backend, images(EXAMPLE, 0), work_dir, onnx_path=given, onnx_sha256=pinned)
    assert isinstance(wrapped, backends.BackendNetwork) and wrapped.onnx_path == given and wrapped.sha256 == pinned
    assert not work_dir.exists()
    x = images((1, 2, 6, 14), 2)
    torch.testing.assert_close(wrapped(x), network(x).detach(), atol=ATOL, rtol=RTOL)


def test_a_missing_onnx_file_is_named(tmp_path: Path) -> None:
    backend = any_onnx_backend()
    with pytest.raises(UsageError, match=r"ONNX model .*absent.onnx: no such file"):
        backend_network(tiny_network(), backend, torch.zeros(EXAMPLE), tmp_path, onnx_path=tmp_path / "absent.onnx")


def test_a_graph_refuses_inputs_it_was_not_exported_for(tmp_path: Path) -> None:
    backend = any_onnx_backend()
    path = export_onnx(tiny_network(), images(EXAMPLE, 0), tmp_path / "network.onnx", dynamic_spatial=False)
    wrapped = BACKEND_CLASSES[backend](path)
    assert wrapped.threads == torch.get_num_threads()
    with pytest.raises(ModelError, match=r"takes inputs of shape \(\?, 2, 8, 8\) \(\? = any size\), got "
                                         r"\(1, 2, 8, 10\)"):
        wrapped(torch.zeros(1, 2, 8, 10))
    with pytest.raises(ModelError, match=r"got \(1, 3, 8, 8\)"):
        backend_network(tiny_network(), backend, torch.zeros(1, 3, 8, 8), tmp_path, onnx_path=path,
                        onnx_sha256=backends.file_sha256(path))


def test_a_given_graph_without_its_pinned_hash_is_never_run(tmp_path: Path) -> None:
    backend = any_onnx_backend()
    network = tiny_network()
    other = tiny_network()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    given = export_onnx(other, images(EXAMPLE, 0), tmp_path / "exported" / "model.onnx")  # not this network's
    x = images((1, 2, 6, 14), 2)
    for pin in (None, "0" * 64):  # unpinned, or pinned to other bytes
        wrapped = backend_network(network, backend, images(EXAMPLE, 0), tmp_path / "work", onnx_path=given,
                                  onnx_sha256=pin)
        assert wrapped.onnx_path == tmp_path / "work" / "network.onnx" != given
        assert wrapped.sha256 == backends.file_sha256(wrapped.onnx_path)
        torch.testing.assert_close(wrapped(x), network(x).detach(), atol=ATOL, rtol=RTOL)
    assert (tmp_path / "work").stat().st_mode & 0o777 == 0o700


def test_a_cached_graph_whose_bytes_changed_is_exported_again(tmp_path: Path) -> None:
    backend = any_onnx_backend()
    network = tiny_network()
    first = backend_network(network, backend, images(EXAMPLE, 0), tmp_path / "work")
    other = tiny_network()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    # another graph written in its place (by anyone who can write there): its bytes give it away
    export_onnx(other, images(EXAMPLE, 0), first.onnx_path)
    again = backend_network(network, backend, images(EXAMPLE, 0), tmp_path / "work")
    assert again.sha256 == first.sha256 == backends.file_sha256(first.onnx_path)
    x = images((1, 2, 6, 14), 2)
    torch.testing.assert_close(again(x), network(x).detach(), atol=ATOL, rtol=RTOL)


def test_export_refuses_a_network_in_training_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"export_onnx: Sequential is in training mode.*network.eval\(\)"):
        export_onnx(tiny_network().train(), torch.zeros(EXAMPLE), tmp_path / "network.onnx")
    with pytest.raises(ValueError, match=r"export_torchscript: Sequential is in training mode"):
        export_torchscript(tiny_network().train(), torch.zeros(EXAMPLE), tmp_path / "network.pt")


class FixedBatch(nn.Module):
    """A forward that hard-codes the batch size: its graph would mix the images of other batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1).sum(1)


def test_a_network_that_fixes_the_batch_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    with pytest.raises(ModelError, match=r"FixedBatch: the exported output's batch axis is \[2\], not the input's"):
        export_onnx(FixedBatch().eval(), torch.zeros(EXAMPLE), tmp_path / "network.onnx")
    assert list(tmp_path.iterdir()) == []


class FixedSize(nn.Module):
    """A forward that takes 8x8 images only (it adds an 8x8 constant): its spatial axes cannot be free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(64.0).reshape(8, 8)


def test_a_network_that_fixes_its_size_is_refused_by_name_then_exported_at_that_size(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    with pytest.raises(ModelError, match=r"FixedSize could not be exported to ONNX with a free batch and spatial "
                                         r"axes .*static shape of 8.*try dynamic_spatial=False \(spatial size "
                                         r"fixed at \[8, 8\]\)"):
        export_onnx(FixedSize().eval(), torch.zeros(2, 1, 8, 8), tmp_path / "network.onnx")
    path = export_onnx(FixedSize().eval(), torch.zeros(2, 1, 8, 8), tmp_path / "network.onnx", dynamic_spatial=False)
    wrapped = BACKEND_CLASSES[any_onnx_backend()](path)
    x = images((3, 1, 8, 8), 1)
    torch.testing.assert_close(wrapped(x), x + torch.arange(64.0).reshape(8, 8))


def test_export_network_dispatches_on_the_format_and_refuses_others(tmp_path: Path) -> None:
    assert EXPORT_FORMATS == ("onnx", "torchscript")
    network = tiny_network()
    path = export_network(network, images(EXAMPLE, 0), tmp_path / "network.pt", "torchscript")
    x = images((1, 2, 8, 8), 1)
    torch.testing.assert_close(torch.jit.load(str(path))(x), network(x).detach())
    with pytest.raises(UsageError, match=r"--format 'savedmodel' is not an export format; use one of "
                                         r"\['onnx', 'torchscript'\]"):
        export_network(network, images(EXAMPLE, 0), tmp_path / "network.pb", "savedmodel")
