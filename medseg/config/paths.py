"""Which config keys are paths, and where a relative one starts.

A relative path written in a config file starts at that file's folder, so the file names the same
data and the same outputs from any working directory. A value given on the command line
(``--set data.root=scans``) or in a Python dict starts at the current directory, as the shell's
own paths do. After validation every path of a config is absolute, defaults included, so the
resolved config, the MLflow params and ``summary.json`` say where things really are.

The path keys are found in the schema, not listed by hand: every key typed ``Path`` (``output_dir``,
``data.manifest``, ``data.root``, ``data.cache_dir``, ``data.fingerprint``, regression's
``data.targets.file``) and every key annotated with a :class:`PathKind` (``model.init_from``, a
path or a model URI; ``tracking.uri``, an MLflow store). A value with a URI scheme (``runs:/``,
``models:/``, ``http://``, ``file:``, ``s3://``) is left as it is; a SQLite store
``sqlite:///relative.db`` is resolved like a path (``sqlite:////absolute.db`` is already absolute).
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.fields import FieldInfo

SQLITE_PREFIX = "sqlite:///"

#: Tracking URIs MLflow knows by name, without a scheme: not folders.
NAMED_STORES = frozenset({"databricks", "databricks-uc", "uc"})

#: ``runs:``, ``models:``, ``http:``, ``s3:``... (two letters at least: ``C:`` is a drive, not a scheme).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class PathKind(str, Enum):
    """What a path-valued config key holds, and so how a relative value is resolved."""

    PATH = "path"  # a file or folder
    MODEL = "model"  # a model folder or file, or a model URI (runs:/, models:/), left as it is
    TRACKING = "tracking"  # an MLflow store: sqlite:///file.db or a folder; other URIs left as they are


ModelT = TypeVar("ModelT", bound=BaseModel)


def config_folder(path: str | Path) -> Path:
    """The folder a config file's relative paths start from (absolute, as named: links are not followed)."""
    return Path(os.path.abspath(path)).parent


def resolve_path_value(value: str, base: Path, kind: PathKind = PathKind.PATH) -> str:
    """``value`` made absolute from ``base`` where it is a relative path; URIs with a scheme as given.

    >>> resolve_path_value("sqlite:///runs/mlflow.db", Path("/work/configs"), PathKind.TRACKING)
    'sqlite:////work/configs/runs/mlflow.db'
    """
    if kind is PathKind.TRACKING and value in NAMED_STORES:
        return value
    if value.startswith(SQLITE_PREFIX):
        database = value[len(SQLITE_PREFIX):]
        if not database or database == ":memory:" or Path(database).is_absolute():
            return value
        return SQLITE_PREFIX + _joined(base, Path(database).expanduser())
    if not value or _SCHEME.match(value):
        return value
    return _joined(base, Path(value).expanduser())


def _joined(base: Path, path: Path) -> str:
    # lexical, so a folder reached through a link keeps the name it was given
    return path.as_posix() if path.is_absolute() else os.path.normpath(base / path)


def path_keys(config_type: type[BaseModel]) -> dict[str, PathKind]:
    """Every path-valued key of a config class, dotted (``data.targets.file``), with its kind."""
    found: dict[str, PathKind] = {}
    for name, field in config_type.model_fields.items():
        kind = path_kind(field)
        if kind is not None:
            found[name] = kind
            continue
        section = _section(field.annotation)
        if section is not None:
            found.update({f"{name}.{key}": sub for key, sub in path_keys(section).items()})
    return found


def path_kind(field: FieldInfo) -> PathKind | None:
    """The :class:`PathKind` of a field: its annotation's marker, or ``PATH`` for a ``Path`` (or
    ``Path | None``) field; None for anything else."""
    marked = [item for item in field.metadata if isinstance(item, PathKind)]
    if marked:
        return marked[0]
    members = [a for a in _members(field.annotation) if a is not type(None)]
    return PathKind.PATH if members == [Path] else None


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section class of ``X`` or ``X | None`` (not of lists or maps: none of those holds a path)."""
    models = [a for a in _members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def relative_path_value(value: str, folder: Path, anchors: Sequence[Path]) -> str:
    """The inverse of :func:`resolve_path_value` for a file written into ``folder``: an absolute path
    (or SQLite file) inside one of the ``anchors`` relative to ``folder``, so they can move with it;
    anything else (elsewhere, relative already, a URI) as given.

    >>> relative_path_value("sqlite:////work/runs/mlflow.db", Path("/work/configs"), [Path("/work")])
    'sqlite:///../runs/mlflow.db'
    """
    if value.startswith(SQLITE_PREFIX):
        return SQLITE_PREFIX + relative_path_value(value[len(SQLITE_PREFIX):], folder, anchors)
    path = Path(value)
    if _SCHEME.match(value) or not path.is_absolute() or not any(path == a or a in path.parents for a in anchors):
        return value
    return Path(os.path.relpath(path, folder)).as_posix()


def resolve_raw_paths(raw: Mapping[str, Any], keys: Mapping[str, PathKind], base: Path) -> dict[str, Any]:
    """A copy of an unvalidated config mapping with the relative paths it holds at ``keys`` resolved
    from ``base``; a key it does not hold, or a value that is not text, is left for validation."""
    return _map_raw(raw, keys, lambda value, kind: resolve_path_value(value, base, kind))


def relative_raw_paths(raw: Mapping[str, Any], keys: Mapping[str, PathKind], folder: Path,
                       anchors: Sequence[Path]) -> dict[str, Any]:
    """A copy of a config mapping to be written into ``folder``, its paths at ``keys`` that lie
    inside one of the ``anchors`` written relative to ``folder`` (:func:`relative_path_value`)."""
    return _map_raw(raw, keys, lambda value, _: relative_path_value(value, folder, anchors))


def _map_raw(raw: Mapping[str, Any], keys: Mapping[str, PathKind],
             change: Callable[[str, PathKind], str]) -> dict[str, Any]:
    out = dict(raw)
    for dotted, kind in keys.items():
        head, _, rest = dotted.partition(".")
        value = out.get(head)
        if rest and isinstance(value, Mapping):
            out[head] = _map_raw(value, {rest: kind}, change)
        elif not rest and isinstance(value, (str, os.PathLike)):
            out[head] = change(os.fspath(value), kind)
    return out


def resolve_config_paths(config: ModelT, base: Path) -> ModelT:
    """``config`` with every relative path left in it (defaults, ``--set`` values, a dict's values)
    resolved from ``base``; the same object when there is none."""
    updates: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        kind = path_kind(field)
        if kind is not None and isinstance(value, (str, Path)):
            resolved = resolve_path_value(os.fspath(value), base, kind)
            if resolved != os.fspath(value):
                updates[name] = type(value)(resolved)
        elif kind is None and isinstance(value, BaseModel):
            section = resolve_config_paths(value, base)
            if section is not value:
                updates[name] = section
    return config.model_copy(update=updates) if updates else config
