"""How a medseg model lies in an MLflow model folder: names shared by the code that logs it
(:meth:`medseg.tracking.MlflowTracker.log_model`) and the code that checks it before anything loads
it (:mod:`medseg.engine.model_check`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: The pyfunc loader every medseg MLflow model names: a module of the installed medseg (no code is logged).
LOADER_MODULE = "medseg.serving.pyfunc_loader"
#: Where the model folder (``medseg_model.json``, ``weights.safetensors``) lies: the pyfunc's ``data`` entry.
MLFLOW_DATA_FOLDER = "data/medseg_model"
#: ``MLmodel`` metadata key holding the sha256 of each file logged with the model (path -> sha256).
FILES_METADATA_KEY = "medseg_files"
#: Where the bundled medseg wheel lies, named by this relative path in ``requirements.txt``.
WHEELS_FOLDER = "wheels"
#: The medseg model folder's files: its contract and network spec (JSON), and its weights.
MODEL_FILE = "medseg_model.json"
WEIGHTS_FILE = "weights.safetensors"
#: Where models logged "from code" (before the no-code pyfunc) kept the model folder.
LEGACY_ARTIFACTS_FOLDER = "artifacts"


def model_folder_of(path: Path) -> Path | None:
    """The folder holding ``medseg_model.json`` in a model folder (itself, or its MLflow model's
    ``data/medseg_model/``, or ``artifacts/`` of a model logged from code)."""
    for candidate in (path, path / MLFLOW_DATA_FOLDER, path / LEGACY_ARTIFACTS_FOLDER):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    return None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
