"""YAML in, validated config objects out, at one boundary: reading with ``key=value`` overrides,
validation whose errors name the key, the nearest valid key ("did you mean") or the task it
belongs to, and writing a config back. Relative paths are resolved here too: a file's from its
folder, the rest from the current directory (:mod:`medseg.config.paths`)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo

from medseg.config.paths import PathKind, config_folder, resolve_config_paths, resolve_raw_paths
from medseg.config.schema import AugmentConfig, RunConfig
from medseg.errors import ConfigError

# --------------------------------------------------------------------------------------- reading


def read_config_file(path: str | Path, overrides: Sequence[str] | None = None,
                     path_keys: Mapping[str, PathKind] | None = None) -> dict[str, Any]:
    """Read a YAML config as a plain dict and apply ``key.sub=value`` overrides (not validated yet).

    The relative paths the file holds at ``path_keys`` start at the file's folder; an override's
    value is applied after, as given (:func:`validate_config` resolves it from the current directory).

    Args:
        path: YAML file.
        overrides: strings like ``train.max_epochs=5``; the value is parsed as YAML.
        path_keys: the path-valued keys (:func:`medseg.config.paths.path_keys`) to resolve from
            the file's folder; None: none are.

    Returns:
        The mapping of sections, ready for :func:`validate_config`.

    Raises:
        ConfigError: the file is missing or not YAML, its top level is not a mapping, or an override
            is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path} (working directory {Path.cwd()})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = resolve_raw_paths(raw, path_keys or {}, config_folder(path))
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` inside a nested dict (list items by index, ``augment.0.prob=0.2``).

    Raises:
        ConfigError: not ``KEY=VALUE``, the value is not YAML, or the path runs through a value or
            past the end of a list.
    """
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_epochs=5")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err}); quote it or fix the brackets") from None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: depth + 1])]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is a value, not a section")


def _list_index(node: list[Any], part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {'.'.join(parts)}: expected a list index below {len(node)}, got {part!r}")
    return int(part)


# ------------------------------------------------------------------------------------- validating

ConfigT = TypeVar("ConfigT", bound=RunConfig)


def validate_config(raw: Mapping[str, Any], config_type: type[ConfigT], source: str = "<config>",
                    others: Mapping[str, type[RunConfig]] | None = None) -> ConfigT:
    """Validate a plain dict into ``config_type``, rewriting pydantic's errors for people.

    Args:
        raw: the mapping of sections (from :func:`read_config_file`).
        config_type: the task's config class.
        source: the file name, for the message.
        others: the other tasks' config classes by task name; a key or value this task refuses but
            one of them accepts is reported as belonging to that task.

    Returns:
        The validated, frozen config, every path in it absolute: a relative one (a default, an
        override's, a dict's) starts at the current directory.

    Raises:
        ConfigError: every problem, one per line: unknown keys name the closest valid key or the
            task they belong to, a missing required section shows an example.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        config = config_type.model_validate(dict(raw))
    except ValidationError as err:
        task = _task_name(config_type)
        lines = [_describe_error(e, config_type, task, others or {}) for e in err.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None
    return resolve_config_paths(config, Path.cwd())


def _task_name(config_type: type[RunConfig]) -> str:
    default = config_type.model_fields["task"].default
    return default if isinstance(default, str) else config_type.__name__


def _describe_error(error: Any, model: type[RunConfig], task: str, others: Mapping[str, type[RunConfig]]) -> str:
    loc = list(error["loc"])
    key = ".".join(str(p) for p in _public(loc))
    kind, value, message = error["type"], error.get("input"), str(error["msg"])
    if kind == "extra_forbidden":
        owners = [name for name, other in others.items() if str(loc[-1]) in _valid_keys_at(other, loc[:-1])]
        if owners:
            return f"{key} does not apply to task: {task} (it is an option of task: {' and '.join(owners)}); remove it"
        valid = _valid_keys_at(model, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        suggestion = f"; did you mean {'.'.join(str(p) for p in [*_public(loc[:-1]), hint[0]])!r}?" if hint else ""
        return f"unknown key {key!r}{suggestion} Valid keys here: {sorted(valid)}"
    field = _field_at(model, loc)
    if field is not None and field.is_required() and (kind == "missing" or value is None):
        example = f", e.g. {loc[-1]}: {_flow(field.examples[0])}" if field.examples else ""
        return f"{key}: required for task: {task}{example}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind in ("enum", "literal_error"):
        owners = [name for name, other in others.items() if _accepts(other, loc, value)]
        if owners:
            return (f"{key}: {value!r} does not fit task: {task} (it is an option of task: {' and '.join(owners)}); "
                    f"{message[:1].lower()}{message[1:]}")
    if kind == "value_error":  # our own validators' messages name their keys
        message = message.removeprefix("Value error, ")
        return message if not key or message.startswith(key) else f"{key}: {message}"
    return f"{key or '<top level>'}: {message} (got {value!r})"


def _flow(example: Any) -> str:
    """An example value as one line of YAML (``{size: [96, 96, 96]}``)."""
    return str(yaml.safe_dump(example, default_flow_style=True, sort_keys=False)).strip().removesuffix("...").strip()


def _public(loc: list[Any]) -> list[Any]:
    """Drop pydantic's union-tag entries (``augment.0.flip.prob`` -> ``augment.0.prob``)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i > 0 and isinstance(loc[i - 1], int) and isinstance(part, str) and part in _AUG_TAGS:
            continue
        out.append(part)
    return out


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _node_at(model: Any, loc: list[Any]) -> Any:
    """Walk field annotations along ``loc``: the model (or tag -> model map) there, or None when
    ``loc`` leaves the models (a key that is not a field)."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int):
            continue
        if isinstance(node, dict):  # discriminated union: tag -> model
            node = node.get(part)
        elif _is_model(node) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return None
    return _unwrap(node)


def _valid_keys_at(model: Any, loc: list[Any]) -> list[str]:
    """The fields of the model that ``loc`` leads to (the one that rejected a key), if any."""
    node = _node_at(model, loc)
    return list(node.model_fields) if _is_model(node) else []


def _field_at(model: Any, loc: list[Any]) -> FieldInfo | None:
    """The field ``loc`` names, when it names one (not a list item or a union member)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    parent = _node_at(model, loc[:-1])
    return parent.model_fields.get(loc[-1]) if _is_model(parent) else None


def _accepts(model: type[RunConfig], loc: list[Any], value: Any) -> bool:
    """Whether ``model`` has a field with a closed set of values (enum, literal) at ``loc`` that
    takes ``value``: then the value is an option of that model's task."""
    field = _field_at(model, loc)
    annotation: Any = field.annotation if field is not None else None
    closed = (isinstance(annotation, type) and issubclass(annotation, Enum)) or typing.get_origin(annotation) is Literal
    if not closed:
        return False
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return False
    return True


def _unwrap(annotation: Any) -> Any:
    """Reduce Optional/list/dict/Annotated annotations to a model, or a tag->model map for unions."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [m for m in members if _is_model(m)]
            if len(models) > 1:
                return {typing.get_args(m.model_fields["name"].annotation)[0]: m for m in models}
            annotation = members[0] if len(members) == 1 else (models[0] if models else members[0])
        else:
            return annotation


_AUG_TAGS = set(_unwrap(AugmentConfig))


# --------------------------------------------------------------------------------------- writing


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-friendly dict of a config (paths and enums as strings)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig, path: Path) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""
    from medseg.io.atomic import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of mappings are indexed (``augment.0.name``)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out
