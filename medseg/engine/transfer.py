"""Start a network from an earlier model's weights (``model.init_from``), for every task.

Transfer learning (classification), fine-tuning after pretraining, and the planner's race, whose
winner goes on from the weights it trained while racing. Only tensors and JSON are read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from medseg.engine.model_format import local_model_folder, read_model_folder
from medseg.engine.models import ModelError
from medseg.io import safe_tree

log = logging.getLogger(__name__)


def pretrained_state(ref: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict behind ``ref``: a ``.safetensors`` file (a medseg checkpoint or a bare state
    dict), or a medseg model (``runs:/<id>/model``, ``models:/<name>@<alias>``, a model folder).

    Only tensors and JSON are read. A pickled ``.pt``/``.pth`` file is refused with the command
    that converts it, since unpickling a file can run code.
    """
    path = Path(ref)
    if path.is_file() and path.suffix in (".pt", ".pth", ".pkl", ".bin"):
        raise ModelError(f"model.init_from {ref}: a pickled PyTorch file, which medseg does not load (unpickling "
                         "runs whatever code the file holds). If you trust where it came from, convert it once: "
                         f"`medseg model convert {ref} --out {path.with_suffix('.safetensors')}`")
    if path.is_file():
        try:
            loaded = safe_tree.load(path)
        except safe_tree.SafeTreeError as err:
            raise ModelError(f"model.init_from {err}") from err
        state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"model.init_from {ref}: holds no state dict (expected a medseg checkpoint or a "
                             "safetensors file of a model's state_dict())")
        return state
    import mlflow

    if tracking_uri and not path.exists():
        mlflow.set_tracking_uri(tracking_uri)
    with local_model_folder(ref) as (folder, _):
        return read_model_folder(folder, ref).state_dict


def initialise_from(model: nn.Module, ref: str, tracking_uri: str | None = None) -> dict[str, list[str]]:
    """Copy every tensor of ``ref`` whose name and shape match ``model``; the rest start fresh.

    A head for another number of classes is thus re-initialised, which is what fine-tuning on a
    new label set needs.

    Returns:
        ``{"loaded": [...], "fresh": [...]}`` tensor names.

    Raises:
        ModelError: nothing matches (a different architecture), or ``ref`` cannot be read.
    """
    source = pretrained_state(ref, tracking_uri)
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ModelError(f"model.init_from {ref}: none of its {len(source)} tensors matches this model by name and "
                         "shape; it was trained with another architecture (check model.name, widen_factor, stem)")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(set(own) - set(matched))
    log.info("model.init_from %s: %d tensors loaded, %d start fresh%s", ref, len(matched), len(fresh),
             f" ({', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''})" if fresh else "")
    return {"loaded": sorted(matched), "fresh": fresh}
