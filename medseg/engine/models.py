"""The one model registry: networks by (task, name), each a thin factory over a MONAI network.

Tasks fill it at import (timm's ``@register_model``); a separate package's task registers its
networks the same way. :func:`list_models` answers what a config's ``model.name`` may be.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from medseg.errors import ModelError

#: A factory's arguments are its task's: (model config, in channels, outputs, input size) for
#: segmentation and classification, (model config, acquisition) for reconstruction.
ModelFactory = Callable[..., nn.Module]
MODEL_REGISTRY: dict[tuple[str, str], ModelFactory] = {}


def register_model(task: str, name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory`` as ``model.name: name`` for ``task``."""

    def add(factory: ModelFactory) -> ModelFactory:
        MODEL_REGISTRY[(task, name)] = factory
        return factory

    return add


def list_models(task: str | None = None) -> list[str]:
    """Registered ``model.name`` values of ``task`` (sorted), or ``task/name`` of every task."""
    if task is None:
        return sorted(f"{t}/{n}" for t, n in MODEL_REGISTRY)
    return sorted(n for t, n in MODEL_REGISTRY if t == task)


def create_model(task: str, name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``(task, name)`` with the factory's arguments.

    Raises:
        ModelError: no such network for this task; the message suggests the closest and lists all.
    """
    factory = MODEL_REGISTRY.get((task, name))
    if factory is None:
        known = list_models(task)
        hint = difflib.get_close_matches(name, known, n=1)
        elsewhere = sorted(t for t, n in MODEL_REGISTRY if n == name)
        where = f" (it is a {' / '.join(elsewhere)} network)" if elsewhere else ""
        raise ModelError(f"model.name {name!r} is not a {task} network{where}"
                         f"{f'; did you mean {hint[0]!r}?' if hint else '.'} Registered for {task}: {known}")
    return factory(*args, **kwargs)
