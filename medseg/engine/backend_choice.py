"""Which backend runs a loaded model's networks (torch, ONNX Runtime, OpenVINO), the cache of graphs
exported for it, and the graphs' hashes in a batch's summary."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from medseg.engine import backends
from medseg.engine.backends import EXPORTED_NAME, backend_network
from medseg.engine.model_format import model_folder_of, pinned_files
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import BatchReport
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_write_text
from medseg.tracking.wheel import cache_root, private_folder

log = logging.getLogger(__name__)


class Exportable(Protocol):
    """What a task tells the exporter (``Task.export_example``)."""

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]: ...


def export_cache_dir() -> Path:
    """Where networks exported for a backend are kept (``$MEDSEG_CACHE_DIR/exports``, else
    ``~/.cache/medseg/exports``): a folder only this user may enter (0700), one subfolder per
    weights' sha256, so a graph there was made by this user from weights whose hash was verified."""
    return private_folder(cache_root() / "exports")


def _plain_layout(network: torch.nn.Module) -> torch.nn.Module:
    """A copy with contiguous parameters: channels-last is a torch speed-up, not part of the graph."""
    plain = copy.deepcopy(network)
    for tensor in (*plain.parameters(), *plain.buffers()):
        tensor.data = tensor.data.contiguous()
    return plain


#: ``--backend auto`` on a CPU: the first of these that is installed, in the order that
#: benchmarks/results/predict.md measured (``make bench-predict``, 2-core CPU): OpenVINO at least
#: as fast as torch (1.12x on the hippocampus model, 1.03x on the CT workload), ONNX Runtime slower
#: than torch on both (0.76x, 0.89x), so it is never chosen automatically.
BACKEND_PREFERENCE = ("openvino", "torch")
#: The environment variable that sets the default backend (the test suite pins ``torch``).
BACKEND_ENV = "MEDSEG_BACKEND"
#: The backend when none is named: the fastest measured one that is installed (OpenVINO comes with
#: ``pip install 'medseg[openvino]'``; the lean default install runs torch). Its masks equalled
#: torch's on the 52 hippocampus test scans (predict.md).
DEFAULT_BACKEND = "auto"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend ``backend`` names; ``auto`` (the default) is the fastest installed for ``device``."""
    chosen = backend or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    if chosen != "auto":
        return chosen
    if device.type != "cpu":
        return "torch"  # the exported graphs run on the CPU here; CUDA stays with torch
    installed = set(backends.available_backends())  # looked up at call time: tests replace it
    return next(b for b in BACKEND_PREFERENCE if b in installed or b == "torch")


def on_backend(model: LoadedModel, task: Exportable, backend: str, automatic: bool = False) -> LoadedModel:
    """``model`` with each member's network running on ``backend`` (itself for ``torch``).

    A network that cannot be exported runs on torch, with a warning, when the backend was chosen
    automatically; named explicitly, the error is raised."""
    if backend == "torch":
        return model
    contracts = model.member_contracts or (model.contract,) * len(model.networks)
    networks = []
    for index, (network, contract) in enumerate(zip(model.networks, contracts)):
        # a `medseg export` folder brings its own graph (uris and networks pair up one to one), run
        # only while it has the sha256 its medseg_model.json pinned at export
        local = model_folder_of(Path(model.uris[index])) if len(model.uris) == len(model.networks) else None
        exported = local / EXPORTED_NAME if local is not None and (local / EXPORTED_NAME).is_file() else None
        pinned = pinned_files(local).get(EXPORTED_NAME) if local is not None else None
        weights = model.weights_sha256[index] if index < len(model.weights_sha256) else f"member{index}"
        try:
            example, dynamic = task.export_example(contract)  # a task may not export at all (reconstruction)
            networks.append(backend_network(_plain_layout(network), backend, example, export_cache_dir() / weights,
                                            onnx_path=exported, onnx_sha256=pinned, dynamic_spatial=dynamic))
        except MedsegError as err:
            if not automatic:
                raise
            log.warning("backend %s is not usable for this model (%s); predicting with torch", backend, err)
            return model
    return replace(model, networks=tuple(networks), backend=backend)


def graph_hashes(model: LoadedModel) -> list[str]:
    """The sha256 of each exported graph ``model`` runs (checked before it ran); [] on torch."""
    return [str(getattr(network, "sha256", "")) for network in model.networks if hasattr(network, "sha256")]


def record_graphs(report: BatchReport, model: LoadedModel) -> BatchReport:
    """Add the graphs that ran (``graph_sha256``) to the report's summary, beside the weights' hashes."""
    hashes = graph_hashes(model)
    if hashes and report.summary.is_file():
        summary = report.summary_dict()
        summary["graph_sha256"] = hashes
        atomic_write_text(report.summary, json.dumps(summary, indent=2))
    return report
