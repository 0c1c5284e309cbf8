"""``--backend onnxruntime|openvino`` runs the exported network inside the same preprocessing,
sliding-window and inversion path as torch, and gives the same masks; ``medseg export`` writes a
folder whose own ONNX graph the backends then use."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.cli import main
from medseg.errors import UsageError
from tests.conftest import make_case

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def model(trained_segmentation: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    inputs = tmp_path_factory.mktemp("backend_inputs")
    for i, shape in enumerate([(19, 17, 11), (26, 21, 9)]):  # odd sizes: partial windows, a last batch of 1
        image, _, affine = make_case(shape, seed=40 + i, spacing=(0.9, 1.3, 2.2))
        nib.save(nib.Nifti1Image(image, affine), inputs / f"scan{i}.nii.gz")
    return {"uri": trained_segmentation["model_uri"], "tracking_uri": trained_segmentation["tracking_uri"],
            "inputs": str(inputs), "run_dir": trained_segmentation["run_dir"]}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for label in (1, 2):
        x, y = a == label, b == label
        if x.sum() + y.sum():
            scores.append(2 * float((x & y).sum()) / float(x.sum() + y.sum()))
    return float(np.mean(scores)) if scores else 1.0


def _run(model: dict[str, str], out: Path, uri: str | None = None, *extra: str) -> dict:
    assert main(["predict", "--model", uri or model["uri"], "--input", model["inputs"], "--output", str(out),
                 "--tracking-uri", model["tracking_uri"], "--no-progress", "--no-tracking", *extra]) == 0
    return json.loads((out / "predict_summary.json").read_text())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_backend_gives_the_masks_torch_gives(model: dict[str, str], backend: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(backend)
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    torch_summary = _run(model, tmp_path / "torch")
    summary = _run(model, tmp_path / backend, None, "--backend", backend)
    assert torch_summary["backend"] == "torch" and summary["backend"] == backend
    assert summary["weights_sha256"] == torch_summary["weights_sha256"]
    assert list((tmp_path / "cache" / "exports").rglob("network.onnx")), "the export was not cached"
    for name in ("scan0.nii.gz", "scan1.nii.gz"):
        reference = nib.load(tmp_path / "torch" / name)
        mask = nib.load(tmp_path / backend / name)
        assert np.allclose(mask.affine, reference.affine) and mask.shape == reference.shape
        assert _dice(np.asarray(mask.dataobj), np.asarray(reference.dataobj)) >= 0.999


def test_export_writes_onnx_and_torchscript_folders_that_predict_uses(model: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", model["uri"], "--format", "onnx", "--out", str(tmp_path / "onnx"),
                 "--tracking-uri", model["tracking_uri"]]) == 0
    assert {p.name for p in (tmp_path / "onnx").iterdir()} == {"medseg_model.json", "weights.safetensors",
                                                               "network.onnx"}
    predictor = medseg.Predictor.from_uri(tmp_path / "onnx", device="cpu", backend="onnxruntime")
    assert Path(predictor.model.networks[0].onnx_path) == tmp_path / "onnx" / "network.onnx"
    reference = medseg.Predictor.from_uri(model["uri"], device="cpu", tracking_uri=model["tracking_uri"])
    scan = Path(model["inputs"]) / "scan1.nii.gz"
    assert _dice(predictor.predict(scan).label_map, reference.predict(scan).label_map) >= 0.999

    path = medseg.export_model(model["uri"], tmp_path / "ts", "torchscript", tracking_uri=model["tracking_uri"])
    assert path.name == "network.pt" and path.stat().st_size > 0
    with pytest.raises(UsageError, match="use one of"):
        medseg.export_model(model["uri"], tmp_path / "x", "tflite", tracking_uri=model["tracking_uri"])


def test_auto_picks_the_first_installed_backend_on_a_cpu_and_torch_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medseg.engine import backends
    from medseg.engine.backend_choice import BACKEND_PREFERENCE, resolve_backend

    monkeypatch.delenv("MEDSEG_BACKEND", raising=False)
    monkeypatch.setattr(backends, "available_backends", lambda: ["torch", "onnxruntime", "openvino"])
    assert resolve_backend("auto", torch.device("cpu")) == BACKEND_PREFERENCE[0]
    assert resolve_backend(None, torch.device("cpu")) == "openvino"  # the default is auto
    monkeypatch.setattr(backends, "available_backends", lambda: ["torch", "onnxruntime"])
    assert resolve_backend("auto", torch.device("cpu")) == "torch"  # measured slower than torch: not chosen
    monkeypatch.setattr(backends, "available_backends", lambda: ["torch", "onnxruntime", "openvino"])
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(backends, "available_backends", lambda: ["torch"])  # the lean default install
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("onnxruntime", torch.device("cpu")) == "onnxruntime"  # named: used as named
    monkeypatch.setenv("MEDSEG_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_auto_falls_back_to_torch_for_a_task_that_cannot_export_and_a_named_backend_says_why() -> None:
    """Reconstruction models do not export: ``auto`` (the default) predicts them with torch."""
    from torch import nn

    from medseg.engine.backend_choice import on_backend
    from medseg.engine.model_loading import LoadedModel
    from medseg.errors import UsageError

    class NoExport:
        name = "reconstruction"

        def export_example(self, contract: dict) -> tuple:
            raise UsageError("task 'reconstruction' does not run on another inference backend; use --backend torch")

    model = LoadedModel((nn.Conv2d(1, 1, 3),), {"task": "reconstruction"}, ("folder",), (None,),
                        weights_sha256=("0" * 64,))
    assert on_backend(model, NoExport(), "openvino", automatic=True) is model  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="use --backend torch"):
        on_backend(model, NoExport(), "openvino", automatic=False)  # type: ignore[arg-type]
