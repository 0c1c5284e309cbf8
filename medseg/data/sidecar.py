"""What a built manifest remembers beside it: its data root, task, label names and channels.

``manifest build`` (and ``plan``, which builds one) writes ``<manifest>.meta.json`` next to the CSV,
so ``medseg verify``, ``plan`` and ``run --plan`` on that manifest need no ``--root`` or
``--labels`` again. The root is stored relative to the manifest's folder (a repository's
``data_manifests/`` works on any clone) and resolved against it when read. Plain JSON, read as data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ManifestError
from medseg.io.atomic import atomic_write_text

SUFFIX = ".meta.json"


def sidecar_path(manifest: Path) -> Path:
    """``data_manifests/x.csv`` -> ``data_manifests/x.meta.json``."""
    return Path(manifest).with_suffix(SUFFIX)


@dataclass(frozen=True)
class ManifestInfo:
    """A manifest's sidecar.

    Attributes:
        root: the data root the manifest's paths start from (absolute, resolved).
        task: ``segmentation`` or ``classification``, as the layout suggested.
        labels: label value (class index) -> name, when the layout named them.
        channels: input channel names, when the layout named them.
        layout: the layout kind the manifest was built from (``msd``, ``nnunet``, ...).
        class_labels: the label column holds class indices, not label-map paths.
    """

    root: Path
    task: str | None = None
    labels: dict[int, str] | None = None
    channels: list[str] | None = None
    layout: str | None = None
    class_labels: bool = False


def write_sidecar(manifest: Path, info: ManifestInfo) -> Path:
    """Write ``info`` beside ``manifest`` (atomically); the root relative to the manifest's folder."""
    manifest = Path(manifest)
    folder = manifest.resolve().parent
    try:
        root = os.path.relpath(Path(info.root).resolve(), folder)
    except ValueError:  # another drive (Windows): keep it absolute
        root = str(Path(info.root).resolve())
    record: dict[str, Any] = {"manifest": manifest.name, "root": Path(root).as_posix(), "task": info.task,
                              "labels": None if info.labels is None else {str(k): v for k, v in info.labels.items()},
                              "channels": info.channels, "layout": info.layout,
                              "class_labels": info.class_labels}
    return atomic_write_text(sidecar_path(manifest), json.dumps(record, indent=2) + "\n")


def read_sidecar(manifest: Path) -> ManifestInfo | None:
    """The sidecar of ``manifest``, or None when it has none (a manifest written by hand or by an
    older medseg).

    Raises:
        ManifestError: the sidecar exists but is not what ``manifest build`` writes.
    """
    path = sidecar_path(Path(manifest))
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        root = Path(manifest).resolve().parent / str(record["root"])
        labels = record.get("labels")
        return ManifestInfo(root=root.resolve(), task=record.get("task"),
                            labels=None if labels is None else {int(k): str(v) for k, v in labels.items()},
                            channels=record.get("channels"), layout=record.get("layout"),
                            class_labels=bool(record.get("class_labels", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ManifestError(f"{path}: not a manifest sidecar ({type(err).__name__}: {err}). Expected the JSON "
                            "`medseg manifest build` writes beside the manifest (root, task, labels, channels). "
                            "Build the manifest again, or remove the file and pass --root.") from None
