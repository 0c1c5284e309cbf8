"""Checkpoints: ``.safetensors`` files (tensors, plus the structure as JSON in the header),
written atomically and read without unpickling anything (:mod:`medseg.io.safe_tree`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medseg.errors import RunError, cause_text
from medseg.io import safe_tree


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` via a temp file, flushed to disk before the rename, so neither a
    killed process nor a crashed machine leaves a torn checkpoint."""
    try:
        return safe_tree.save(path, state, durable=True)
    except Exception as err:  # disk full, quota, read-only: safetensors raises its own error type too
        if isinstance(err, RunError):
            raise
        raise RunError(f"checkpoint {path}: could not be written ({cause_text(err)}). The previous checkpoint is "
                       "intact; free space (or fix the folder's permissions), then continue with "
                       f"`medseg run CONFIG --resume {path.parent.parent}`.") from err


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only).

    Raises:
        FileNotFoundError: no checkpoint there.
        RunError: the file is not a medseg checkpoint (truncated, corrupt, or a pickle).
    """
    if not path.is_file():
        pickled = path.with_suffix(".pt")
        hint = (f" {pickled} is a pickled checkpoint of an older medseg, which is not loaded: start a new run"
                if pickled.is_file() else " Train first, or point at an existing run directory.")
        raise FileNotFoundError(f"Checkpoint not found: {path}.{hint}")
    try:
        state = safe_tree.load(path, device=map_location)
    except safe_tree.SafeTreeError as err:
        raise RunError(f"checkpoint {err}. Resume from an earlier run, or start a new one") from err
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path}: holds {type(state).__name__}, expected medseg's checkpoint dict")
    return state


def _np_state(state: tuple) -> dict[str, Any]:
    return {"keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
            "has_gauss": int(state[3]), "cached": float(state[4])}


def _np_tuple(state: dict[str, Any]) -> tuple:
    return ("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as tensors and plain values.

    Augmentation needs no state here: each sample is drawn from seeds of its own position
    (:mod:`medseg.data.sampling`), and torch is reseeded every step; these are kept so code
    outside the training step also continues where it stopped.
    """
    return {
        "python": repr(random.getstate()),
        # numpy's stubs type the argument-less call as the legacy=False overload (a dict); the global
        # RandomState is MT19937, whose legacy state is the tuple
        "numpy": _np_state(cast("tuple[Any, ...]", np.random.get_state(legacy=True))),
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(_tuples(ast.literal_eval(state["python"])))
    np.random.set_state(_np_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])


def _tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value
