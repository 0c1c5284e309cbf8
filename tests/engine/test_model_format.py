"""Models are safetensors + JSON: a tampered model, ensemble, init_from or registry entry runs no
code; pickled models are refused with the way to convert them; outputs know which model made them.

The "hostile" files are real pickles whose unpickling would create a marker file: the promise is
that the marker never appears, whatever file of a model folder they replace.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import medseg
from medseg.cli import main
from medseg.engine.model_format import (
    MODEL_FILE,
    WEIGHTS_FILE,
    file_sha256,
    read_model_folder,
    write_model_folder,
)
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
    assert f"data/medseg_model/{MODEL_FILE}" in files and f"data/medseg_model/{WEIGHTS_FILE}" in files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt", ".bin", ".py"))], files
    assert not (folder / "code").exists()
    # the loader is the installed medseg's; medseg comes as the bundled wheel, never from an index
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "medseg.serving.pyfunc_loader"
    assert "python_model" not in mlmodel["flavors"]["python_function"]
    (wheel,) = [f for f in files if f.startswith("wheels/")]
    assert wheel.startswith("wheels/medseg-") and wheel.endswith(".whl")
    requirements = (folder / "requirements.txt").read_text().split()
    assert wheel in requirements and not [r for r in requirements if r.startswith("medseg")]
    assert "torch<=2.13.0,>=2.4" in requirements
    assert set(mlmodel["metadata"]["medseg_files"]) == {f"data/medseg_model/{MODEL_FILE}",
                                                        f"data/medseg_model/{WEIGHTS_FILE}", wheel}
    for name in files:  # pickle protocol 2+ starts with PROTO (0x80) and the protocol number
        head = (folder / name).read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{name} is a pickle"
    info = mlflow.models.get_model_info(logged["uri"])
    assert set(info.flavors) == {"python_function"}
    assert info.signature is not None and info.signature.inputs.input_names() == ["path"]
    model_json = json.loads((folder / "data" / "medseg_model" / MODEL_FILE).read_text())
    assert model_json["network"]["task"] == "segmentation" and model_json["network"]["name"] == "unet"
    assert model_json["contract"]["labels"] == {"0": "background", "1": "blob1", "2": "blob2"}
    # the run folder keeps the same model: the same weights, byte for byte
    local = read_model_folder(Path(logged["run_dir"]) / "model")
    assert local.weights_sha256 == model_json["weights"]["sha256"]



def test_a_finished_run_folder_is_accepted_as_the_model(logged: dict[str, str]) -> None:
    """``--model runs/<name>/<time>`` (what ``medseg run`` printed) loads the model it packaged."""
    by_run = medseg.Predictor.from_uri(logged["run_dir"], device="cpu")
    by_folder = medseg.Predictor.from_uri(str(Path(logged["run_dir"]) / "model"), device="cpu")
    assert by_run.model.weights_sha256 == by_folder.model.weights_sha256
    assert by_run.model.source_run_id == by_folder.model.source_run_id


def test_a_model_uri_against_a_store_that_is_not_there_names_it_and_creates_nothing(
        logged: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From another folder the default relative store is not there: MLflow would create an empty one
    and then call the model missing; medseg says where it looked and writes nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UsageError, match=r"store is not there.*Got: no file at .*runs/mlflow\.db.*Fix: pass --tracking-uri"):
        medseg.Predictor.from_uri(logged["uri"], device="cpu")
    assert list(tmp_path.iterdir()) == []
    assert medseg.Predictor.from_uri(logged["uri"], device="cpu", tracking_uri=logged["tracking_uri"]).model


DATA = "data/medseg_model"


@pytest.mark.parametrize("target", [f"{DATA}/{WEIGHTS_FILE}", f"{DATA}/{MODEL_FILE}", "MLmodel",
                                    "python_model.py", f"{DATA}/extra.pkl"])
def test_a_tampered_model_folder_fails_clearly_and_runs_nothing(logged: dict[str, str], tmp_path: Path,
                                                                target: str, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(logged["folder"], model)
    (model / target).write_bytes(_hostile(marker))
    code = _predict(str(model), logged, tmp_path / "out")
    err = capsys.readouterr().err
    assert not marker.exists(), f"replacing {target} with a pickle ran its code"
    assert code == 1, err  # found but tampered: a failure, not bad usage (exit 2)
    assert f"- {target}: expected" in err and "download or log" in err.lower()
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


# ----------------------------------------------------------------------------------- tamper suite
#: Code planted in a model folder: importing it creates the marker file (the canary).
CANARY = "open({marker!r}, 'w').write('planted code ran')\ndef _load_pyfunc(path):\n    return None\n"


def _tamper(logged: dict[str, str], tmp_path: Path, kind: str, marker: Path) -> tuple[Path, str]:
    """A copy of the logged model with one tampering, and the file ``medseg model check`` must name."""
    model = tmp_path / kind
    shutil.copytree(logged["folder"], model)
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    named = "MLmodel"
    if kind == "loader":  # MLmodel's loader pointing at planted code
        (model / "code").mkdir()
        (model / "code" / "canary_loader.py").write_text(CANARY.format(marker=str(marker)))
        pyfunc.update(loader_module="canary_loader", code="code")
    elif kind == "code":  # medseg's loader kept, a code/ folder MLflow puts first on sys.path
        (model / "code").mkdir()
        for module in ("onnxruntime", "openvino", "canary_loader"):  # what a loader might import next
            (model / "code" / f"{module}.py").write_text(CANARY.format(marker=str(marker)))
        pyfunc["code"] = "code"
        named = "code"
    elif kind == "pickle":  # a pickled python_model beside medseg's loader
        (model / "python_model.pkl").write_bytes(_hostile(marker))
        pyfunc["python_model"] = "python_model.pkl"
        named = "python_model.pkl"
    elif kind == "onnx":  # a graph that is not the weights', where a medseg export keeps its own
        _foreign_graph(model / DATA / "network.onnx")
        named = f"{DATA}/network.onnx"
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return model, named


def _foreign_graph(path: Path) -> Path:
    """A valid ONNX graph that is not the model's: constant zeros of the network's output shape."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "zero"], ["scaled"]),
         helper.make_node("Concat", ["scaled", "scaled", "scaled"], ["output"], axis=1)],
        "foreign", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "x", "y", "z"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, "x", "y", "z"])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


TAMPERINGS = ["loader", "code", "pickle", "onnx"]


@pytest.mark.parametrize("kind", TAMPERINGS)
def test_model_check_names_each_tampering_and_medseg_predict_runs_none(
        logged: dict[str, str], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnx")
    marker = tmp_path / "marker"
    model, named = _tamper(logged, tmp_path, kind, marker)

    assert main(["model", "check", str(model)]) == 1
    err = capsys.readouterr().err
    assert f"- {named}: expected" in err and "fix:" in err, err
    assert _predict(str(model), logged, tmp_path / "out", "--backend", "onnxruntime") == 1
    assert f"- {named}: expected" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match=f"- {named}: expected"):
        medseg.Predictor.from_uri(str(model), device="cpu", backend="onnxruntime")
    assert not marker.exists(), f"the {kind} tampering ran its planted code"
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


@pytest.mark.parametrize("kind", ["code", "pickle", "onnx"])
def test_mlflow_pyfunc_load_of_a_tampered_medseg_model_is_refused_by_its_loader(
        logged: dict[str, str], tmp_path: Path, kind: str) -> None:
    # MLflow imports the loader MLmodel names: with medseg's loader kept, the loader checks the
    # folder first and refuses it; a loader pointing elsewhere is what `medseg model check` is for.
    pytest.importorskip("onnx")
    marker = tmp_path / "marker"
    model, named = _tamper(logged, tmp_path, kind, marker)
    with pytest.raises(ModelLoadError, match=f"- {named}: expected"):
        mlflow.pyfunc.load_model(str(model))
    assert not marker.exists(), f"the {kind} tampering ran its planted code"
    assert not [p for p in sys.path if p.startswith(str(model))], "the model's code folder stayed on sys.path"


def test_model_check_passes_the_logged_model_by_uri_and_names_its_files(logged: dict[str, str],
                                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["model", "check", logged["uri"], "--tracking-uri", logged["tracking_uri"]]) == 0
    out = capsys.readouterr().out
    assert "as medseg wrote it (mlflow); 3 file(s) match" in out
    assert f"{DATA}/{WEIGHTS_FILE}  sha256" in out and "wheels/medseg-" in out


def test_a_forged_export_cache_entry_is_exported_again_never_run(logged: dict[str, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from medseg.engine import backends

    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    files = read_model_folder(Path(logged["folder"]))
    entry = tmp_path / "cache" / "exports" / files.weights_sha256
    forged = _foreign_graph(entry / "network.onnx")
    # what the old cache trusted: the digest the file itself records, forged to match these weights
    import onnx

    graph = onnx.load(str(forged))
    graph.metadata_props.add(key=backends.DIGEST_KEY, value="0" * 64)
    onnx.save(graph, str(forged))
    (entry / "export.json").write_text(json.dumps({"sha256": "0" * 64, "network_digest": "forged"}))
    entry.chmod(0o777)
    forged_sha = file_sha256(forged)

    out = tmp_path / "out"
    assert _predict(logged["uri"], logged, out, "--backend", "onnxruntime") == 0
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["backend"] == "onnxruntime"
    (graph_sha,) = summary["graph_sha256"]
    assert graph_sha == file_sha256(entry / "network.onnx") != forged_sha
    assert json.loads((entry / "export.json").read_text())["sha256"] == graph_sha
    assert entry.stat().st_mode & 0o777 == 0o700 and (tmp_path / "cache" / "exports").stat().st_mode & 0o077 == 0
    reference = medseg.Predictor.from_uri(logged["uri"], device="cpu", backend="torch",
                                          tracking_uri=logged["tracking_uri"]).predict(Path(logged["inputs"]) / "scan.nii.gz")
    assert (np.asarray(nib.load(out / "scan.nii.gz").dataobj) == reference.label_map).mean() > 0.999


def test_an_exported_folder_runs_its_graph_only_while_the_pinned_hash_matches(logged: dict[str, str], tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    exported = tmp_path / "exported"
    graph = medseg.export_model(logged["uri"], exported, "onnx", tracking_uri=logged["tracking_uri"])
    pinned = json.loads((exported / MODEL_FILE).read_text())["files"]["network.onnx"]
    assert pinned == file_sha256(graph)
    assert main(["model", "check", str(exported)]) == 0
    predictor = medseg.Predictor.from_uri(str(exported), device="cpu", backend="onnxruntime")
    assert predictor.model.networks[0].onnx_path == graph and predictor.model.networks[0].sha256 == pinned

    _foreign_graph(graph)  # swapped after export
    capsys.readouterr()
    assert main(["model", "check", str(exported)]) == 1
    assert f"- network.onnx: expected sha256 {pinned}; found sha256 {file_sha256(graph)}" in capsys.readouterr().err
    # the backend's own check, should a graph change between the folder's check and its loading
    from medseg.engine.backends import backend_network
    from medseg.tasks.registry import get_task

    files = read_model_folder(Path(logged["folder"]))
    rebuilt = network_from_spec(files.network_spec)
    rebuilt.load_state_dict(files.state_dict)
    example, dynamic = get_task("segmentation").export_example(files.contract)
    wrapped = backend_network(rebuilt.eval(), "onnxruntime", example, tmp_path / "work", onnx_path=graph,
                              onnx_sha256=pinned, dynamic_spatial=dynamic)
    assert wrapped.onnx_path == tmp_path / "work" / "network.onnx" and wrapped.sha256 != file_sha256(graph)


def test_an_ensemble_or_init_from_pointing_at_a_tampered_model_runs_nothing(logged: dict[str, str],
                                                                           tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(logged["folder"], model)
    (model / DATA / WEIGHTS_FILE).write_bytes(_hostile(marker))
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "ensemble.json").write_text(json.dumps({"models": [logged["uri"], str(model)]}))
    with pytest.raises(ModelLoadError, match=r"weights.safetensors: expected sha256 \w+; found sha256"):
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

    save_file({k: torch.zeros_like(v) for k, v in files.state_dict.items()}, str(model / DATA / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"weights.safetensors: expected sha256 \w+; found sha256"):
        read_model_folder(model)
