"""Loading a model for inference: one model or an ensemble (folds, seeds, a parent run's children) that
shares one preprocessing contract; JSON and safetensors only (:mod:`medseg.engine.model_format`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.engine.model_format import NetworkBuilder, local_model_folder, read_model_folder
from medseg.engine.model_format import build_network as build_model_network
from medseg.engine.runtime import to_channels_last, use_channels_last
from medseg.engine.sliding import fold_batch_norms
from medseg.errors import (
    UsageError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One model, or an ensemble (folds, seeds) whose members share one preprocessing contract."""

    networks: tuple[nn.Module, ...]
    contract: dict[str, Any]  # the first member's; the preprocessing every member shares
    uris: tuple[str, ...]
    source_run_ids: tuple[str | None, ...]
    member_contracts: tuple[dict[str, Any], ...] = ()  # each member's own windowing (patch size, overlap)
    weights_sha256: tuple[str, ...] = ()  # each member's weights file: which model made an output
    backend: str = "torch"  # what runs the networks: torch, onnxruntime, openvino

    @property
    def weights_id(self) -> str:
        """One id for the weights of all members (the hash itself for a single model)."""
        if len(self.weights_sha256) == 1:
            return self.weights_sha256[0]
        return hashlib.sha256(",".join(self.weights_sha256).encode()).hexdigest()

    def members(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        contracts = self.member_contracts or (self.contract,) * len(self.networks)
        return list(zip(self.networks, contracts))

    @property
    def task(self) -> str:
        return str(self.contract.get("task", ""))

    @property
    def uri(self) -> str:
        return ",".join(self.uris)

    @property
    def source_run_id(self) -> str | None:
        return self.source_run_ids[0] if len(self.source_run_ids) == 1 else ",".join(r or "" for r in self.source_run_ids)

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.contract.get("labels", {}).items()}


#: Contract entries every member of an ensemble must share: they define the grid and the
#: meaning of the averaged outputs. Patch size and window settings may differ.
ENSEMBLE_KEYS = ("task", "spatial_dims", "in_channels", "channel_names", "labels", "orientation", "spacing",
                 "intensity", "crop_foreground", "resize", "output_activation", "regions", "recon")


def load_model(ref: str, device: torch.device, build: NetworkBuilder) -> LoadedModel:
    """Load a medseg model (``runs:/`` or ``models:/`` URI, ``models:/<name>@<alias>``, or a local
    model folder): its JSON and safetensors only, the network rebuilt by ``build`` from medseg's
    registry (:mod:`medseg.engine.model_format`). Nothing in the folder is imported or unpickled.

    Raises:
        UsageError: the reference names no medseg model (a pickled one is refused, with the
            command that converts it), or a network this medseg cannot build.
        ModelLoadError: the model was found but is damaged (corrupt or truncated file, changed
            weights) or could not be loaded (out of memory).
    """
    with local_model_folder(ref) as (folder, run_id):
        files = read_model_folder(folder, ref)
    contract = files.contract
    if not contract.get("task"):
        raise UsageError(f"--model {ref}: its contract names no task; inference must not guess")
    network = build_model_network(files, build, ref).to(device)
    network = fold_batch_norms(network.eval())
    if use_channels_last(None, int(contract.get("spatial_dims", 3))):  # same values, faster 3D convolutions
        network = to_channels_last(network, 3)
    return LoadedModel((network,), contract, (ref,), (run_id,), weights_sha256=(files.weights_sha256,))


def expand_model_refs(refs: Sequence[str]) -> list[str]:
    """Model references with ensembles spelled out.

    A ``--seeds``/``--folds`` parent run directory (its ``ensemble.json``) or a parent run URI
    ``runs:/<parent id>`` stands for the models of its child runs.

    Raises:
        UsageError: an ensemble that lists no models.
    """
    out: list[str] = []
    for ref in refs:
        local = Path(ref)
        if (local / "ensemble.json").is_file():
            members = json.loads((local / "ensemble.json").read_text()).get("models", [])
            if not members:
                raise UsageError(f"--model {ref}: ensemble.json lists no models; did every child run finish?")
            out.extend(members)
        elif ref.startswith("runs:/") and "/" not in ref[len("runs:/"):].strip("/"):
            out.extend(_child_models(ref[len("runs:/"):].strip("/")) or [ref])
        else:
            out.append(ref)
    return out


def _child_models(parent_run_id: str) -> list[str]:
    """The models of a finished ``--seeds``/``--folds`` parent run's children ([] if not a parent).

    Raises:
        UsageError: the parent has not finished all its children.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from medseg.tracking.sqlite_store import require_existing_store

    require_existing_store(mlflow.get_tracking_uri(), f"--model runs:/{parent_run_id}")
    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except Exception:  # not a run of this store: let the loader report the reference as given
        return []
    if "medseg.repeat" not in parent.data.tags:
        return []
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  order_by=["attributes.run_name ASC"])
    models = [c.data.tags["medseg.model_uri"] for c in children if c.data.tags.get("medseg.model_uri")]
    expected = int(parent.data.tags.get("medseg.repeat_count", len(models)))
    if parent.info.status != "FINISHED" or len(models) < expected:
        run_dir = parent.data.tags.get("run_dir", "<parent run dir>")
        raise UsageError(f"--model runs:/{parent_run_id}: {len(models)} of {expected} child models exist and the "
                         f"parent run is {parent.info.status}; finish it with `medseg run CONFIG --resume {run_dir} "
                         f"--{parent.data.tags['medseg.repeat']} {expected}` first")
    return models


def load_models(refs: str | Sequence[str], device: torch.device, build: NetworkBuilder) -> LoadedModel:
    """Load one model or an ensemble (several references, a parent run or its directory).

    Raises:
        UsageError: a member cannot be found, or members disagree on their preprocessing contract.
        ModelLoadError: a member was found but could not be loaded.
    """
    expanded = expand_model_refs([refs] if isinstance(refs, str) else list(refs))
    if not expanded:
        raise UsageError("--model: no model given")
    members = [load_model(ref, device, build) for ref in expanded]
    first = members[0]
    for member in members[1:]:
        for key in ENSEMBLE_KEYS:
            if member.contract.get(key) != first.contract.get(key):
                raise UsageError(f"--model {member.uri}: its {key} {member.contract.get(key)!r} differs from "
                                 f"{first.contract.get(key)!r} of {first.uri}; an ensemble averages models trained "
                                 "with the same preprocessing and labels (the folds or seeds of one config)")
    return LoadedModel(tuple(n for m in members for n in m.networks), first.contract,
                       tuple(u for m in members for u in m.uris), tuple(r for m in members for r in m.source_run_ids),
                       tuple(m.contract for m in members), tuple(h for m in members for h in m.weights_sha256))
