"""The pyfunc loader that every medseg MLflow model names (``loader_module`` in its ``MLmodel``).

``mlflow.pyfunc.load_model`` and ``mlflow models serve`` import this module from the installed
medseg and call :func:`_load_pyfunc` with the model's ``data/medseg_model`` folder: nothing in the
model folder is imported or unpickled. The whole model folder is checked first
(:func:`medseg.engine.model_check.require_untampered`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from medseg.engine.model_check import require_untampered
from medseg.errors import ModelLoadError
from medseg.serving.pyfunc import MedsegPyfunc
from medseg.tracking.model_layout import MLFLOW_DATA_FOLDER


def model_root(data_path: str | Path) -> Path:
    """The MLflow model's root above its ``data/medseg_model`` folder (``data_path`` itself otherwise)."""
    data = Path(data_path)
    depth = len(Path(MLFLOW_DATA_FOLDER).parts)
    return data.parents[depth - 1] if data.as_posix().endswith(MLFLOW_DATA_FOLDER) else data


def _load_pyfunc(data_path: str) -> MedsegPyfunc:
    """MLflow's entry point: the served model over ``data_path``, on the operator's device and limits.

    Raises:
        ModelLoadError: the model folder was tampered with (each finding named) or is damaged.
    """
    root = model_root(data_path)
    try:
        require_untampered(root, str(root))
    except ModelLoadError:
        # MLflow put a tampered model's code folder first on sys.path before calling this loader:
        # take it off, so that no later import in this process finds a module there
        inside = str(root.resolve())
        sys.path[:] = [p for p in sys.path if not str(Path(p).resolve()).startswith(inside)]
        raise
    return MedsegPyfunc(root)
