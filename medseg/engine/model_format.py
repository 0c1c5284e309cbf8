"""medseg's model format: weights as ``safetensors``, the network spec and the I/O contract as JSON.

A model folder (what ``medseg run`` logs to MLflow, keeps in ``<run>/model`` and ``medseg export``
writes) holds::

    medseg_model.json      {"format": "medseg-model", "format_version": 1, "network": {...},
                            "contract": {...}, "weights": {"file": ..., "sha256": ...}, ...}
    weights.safetensors    the network's state dict, tensors only

In an MLflow model both sit under ``data/medseg_model/`` (``artifacts/`` in models logged before
medseg 0.1's no-code pyfunc), beside MLflow's ``MLmodel``, whose pyfunc loader is the installed
``medseg.serving.pyfunc_loader`` (see :mod:`medseg.engine.model_check`, which verifies a folder
before anything reads it). medseg itself reads only these two files: loading
rebuilds the network from medseg's own registry (``network.task`` and its config) and copies
tensors into it, so a model folder from a colleague, a registry entry or an ensemble member can
never run code on the machine that loads it. A folder holding only a pickle (an older medseg, or
``mlflow.pytorch``) is refused with the command that converts it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.engine.model_check import require_untampered
from medseg.errors import ModelLoadError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.tracking.model_layout import (
    LEGACY_ARTIFACTS_FOLDER,
    MLFLOW_DATA_FOLDER,
    MODEL_FILE,
    WEIGHTS_FILE,
    file_sha256,
    model_folder_of,
)
from medseg.tracking.sqlite_store import require_existing_store

__all__ = ["LEGACY_ARTIFACTS_FOLDER", "MLFLOW_DATA_FOLDER", "MODEL_FILE", "WEIGHTS_FILE", "file_sha256", "model_folder_of"]  # re-exported: the names loaders import from here

FORMAT_NAME = "medseg-model"
FORMAT_VERSION = 1
#: Files by which an older medseg or ``mlflow.pytorch`` stored a pickled network.
PICKLE_FILES = ("data/model.pth", "data/model.pkl", "model.pth", "model.pkl", "python_model.pkl", "data/pickle_module_info.txt")

#: Rebuilds the bare network a spec describes (``{"task": ..., "name": ..., "config": {...}}``); the
#: task registry provides it (``medseg.tasks.registry.network_from_spec``): the engine knows no task.
NetworkBuilder = Callable[[dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class ModelFiles:
    """A model folder as read from disk: its JSON, and its weights as tensors."""

    folder: Path
    network_spec: dict[str, Any]
    contract: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    weights_sha256: str
    info: dict[str, Any]


def write_model_folder(folder: Path, network: nn.Module, network_spec: dict[str, Any], contract: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> Path:
    """Write ``network``'s weights and its spec and contract into ``folder`` (each file atomically,
    the JSON last, so a folder with a ``medseg_model.json`` is complete).

    Returns:
        The path of ``medseg_model.json``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT_NAME})
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network": network_spec,
        "contract": contract,
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(folder / WEIGHTS_FILE),
                    "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))},
        **(extra or {}),
    }
    return atomic_write_text(folder / MODEL_FILE, json.dumps(info, indent=2))


def pin_file(folder: Path, name: str) -> str:
    """Record the sha256 of ``folder / name`` (an exported graph, say) in the folder's ``medseg_model.json``
    under ``files``, so that :mod:`medseg.engine.model_check` refuses the folder if the file changes.

    Returns:
        The file's sha256.
    """
    folder = Path(folder)
    digest = file_sha256(folder / name)
    info = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    info.setdefault("files", {})[name] = digest
    atomic_write_text(folder / MODEL_FILE, json.dumps(info, indent=2))
    return digest


def pinned_files(folder: Path) -> dict[str, str]:
    """The files a model folder's ``medseg_model.json`` pins besides the weights: name -> sha256."""
    try:
        info = json.loads((Path(folder) / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = info.get("files") if isinstance(info, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def read_model_folder(path: Path, ref: str | None = None) -> ModelFiles:
    """Read a model folder: JSON with ``json``, weights with ``safetensors``; nothing else is opened.

    The folder is checked first (:func:`medseg.engine.model_check.require_untampered`): an MLflow
    model must name medseg's own pyfunc loader and hold no code, and every file must have the hash
    recorded when it was written.

    Raises:
        UsageError: no medseg model there (with the conversion command when it holds a pickle).
        ModelLoadError: the files are there but damaged (bad JSON, truncated weights, wrong hash),
            or the folder was tampered with (the message names each finding and the fix).
    """
    ref = ref or str(path)
    folder = model_folder_of(Path(path))
    if folder is None:
        raise UsageError(_no_model_message(Path(path), ref))
    require_untampered(Path(path), ref)
    model_json = folder / MODEL_FILE
    try:
        info = json.loads(model_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"--model {ref}: {model_json} is not valid JSON ({err}); the model folder is damaged "
                             "or was edited: download or log it again") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"--model {ref}: {model_json} is not a medseg model description "
                             f"(expected \"format\": \"{FORMAT_NAME}\")")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise UsageError(f"--model {ref}: written in model format {info['format_version']} by a newer medseg "
                         f"({info.get('contract', {}).get('medseg_version', '?')}); this medseg reads format "
                         f"{FORMAT_VERSION}: upgrade medseg")
    for key in ("network", "contract", "weights"):
        if not isinstance(info.get(key), dict):
            raise ModelLoadError(f"--model {ref}: {model_json} has no {key!r} object; the file is damaged")
    weights = folder / str(info["weights"].get("file", WEIGHTS_FILE))
    if weights.parent != folder or not weights.is_file():
        raise ModelLoadError(f"--model {ref}: the weights file {weights.name} is missing from {folder}; "
                             "download or log the model again")
    data = _read_bytes(weights, ref)  # read once: hashed, then parsed from memory
    digest = hashlib.sha256(data).hexdigest()
    expected = info["weights"].get("sha256")
    if expected and digest != expected:
        raise ModelLoadError(f"--model {ref}: {weights} has sha256 {digest[:16]}…, but {MODEL_FILE} records "
                             f"{str(expected)[:16]}…: the weights changed after the model was written (corrupt "
                             "download, or replaced). Download or log the model again")
    state = _parse_weights(data, weights, ref)
    return ModelFiles(folder, info["network"], info["contract"], state, digest, info)


def _read_bytes(path: Path, ref: str) -> bytes:
    try:
        return path.read_bytes()
    except MemoryError as err:
        raise ModelLoadError(f"--model {ref}: ran out of memory while reading {path}; free memory or use a "
                             "machine with more") from err


def _parse_weights(data: bytes, path: Path, ref: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except MemoryError as err:
        raise ModelLoadError(f"--model {ref}: ran out of memory while reading {path}; free memory or use a "
                             "machine with more") from err
    except Exception as err:  # safetensors raises its own types for a bad header or a short file
        raise ModelLoadError(f"--model {ref}: {path} is not a readable safetensors file ({type(err).__name__}: "
                             f"{err}); it is truncated or corrupt: download or log the model again") from err


def _no_model_message(path: Path, ref: str) -> str:
    pickled = [name for name in PICKLE_FILES if (path / name).is_file()]
    if pickled:
        return (f"--model {ref}: its {pickled[0]} is a pickled model (an older medseg or mlflow.pytorch), and "
                "medseg does not load pickles: unpickling runs whatever code the file holds. If you trust where it "
                f"came from, convert it once: `medseg model convert {ref} --config <its run's resolved_config.yaml> "
                "--out <new folder>`")
    if (path / "MLmodel").is_file():
        return (f"--model {ref}: an MLflow model without {MODEL_FILE}; only models logged by `medseg run` (or "
                "written by `medseg model convert`) can be used, since inference must not guess")
    return (f"--model {ref}: no {MODEL_FILE} in {path}; give a model folder (<run dir>/model, an artifact download "
            "of runs:/<id>/model, a `medseg export` folder), a finished run folder, or a runs:/ or models:/ URI")


@contextmanager
def local_model_folder(ref: str) -> Iterator[tuple[Path, str | None]]:
    """A local folder holding model ``ref`` and the MLflow run that logged it (None if unknown).

    A local path is used in place; a ``runs:/`` or ``models:/`` URI (``models:/name@alias`` too) is
    downloaded into a temporary folder, removed afterwards. Only files are fetched: MLflow's
    loaders, which would import the model's code, are never called.

    Raises:
        UsageError: the path does not exist, or the URI names nothing in the tracking store.
    """
    local = Path(ref)
    if local.exists():
        local = run_folder_model(local) or local
        yield local, _run_id_of_local(local)
        return
    if not ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://", "file:", "http")):
        raise UsageError(f"--model {ref}: no such folder, and not a model URI (runs:/<run id>/model, "
                         "models:/<name>/<version>, models:/<name>@<alias>)")
    import mlflow

    if ref.startswith(("runs:/", "models:/")):
        require_existing_store(mlflow.get_tracking_uri(), f"--model {ref}")
    tmp = Path(tempfile.mkdtemp(prefix="medseg-model-"))
    try:
        try:
            run_id = _run_id_of_uri(ref)
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(tmp)))
        except UsageError:
            raise
        except Exception as err:  # MLflow raises many types for a missing run/model/alias
            raise UsageError(f"--model {ref}: not found ({type(err).__name__}: {err}). Check the URI and that the "
                             "tracking URI (--tracking-uri or $MLFLOW_TRACKING_URI) points at its store") from err
        yield downloaded, run_id
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_folder_model(folder: Path) -> Path | None:
    """The model a finished ``medseg run`` folder packaged (``<run dir>/model``), when ``folder`` is
    such a run folder rather than a model folder; None otherwise."""
    if model_folder_of(folder) is not None or not (folder / "resolved_config.yaml").is_file():
        return None
    model = folder / "model"
    return model if model_folder_of(model) is not None else None


def _run_id_of_local(folder: Path) -> str | None:
    folder = model_folder_of(folder) or folder
    try:
        info = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
        return str(info.get("run_id")) if isinstance(info, dict) and info.get("run_id") else None
    except (OSError, ValueError):
        return None


def _run_id_of_uri(ref: str) -> str | None:
    """The run that logged the model (MLflow reads its ``MLmodel`` YAML with ``safe_load``)."""
    import mlflow

    return getattr(mlflow.models.get_model_info(ref), "run_id", None)


def build_network(files: ModelFiles, build: NetworkBuilder, ref: str) -> nn.Module:
    """The network ``files`` describe, rebuilt by ``build`` and holding its weights.

    Raises:
        UsageError: the spec names a task or network this medseg does not have.
        ModelLoadError: the weights do not fit the rebuilt network.
    """
    try:
        network = build(files.network_spec)
    except UsageError:
        raise
    except Exception as err:  # ConfigError / ModelError / UnknownTaskError from the registries
        version = files.contract.get("medseg_version", "?")
        raise UsageError(f"--model {ref}: its network cannot be rebuilt here ({type(err).__name__}: {err}). "
                         f"It was written by medseg {version}; install that version, or the package that "
                         "provides its task") from err
    try:
        network.load_state_dict(files.state_dict, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"--model {ref}: its weights do not fit the network its {MODEL_FILE} describes "
                             f"({str(err).splitlines()[0]}); the folder mixes files of two models") from err
    return network
