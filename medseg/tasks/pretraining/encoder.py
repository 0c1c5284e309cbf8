"""Which tensors of a pretraining network are its encoder, and the pretrained-weights file ``model.init_from`` reads.

The file is a plain safetensors state dict (tensor names as the segmentation or classification
network has them)
with a JSON sidecar of the same name: what it holds, the network it came from and the pretraining
run. :func:`medseg.engine.transfer.initialise_from` reads the sidecar and then insists that every
tensor of the file finds its match, so a fine-tuning network of another shape fails loudly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.networks.layers import SkipConnection
from monai.networks.nets import DynUNet, UNet
from safetensors.torch import save_file
from torch import nn

from medseg.engine.transfer import PRETRAINED_KIND, provenance_path
from medseg.errors import ModelError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.tasks.pretraining.image_encoder import MaskedImageAutoencoder


@dataclass(frozen=True)
class PretrainedWeights:
    """What the package stage of a pretraining run wrote.

    Attributes:
        weights: the safetensors state dict ``model.init_from`` takes.
        metadata: its JSON sidecar (``<weights>.json``).
        tensors: the names of the tensors it holds.
    """

    weights: Path
    metadata: Path
    tensors: tuple[str, ...]


def _unet_parts(net: UNet) -> tuple[list[nn.Module], list[nn.Module]]:
    """MONAI's UNet nests ``Sequential(down, SkipConnection(inner), up)`` per level down to the
    bottom layer: the encoder is every ``down`` and the bottom; the head is the outermost ``up``."""
    level = net.model
    encoder: list[nn.Module] = []
    while isinstance(level, nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
        encoder.append(level[0])
        level = level[1].submodule
    encoder.append(level)  # the bottom layer
    outermost = net.model
    if not isinstance(outermost, nn.Sequential):
        raise ModelError(f"pretraining: MONAI's UNet no longer nests Sequential levels ({type(outermost).__name__})")
    return encoder, [outermost[2]]


def _dynunet_parts(net: DynUNet) -> tuple[list[nn.Module], list[nn.Module]]:
    heads: list[nn.Module] = [net.output_block, *getattr(net, "deep_supervision_heads", [])]
    return [net.input_block, net.downsamples, net.bottleneck], heads


def network_parts(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(encoder modules, output-head modules) of a segmentation U-Net or of a classification network's
    masked autoencoder (whose head is its decoder: the classifier has no use for it).

    Raises:
        ModelError: a network whose encoder medseg does not know.
    """
    if isinstance(net, UNet):
        return _unet_parts(net)
    if isinstance(net, DynUNet):
        return _dynunet_parts(net)
    if isinstance(net, MaskedImageAutoencoder):
        return net.encoder_modules(), [net.decoder()]
    raise ModelError(f"pretraining: no encoder is known for {type(net).__name__}; pretrain a unet, a dynunet or a "
                     "classification network (medseg.tasks.pretraining.config.PRETRAINED_IMAGE_NETWORKS)")


def _names_of(net: nn.Module, modules: Iterable[nn.Module]) -> set[str]:
    """State-dict names of every tensor the modules own, under every alias the network registers
    (DynUNet reaches its blocks twice, as ``downsamples`` and through ``skip_layers``)."""
    owned = {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
    return {name for name, tensor in net.state_dict(keep_vars=True).items() if id(tensor) in owned}


def transferred_names(net: nn.Module, transfer: str) -> list[str]:
    """The tensors a pretraining run hands on: the encoder's, or (``all``) everything but the head."""
    encoder, head = network_parts(net)
    if transfer == "encoder":
        return sorted(_names_of(net, encoder))
    return sorted(set(net.state_dict()) - _names_of(net, head))


def write_pretrained(net: nn.Module, transfer: str, folder: Path, about: dict[str, Any]) -> PretrainedWeights:
    """Write ``folder/pretrained.safetensors`` (the chosen tensors of ``net``) and its JSON sidecar.

    Args:
        net: the trained pretraining network.
        transfer: ``encoder`` or ``all``.
        folder: where the two files go (created).
        about: what the sidecar records beside the tensor list (run id, network config, data).
    """
    names = transferred_names(net, transfer)
    state = net.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "pretrained.safetensors"
    tensors = {name: state[name].detach().cpu().contiguous() for name in names}
    with atomic_path(weights) as tmp:  # a plain state dict: any safetensors reader loads it
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    sidecar = {"kind": PRETRAINED_KIND, "transfer": transfer, "tensors": names,
               "shapes": {name: list(state[name].shape) for name in names}, **about}
    metadata = atomic_write_text(provenance_path(weights), json.dumps(sidecar, indent=2, default=str))
    return PretrainedWeights(weights, metadata, tuple(names))

