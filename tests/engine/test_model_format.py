"""Models are safetensors + JSON: a tampered model, ensemble, init_from or registry entry runs no
code; pickled models are refused with the way to convert them; outputs know which model made them.

The "hostile" files are real pickles whose unpickling would create a marker file: the promise is
that the marker never appears, whatever file of a model folder they replace.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.cli import main
from medseg.engine.model_format import MODEL_FILE, WEIGHTS_FILE, read_model_folder, write_model_folder
from medseg.errors import ModelError, ModelLoadError, UsageError
from medseg.tasks.classification.transfer import pretrained_state
from medseg.tasks.registry import network_from_spec
from tests.conftest import make_case


class _Marker:
    """Unpickling this opens (creates) a file: the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


def _hostile(marker: Path) -> bytes:
    return pickle.dumps(_Marker(marker))


@pytest.fixture(scope="module")
def logged(trained_segmentation: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The shared tiny U-Net (registered as tiny-seg@champion), its downloaded MLflow folder and a scan."""
    tmp = tmp_path_factory.mktemp("logged")
    mlflow.set_tracking_uri(trained_segmentation["tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=trained_segmentation["model_uri"],
                                                      dst_path=str(tmp / "download")))
    inputs = tmp / "inputs"
    inputs.mkdir()
    image, _, affine = make_case((19, 17, 11), seed=5, spacing=(0.9, 1.3, 2.2))
    nib.save(nib.Nifti1Image(image, affine), inputs / "scan.nii.gz")
    return {"uri": trained_segmentation["model_uri"], "tracking_uri": trained_segmentation["tracking_uri"],
            "folder": str(folder), "run_dir": trained_segmentation["run_dir"], "inputs": str(inputs), "tmp": str(tmp)}


def _predict(model: str, logged: dict[str, str], out: Path, *extra: str) -> int:
    return main(["predict", "--model", model, "--input", logged["inputs"], "--output", str(out),
                 "--tracking-uri", logged["tracking_uri"], "--no-progress", "--no-tracking", *extra])


def test_the_logged_model_is_a_pyfunc_of_json_and_safetensors_with_no_pickle(logged: dict[str, str]) -> None:
    folder = Path(logged["folder"])
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert f"artifacts/{MODEL_FILE}" in files and f"artifacts/{WEIGHTS_FILE}" in files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt", ".bin"))], files
    for name in files:  # pickle protocol 2+ starts with PROTO (0x80) and the protocol number
        head = (folder / name).read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{name} is a pickle"
    info = mlflow.models.get_model_info(logged["uri"])
    assert set(info.flavors) == {"python_function"}
    assert info.signature is not None and info.signature.inputs.input_names() == ["path"]
    model_json = json.loads((folder / "artifacts" / MODEL_FILE).read_text())
    assert model_json["network"]["task"] == "segmentation" and model_json["network"]["name"] == "unet"
    assert model_json["contract"]["labels"] == {"0": "background", "1": "blob1", "2": "blob2"}
    # the run folder keeps the same model: the same weights, byte for byte
    local = read_model_folder(Path(logged["run_dir"]) / "model")
    assert local.weights_sha256 == model_json["weights"]["sha256"]


@pytest.mark.parametrize("target", [f"artifacts/{WEIGHTS_FILE}", f"artifacts/{MODEL_FILE}", "MLmodel",
                                    "python_model.py", "artifacts/extra.pkl"])
def test_a_tampered_model_folder_fails_clearly_and_runs_nothing(logged: dict[str, str], tmp_path: Path,
                                                                target: str, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(logged["folder"], model)
    (model / target).write_bytes(_hostile(marker))
    code = _predict(str(model), logged, tmp_path / "out")
    err = capsys.readouterr().err
    assert not marker.exists(), f"replacing {target} with a pickle ran its code"
    if target in (f"artifacts/{WEIGHTS_FILE}", f"artifacts/{MODEL_FILE}"):
        assert code == 1, err  # found but damaged: a failure, not bad usage (exit 2)
        assert Path(target).name in err and "download or log" in err.lower()
    else:  # medseg never reads MLmodel, the pyfunc code or stray files: the model still works
        assert code == 0, err
        assert (tmp_path / "out" / "scan.nii.gz").is_file()


def test_an_ensemble_or_init_from_pointing_at_a_tampered_model_runs_nothing(logged: dict[str, str],
                                                                           tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(logged["folder"], model)
    (model / "artifacts" / WEIGHTS_FILE).write_bytes(_hostile(marker))
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "ensemble.json").write_text(json.dumps({"models": [logged["uri"], str(model)]}))
    with pytest.raises(ModelLoadError, match="weights.safetensors has sha256 .* weights changed"):
        medseg.Predictor.from_uri(str(parent), device="cpu", tracking_uri=logged["tracking_uri"])
    with pytest.raises(ModelLoadError):
        pretrained_state(str(model))
    (tmp_path / "weights.pt").write_bytes(_hostile(marker))
    with pytest.raises(ModelError, match="pickled PyTorch file"):
        pretrained_state(str(tmp_path / "weights.pt"))
    assert not marker.exists()


def test_a_pickled_model_of_an_older_medseg_is_refused_then_converted_knowingly(logged: dict[str, str],
                                                                               tmp_path: Path, capsys) -> None:
    files = read_model_folder(Path(logged["folder"]))
    network = network_from_spec(files.network_spec)
    network.load_state_dict(files.state_dict)
    old = tmp_path / "old_model"
    mlflow.pytorch.save_model(network.eval(), str(old), serialization_format="pickle",
                              metadata={"medseg_contract": files.contract})
    assert _predict(str(old), logged, tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "is a pickled model" in err and "medseg model convert" in err and "data/model.pth" in err
    assert not (tmp_path / "refused" / "scan.nii.gz").exists()

    config = Path(logged["run_dir"]) / "resolved_config.yaml"
    assert main(["model", "convert", str(old), "--out", str(tmp_path / "converted"), "--config", str(config)]) == 0
    converted = read_model_folder(tmp_path / "converted")
    assert all(torch.equal(converted.state_dict[k], v) for k, v in files.state_dict.items())
    # what the old model learned beyond its config comes along (its temperature, QC thresholds, volumes)
    for key in ("calibration", "qc", "label_volumes_ml"):
        assert converted.contract[key] == files.contract[key], key
    assert _predict(str(tmp_path / "converted"), logged, tmp_path / "new") == 0
    assert _predict(logged["uri"], logged, tmp_path / "orig") == 0
    new = np.asarray(nib.load(tmp_path / "new" / "scan.nii.gz").dataobj)
    assert np.array_equal(new, np.asarray(nib.load(tmp_path / "orig" / "scan.nii.gz").dataobj))


def test_a_registry_alias_names_the_model_wherever_a_uri_does(logged: dict[str, str], tmp_path: Path) -> None:
    predictor = medseg.Predictor.from_uri("models:/tiny-seg@champion", device="cpu",
                                          tracking_uri=logged["tracking_uri"])
    reference = medseg.Predictor.from_uri(logged["uri"], device="cpu", tracking_uri=logged["tracking_uri"])
    assert predictor.model.weights_sha256 == reference.model.weights_sha256
    assert _predict("models:/tiny-seg@champion", logged, tmp_path / "out") == 0
    with pytest.raises(UsageError, match="not found"):
        medseg.Predictor.from_uri("models:/tiny-seg@nobody", device="cpu", tracking_uri=logged["tracking_uri"])


def test_a_rerun_with_other_weights_is_refused_and_overwrite_repredicts(logged: dict[str, str], tmp_path: Path,
                                                                        capsys) -> None:
    files = read_model_folder(Path(logged["folder"]))
    network = network_from_spec(files.network_spec)
    network.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in files.state_dict.items()})
    other = tmp_path / "other"
    write_model_folder(other, network, files.network_spec, files.contract)

    out = tmp_path / "out"
    assert _predict(logged["uri"], logged, out) == 0
    first = json.loads((out / "predict_summary.json").read_text())
    assert first["weights_sha256"] == [files.weights_sha256]
    assert _predict(logged["uri"], logged, out) == 0  # same model: finished cases are skipped
    assert json.loads((out / "predict_summary.json").read_text())["counts"]["skipped"] == 1

    assert _predict(str(other), logged, out) == 2
    assert "holds outputs of another model" in capsys.readouterr().err
    assert json.loads((out / "predict_summary.json").read_text())["weights_sha256"] == [files.weights_sha256]

    assert _predict(str(other), logged, out, "--overwrite") == 0
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "failed": 0, "skipped": 0}
    assert summary["weights_sha256"] == [read_model_folder(other).weights_sha256] != first["weights_sha256"]


def test_changed_weights_are_caught_by_their_recorded_hash(logged: dict[str, str], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(logged["folder"], model)
    files = read_model_folder(model)
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) for k, v in files.state_dict.items()}, str(model / "artifacts" / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match="the weights changed after the model was written"):
        read_model_folder(model)
