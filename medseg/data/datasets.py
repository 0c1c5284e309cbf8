"""Datasets from manifests: records for MONAI dictionary transforms, cached per config."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import Compose

from medseg.config import CacheMode, DataConfig
from medseg.data.manifest import Case, sha256_of
from medseg.errors import ManifestError
from medseg.io import safe_tree

log = logging.getLogger(__name__)


def records(cases: Sequence[Case], root: Path, with_label: bool = True,
            class_labels: bool = False) -> list[dict[str, Any]]:
    """One dict per case for dictionary transforms (several channels -> a list of paths).

    ``class_labels``: the manifest's label column holds a class index (classification), which
    becomes an int; otherwise it is a label-map path.
    """
    out = []
    for case in cases:
        images = [str(p) for p in case.image_paths(root)]
        item: dict[str, Any] = {"image": images[0] if len(images) == 1 else images, "case_id": case.case_id,
                                # content hashes make the disk-cache key change when a file changes in place
                                "sha256": ";".join([*case.image_sha256, case.label_sha256 or ""])}
        if with_label and case.label is not None:
            item["label"] = class_index(case) if class_labels else str(case.label_path(root))
        out.append(item)
    return out


def class_index(case: Case) -> int:
    """The class of a classification case (its label column), checked by ``verify`` beforehand."""
    try:
        return int(str(case.label))
    except ValueError:
        raise ManifestError(f"case {case.case_id}: label {case.label!r} is not a class index; a classification "
                            "manifest's label column holds the class number (0, 1, ...)") from None


def make_dataset(items: list[dict[str, Any]], transform: Compose, cfg: DataConfig, cache_dir: Path,
                 progress: bool = True, workers: int | None = None) -> Any:
    """A dataset that caches the deterministic prefix of ``transform`` as configured.

    ``memory`` keeps preprocessed volumes in RAM (MONAI ``CacheDataset``); ``disk`` stores them
    uncompressed in ``cache_dir`` and memory-maps them (:class:`MappedCacheDataset`), so reruns and
    the processes of a DDP job share one copy; ``none`` redoes the work every time.
    """
    if cfg.cache == CacheMode.MEMORY:
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=workers, progress=progress)
    if cfg.cache == CacheMode.DISK:
        return MappedCacheDataset(items, transform, cache_dir)
    return Dataset(items, transform)


class DeviceCache(torch.utils.data.Dataset):
    """A cached dataset's items with their tensors moved to ``device`` once, on first use: the
    random part of the chain (patch sampling, flips, affine, intensity) then runs on the GPU
    and each batch is already there. MONAI's random transforms work on CUDA tensors as they are."""

    def __init__(self, base: Any, device: torch.device):
        self.base = base
        self.device = device
        self._items: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._items:
            self._items[index] = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                  for k, v in self.base[index].items()}
        return self._items[index]


def cached_bytes(dataset: Any) -> int:
    """Estimated size of a dataset's tensors in memory: its first item's times its length."""
    if not len(dataset):
        return 0
    first = dataset[0]
    return len(dataset) * sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))


class MappedCacheDataset(torch.utils.data.Dataset):
    """Each record's preprocessed arrays stored once as uncompressed ``.npy`` files and read back
    memory-mapped: an epoch never re-decompresses or re-resamples, a patch reads only its pages,
    and every process on the machine shares the page cache instead of holding its own copy.

    An entry's folder is named by a hash of the record (paths and content hashes) and of the
    transform chain's settings (:func:`describe`), so changed data or preprocessing settings never
    reuse a stale entry. Entries are written to a temporary folder and renamed into place, so a
    crash or a second process writing the same entry never leaves a half-written one. Arrays are
    mapped copy-on-write: a transform writing into one can never change the cache.
    """

    def __init__(self, items: Sequence[dict[str, Any]], transform: Compose, cache_dir: Path):
        self.items = list(items)
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._transform_hash = hashlib.sha256(describe(transform).encode()).digest()
        self._verified: set[str] = set()  # entries whose arrays matched their recorded hashes
        _remove_abandoned_entries(self.cache_dir)

    def __len__(self) -> int:
        return len(self.items)

    def entry(self, index: int) -> Path:
        """The folder holding record ``index``'s preprocessed arrays."""
        key = hashlib.sha256(json.dumps(self.items[index], sort_keys=True, default=str).encode()
                             + self._transform_hash).hexdigest()[:32]
        return self.cache_dir / key

    def __getitem__(self, index: int) -> dict[str, Any]:
        folder = self.entry(index)
        if (folder / _INDEX).is_file():
            try:
                # A cache folder may be shared between runs and users: each entry's arrays are checked
                # against the hashes its index recorded once per process, then mapped freely.
                item = _load_entry(folder, verify=folder.name not in self._verified)
                self._verified.add(folder.name)
                return item
            except (CacheEntryError, OSError, ValueError, KeyError, TypeError) as err:
                # Rebuilt, never trusted: an edited or torn entry is only data, so nothing is lost
                log.warning("cache entry %s is unusable (%s); preprocessing record %d again", folder, err, index)
                shutil.rmtree(folder, ignore_errors=True)
        self._store(self.transform(dict(self.items[index])), folder)
        self._verified.add(folder.name)
        return _load_entry(folder, verify=False)

    @staticmethod
    def _store(item: dict[str, Any], folder: Path) -> None:
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index: dict[str, Any] = {}
        for key, value in item.items():
            if isinstance(value, (torch.Tensor, np.ndarray)):
                array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                name = f"{len(index)}.npy"
                np.save(tmp / name, np.ascontiguousarray(array), allow_pickle=False)
                digest = sha256_of(tmp / name)
                meta = ({"meta": dict(value.meta), "applied_operations": value.applied_operations,
                         "spatial_ndim": getattr(value, "spatial_ndim", None)}
                        if isinstance(value, MetaTensor) else None)
                index[key] = {"array": name, "sha256": digest, "tensor": isinstance(value, torch.Tensor),
                              "metatensor": meta}
            else:
                index[key] = {"value": value}
        index[_ENTRY] = {"key": folder.name, "format": 2}  # which record it was made for
        # JSON (arrays inlined): a cache folder shared between runs or users can never run code
        (tmp / _INDEX).write_text(safe_tree.dumps_json(index))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same entry first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)


_INDEX = "index.json"


def _remove_abandoned_entries(cache_dir: Path) -> None:
    """Half-written entries of processes that were killed (``.<key>.tmp<pid>`` whose pid is gone
    here and that nobody touched for ten minutes: a cache on a shared disk has other hosts' pids)."""
    for tmp in cache_dir.glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        try:
            idle = time.time() - tmp.stat().st_mtime
        except OSError:
            continue
        if not pid.isdigit() or idle < 600:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # nobody is writing it any more
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
#: Reserved index key: the entry's own name (a folder copied under another record's name is refused).
_ENTRY = "__medseg_entry__"


def describe(obj: Any, depth: int = 16) -> str:
    """A deterministic description of a transform chain: every transform's class and settings,
    recursively. Unlike MONAI's ``json_hashing`` of transforms (which falls back to class names
    alone), a changed spacing, window or crop makes a different description."""
    if depth < 0:
        return type(obj).__name__
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f"array{tuple(obj.shape)}:" + hashlib.sha256(np.ascontiguousarray(
            obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj).tobytes()).hexdigest()[:16]
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(describe(v, depth - 1) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k!s}:{describe(v, depth - 1)}" for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(obj, (np.random.RandomState, np.random.Generator)):
        return type(obj).__name__  # state changes as it is used; not a setting
    if isinstance(obj, type) or inspect.isroutine(obj) or isinstance(obj, functools.partial):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if hasattr(obj, "__dict__"):
        fields = {k: v for k, v in vars(obj).items() if not k.startswith("_") or k in ("_keys",)}
        return f"{type(obj).__name__}" + describe(fields, depth - 1)
    return type(obj).__name__


class CacheEntryError(ValueError):
    """A cache entry's index is not what :meth:`MappedCacheDataset._store` writes."""


def _load_entry(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Read one entry: its JSON index, and its arrays as ``.npy`` (``allow_pickle=False``).

    Raises:
        CacheEntryError: the index is not valid JSON of the expected shape.
        OSError, ValueError: an array file is missing or not a plain ``.npy``.
    """
    try:
        index = safe_tree.loads_json((folder / _INDEX).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, safe_tree.SafeTreeError) as err:
        raise CacheEntryError(f"{folder / _INDEX}: not medseg's JSON cache index ({err})") from err
    if not isinstance(index, dict) or not all(isinstance(v, dict) for v in index.values()):
        raise CacheEntryError(f"{folder / _INDEX}: expected a JSON object of entries")
    entry = index.pop(_ENTRY, None)
    if entry is None or entry.get("key") != folder.name:
        raise CacheEntryError(f"{folder / _INDEX}: written for entry {None if entry is None else entry.get('key')!r}, "
                              f"not {folder.name!r} (copied from elsewhere, or by an older medseg)")
    out: dict[str, Any] = {}
    for key, spec in index.items():
        if "value" in spec:
            out[key] = spec["value"]
            continue
        if not re.fullmatch(r"\d+\.npy", str(spec.get("array"))):  # only files of this entry's own folder
            raise CacheEntryError(f"{folder / _INDEX}: entry {key!r} names array {spec.get('array')!r}")
        if verify and sha256_of(folder / spec["array"]) != spec.get("sha256"):
            raise CacheEntryError(f"{folder / spec['array']}: its sha256 is not the one recorded when it was written "
                                  "(changed or damaged since)")
        try:
            array = np.load(folder / spec["array"], mmap_mode="c", allow_pickle=False)
        except ValueError:  # an empty array (e.g. no background voxels) cannot be mapped
            array = np.load(folder / spec["array"], allow_pickle=False)
        if not spec["tensor"]:
            out[key] = array
        elif spec["metatensor"] is not None:
            out[key] = MetaTensor(torch.from_numpy(array), meta=spec["metatensor"]["meta"],
                                  applied_operations=spec["metatensor"]["applied_operations"],
                                  spatial_ndim=spec["metatensor"].get("spatial_ndim"))
        else:
            out[key] = torch.from_numpy(array)
    return out
