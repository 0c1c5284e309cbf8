"""Which tasks exist: medseg's own, plus any a separate package registers.

A task is found by name. medseg's own are listed here; another package adds one through the
``medseg.tasks`` entry-point group of its ``pyproject.toml``::

    [project.entry-points."medseg.tasks"]
    detection = "my_package.detection:TASK"

The object the entry point names must satisfy :class:`medseg.tasks.base.Task`.
"""

from __future__ import annotations

import difflib
import importlib
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from torch import nn

from medseg.config import RunConfig, read_config_file
from medseg.config import validate_config as validate_as
from medseg.config.paths import PathKind, path_keys
from medseg.errors import ConfigError, UnknownTaskError
from medseg.tasks.base import Task

#: Entry-point group through which other packages add tasks.
ENTRY_POINT_GROUP = "medseg.tasks"

#: medseg's own tasks: name -> "module:attribute" of the task object.
BUILTIN_TASKS = {
    "segmentation": "medseg.tasks.segmentation:TASK",
    "classification": "medseg.tasks.classification:TASK",
    "reconstruction": "medseg.tasks.reconstruction:TASK",
    "regression": "medseg.tasks.regression:TASK",
    "detection": "medseg.tasks.detection:TASK",
    "pretraining": "medseg.tasks.pretraining:TASK",
}

#: The task of a config that names none.
DEFAULT_TASK = "segmentation"


def _load(spec: str) -> Task:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]


@cache
def _plugin_specs() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_TASKS}


def list_tasks() -> list[str]:
    """Names of every task: medseg's own and those other packages register."""
    return sorted({*BUILTIN_TASKS, *_plugin_specs()})


@cache
def get_task(name: str) -> Task:
    """The task registered under ``name``.

    Raises:
        UnknownTaskError: nobody registered that name; the message lists the known ones.
    """
    if name in BUILTIN_TASKS:
        task = _load(BUILTIN_TASKS[name])
    elif name in _plugin_specs():
        task = _plugin_specs()[name].load()
    else:
        known = list_tasks()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownTaskError(f"task {name!r} is not registered{hint} Known tasks: {known}. A separate package "
                               f"adds one through the {ENTRY_POINT_GROUP!r} entry-point group")
    if not isinstance(task, Task):
        raise UnknownTaskError(f"task {name!r}: the registered object {task!r} does not implement "
                               "medseg.tasks.base.Task (see its docstring for the methods a task provides)")
    if task.name != name:
        raise UnknownTaskError(f"task {name!r}: the registered object calls itself {task.name!r}; "
                               "register it under its own name")
    return task


def config_types() -> dict[str, type[RunConfig]]:
    """Task name -> its config class: together, the discriminated union of every config."""
    return {name: get_task(name).config_type for name in list_tasks()}


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a plain dict into the config class of the task it names (``task:``, default segmentation).

    Relative paths in it start at the current directory; the config returned holds absolute paths.

    Raises:
        ConfigError: an unknown task, or a key or value its config class refuses.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    name = str(raw.get("task") or DEFAULT_TASK)
    try:
        task = get_task(name)
    except UnknownTaskError as err:
        raise ConfigError(f"{source}: {err}") from None
    others = {n: get_task(n).config_type for n in list_tasks() if n != name}
    return validate_as({**raw, "task": name}, task.config_type, source, others=others)


def every_path_key() -> dict[str, PathKind]:
    """The path-valued keys of every task's config (a key another task owns fails validation anyway)."""
    return {key: kind for config_type in config_types().values() for key, kind in path_keys(config_type).items()}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it for its task.

    A relative path in the file starts at the file's folder; one in an override, at the current
    directory (see :mod:`medseg.config.paths`). The config returned holds absolute paths.

    Args:
        path: YAML file.
        overrides: strings like ``train.max_epochs=5``; each value is parsed as YAML.

    Returns:
        The validated, frozen config: an instance of the task's config class.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, the task is not
            registered, or a key or value is invalid (unknown keys name the closest valid key).
    """
    return validate_config(read_config_file(path, overrides, every_path_key()), source=str(path))


def network_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The bare network a model's ``network`` spec describes (see :mod:`medseg.engine.model_format`),
    built by its task from medseg's registries: what loading a model runs instead of unpickling.

    Raises:
        ConfigError: the spec's config is not valid for this medseg (or its task is unknown).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise ConfigError("the model's network spec has no 'config' object")
    cfg = validate_config(dict(spec["config"]), source="the model's network spec")
    return get_task(str(cfg.task)).build_network(cfg)
