"""Transfer learning: start from an earlier model's weights (:mod:`medseg.engine.transfer`), optionally
with frozen layers."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from medseg.engine.models import ModelError
from medseg.engine.transfer import initialise_from, pretrained_state
from medseg.tasks.classification.networks import head_prefix

__all__ = ["BACKBONE", "freeze", "initialise_from", "pretrained_state"]

BACKBONE = "backbone"


def freeze(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Stop gradients for every parameter under the given name prefixes (``backbone``: all but the head).

    Returns:
        Names of the frozen parameters.

    Raises:
        ModelError: a prefix that names no parameter (with the closest module name).
    """
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for prefix in prefixes:
        if prefix == BACKBONE:
            head = head_prefix(model)
            chosen.update(n for n in names if not n.startswith(head + "."))
            continue
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            modules = sorted({n.split(".")[0] for n in names})
            hint = difflib.get_close_matches(prefix, modules, n=1)
            raise ModelError(f"model.freeze: {prefix!r} names no parameter{f'; did you mean {hint[0]!r}?' if hint else ''}"
                             f" Top-level modules: {modules}, or 'backbone' for all but the head")
        chosen.update(hits)
    for name, parameter in model.named_parameters():
        if name in chosen:
            parameter.requires_grad_(False)
    if chosen and len(chosen) == len(names):
        raise ModelError("model.freeze leaves nothing to train; freeze fewer layers")
    return sorted(chosen)
