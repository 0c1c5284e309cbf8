"""Start a network from an earlier model's weights (``model.init_from``), for every task.

Transfer learning (classification), fine-tuning after pretraining, and the planner's race, whose
winner goes on from the weights it trained while racing. Only tensors and JSON are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.engine.model_format import local_model_folder, read_model_folder
from medseg.engine.models import ModelError
from medseg.io import safe_tree
from medseg.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: ``kind`` in the JSON sidecar of a pretraining run's weights (``medseg pretrain``): every tensor of
#: such a file must find its match, since it holds only what was meant to be transferred.
PRETRAINED_KIND = "medseg.pretrained_weights"


def provenance_path(weights: Path) -> Path:
    """The JSON sidecar of a weights file: ``pretrained.safetensors`` -> ``pretrained.json``."""
    return Path(weights).with_suffix(".json")


def read_provenance(ref: str) -> dict[str, Any] | None:
    """The sidecar of ``ref`` when it is a pretraining run's weights file, else None.

    Raises:
        ModelError: the sidecar exists but is not JSON.
    """
    path = Path(ref)
    sidecar = provenance_path(path)
    if path.suffix != ".safetensors" or not sidecar.is_file():
        return None
    try:
        about = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"model.init_from {ref}: its sidecar {sidecar} is not readable JSON ({err}). Expected: the "
                         "file `medseg pretrain` wrote beside the weights. Fix: copy both files again") from err
    return about if isinstance(about, dict) and about.get("kind") == PRETRAINED_KIND else None


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
    about = read_provenance(ref)
    if about is not None and len(matched) < len(source):
        _refuse_partial_match(ref, source, own, about)
    if not matched:
        raise ModelError(f"model.init_from {ref}: none of its {len(source)} tensors matches this model by name and "
                         "shape; it was trained with another architecture (check model.name, widen_factor, stem)")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(set(own) - set(matched))
    log.info("model.init_from %s: %d tensors loaded, %d start fresh%s", ref, len(matched), len(fresh),
             f" ({', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''})" if fresh else "")
    return {"loaded": sorted(matched), "fresh": fresh}


#: The model-section keys that say which network a pretraining run trained (U-Nets: the first six;
#: whole-image networks: name, spatial_dims, widen_factor, stem, norm).
_ARCHITECTURE_KEYS = ("name", "channels", "strides", "kernels", "num_res_units", "norm", "spatial_dims",
                      "widen_factor", "stem")
#: Of those, the ones whose mismatch tensor shapes can miss: resnet18's tensors all fit a resnet34,
#: a small stem's a strided one's; a network of another name or stem is not the one that was pretrained.
_SAME_NETWORK_KEYS = ("name", "spatial_dims", "stem")


def check_pretrained_network(ref: str, model: Any) -> None:
    """Refuse pretrained weights (``medseg pretrain``'s file, known by its sidecar) for a network of
    another name, dimensionality or stem than the one pretrained, even where every tensor would fit.

    Args:
        ref: the ``model.init_from`` value; anything but a pretraining run's weights is let through.
        model: the fine-tuning run's model section.

    Raises:
        ModelError: Expected (the pretrained network) / Got (this one) / File / Fix.
    """
    about = read_provenance(ref)
    if about is None:
        return
    pretrained = (about.get("network") or {}).get("model", {})
    differ = [key for key in _SAME_NETWORK_KEYS if key in pretrained and hasattr(model, key)
              and str(pretrained[key]) != str(getattr(model, key))]
    if differ:
        expected = {k: pretrained[k] for k in _ARCHITECTURE_KEYS if k in pretrained}
        got = ", ".join(f"model.{k}: {getattr(model, k)}" for k in differ)
        raise ModelError(
            f"model.init_from {ref}: these weights were pretrained for another network ({got}). Expected: the "
            f"network that was pretrained ({expected}). Got: {got}. File: {ref} (pretraining run "
            f"{about.get('run_id')}). Fix: give the fine-tuning run the pretraining run's model section, or pretrain "
            "again with this one")


def _refuse_partial_match(ref: str, source: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                          about: dict[str, Any]) -> None:
    """A pretraining file holds only what is meant to transfer: a tensor that finds no match means
    the fine-tuning network is not the one that was pretrained."""
    missing = sorted(k for k in source if k not in own)
    reshaped = sorted(k for k in source if k in own and tuple(own[k].shape) != tuple(source[k].shape))
    shown = [f"{k} {list(source[k].shape)} -> {list(own[k].shape)}" for k in reshaped[:4]] + missing[:4]
    model = (about.get("network") or {}).get("model", {})
    pretrained = {k: model.get(k) for k in _ARCHITECTURE_KEYS if k in model}
    raise ModelError(
        f"model.init_from {ref}: {len(missing) + len(reshaped)} of its {len(source)} pretrained tensors do not fit "
        f"this network ({len(reshaped)} of another shape, {len(missing)} absent: {'; '.join(shown)}). "
        f"Expected: the network that was pretrained ({pretrained}, in channels {about.get('in_channels')}). "
        f"Got: this config's model section. File: {ref} (pretraining run {about.get('run_id')}). "
        "Fix: give the fine-tuning run the pretraining run's model section, or pretrain again with this one")


def record_transfer(ref: str, report: dict[str, list[str]], run_dir: Path, tracker: Any) -> dict[str, str]:
    """Write ``init_from.json`` (which tensors were loaded, which start fresh, where they came from)
    into ``run_dir``, log it, and tag the run with its source and, for pretrained weights, the
    pretraining run; returns the tags."""
    about = read_provenance(ref) or {}
    record = {"init_from": ref, "pretraining_run_id": about.get("run_id"), "transfer": about.get("transfer"),
              "loaded": report["loaded"], "fresh": report["fresh"]}
    path = atomic_write_text(run_dir / "init_from.json", json.dumps(record, indent=2))
    tracker.log_artifact(path)
    tags = {"medseg.init_from": ref, "medseg.init_from.loaded_tensors": str(len(report["loaded"])),
            "medseg.init_from.fresh_tensors": str(len(report["fresh"]))}
    if about.get("run_id"):
        tags["medseg.pretraining_run_id"] = str(about["run_id"])
    tracker.set_tags(tags)
    return tags
