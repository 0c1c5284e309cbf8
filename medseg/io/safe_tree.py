"""Nested Python values stored as JSON plus tensors: nothing read back can run code.

Checkpoints, model weights and the disk cache's index hold dicts, lists, tuples, numbers,
strings, NumPy arrays and torch tensors. ``pickle`` (and so ``torch.load`` of a full object)
would turn a tampered file into code running on the reader's machine, and even
``weights_only=True`` is a restricted unpickler that a future torch could widen. Here the
structure is JSON and the tensors are ``safetensors`` (a header of shapes and dtypes, then raw
bytes), so reading one is parsing, never executing.

``encode`` splits a value into a JSON-able tree and a flat ``{name: tensor}`` dict; ``decode``
puts it back, with tuples, non-string dict keys, NumPy arrays and NumPy/torch dtypes preserved.
A type outside that list is refused (``TypeError``), never pickled as a fallback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.io.atomic import atomic_path

_TAG = "__medseg__"
#: safetensors header key that holds the JSON tree in a single-file store.
TREE_KEY = "medseg_tree"


class SafeTreeError(ValueError):
    """A file is not a valid safe-tree store (truncated, edited, or not written by medseg)."""


def encode(value: Any, inline_arrays: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``value`` into a JSON-able tree and the tensors it references.

    Args:
        inline_arrays: put arrays into the JSON itself (for small metadata such as affines)
            instead of the tensor dict.

    Raises:
        TypeError: a value of a type that cannot be stored without pickling.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, Enum):  # MONAI keys are str Enums; their value is what matters
            return walk(obj.value, path)
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {_TAG: "float", "v": repr(obj)}
        if isinstance(obj, np.generic):
            return walk(obj.item(), path)
        if isinstance(obj, torch.dtype):
            return {_TAG: "torch_dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, np.dtype):
            return {_TAG: "np_dtype", "v": obj.str}
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu()
            if isinstance(tensor, torch.Tensor) and type(tensor) is not torch.Tensor:
                tensor = tensor.as_subclass(torch.Tensor)  # MetaTensor: its meta is stored by the caller
            if inline_arrays:
                return {_TAG: "tensor_inline", "dtype": str(tensor.dtype).removeprefix("torch."),
                        "shape": list(tensor.shape), "v": tensor.reshape(-1).tolist()}
            key = path if path not in tensors else f"{path}#{len(tensors)}"  # "a.b" of {"a": {"b"}} vs {"a.b"}
            tensors[key] = tensor.contiguous().clone()
            entry = {_TAG: "tensor", "key": key}
            layout = _memory_format(tensor)
            if layout is not None:
                # Kept: a resumed optimizer's state must have its parameters' layout (channels-last
                # 3D convolutions), or fused kernels pair up the wrong elements.
                entry["memory_format"] = layout
            return entry
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"{path or 'value'}: an object array cannot be stored without pickling")
            if inline_arrays:
                return {_TAG: "ndarray_inline", "dtype": obj.dtype.str, "shape": list(obj.shape),
                        "v": obj.reshape(-1).tolist()}
            native = obj.astype(obj.dtype.newbyteorder("="), copy=False)  # torch reads native byte order only
            key = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(native).copy())
            return {_TAG: "ndarray", "key": key, "dtype": obj.dtype.str}
        if isinstance(obj, tuple):
            return {_TAG: "tuple", "v": [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and k != _TAG for k in obj):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {_TAG: "items", "v": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                         for i, (k, v) in enumerate(obj.items())]}
        raise TypeError(f"{path or 'value'}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
                        "without pickling (only numbers, strings, lists, tuples, dicts, arrays and tensors)")

    return walk(value, ""), tensors


def decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild what :func:`encode` split.

    Raises:
        SafeTreeError: the tree references a tensor that is missing, or has an unknown tag.
    """
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tag = tree.get(_TAG)
    if tag is None:
        return {k: decode(v, tensors) for k, v in tree.items()}
    if tag == "tuple":
        return tuple(decode(v, tensors) for v in tree["v"])
    if tag == "items":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in tree["v"]}
    if tag == "float":
        return float(tree["v"])
    if tag == "torch_dtype":
        dtype = getattr(torch, str(tree["v"]), None)
        if not isinstance(dtype, torch.dtype):
            raise SafeTreeError(f"unknown torch dtype {tree['v']!r}")
        return dtype
    if tag == "np_dtype":
        return np.dtype(str(tree["v"]))
    if tag in ("tensor", "ndarray"):
        key = str(tree["key"])
        if key not in tensors:
            raise SafeTreeError(f"the structure names tensor {key!r}, which the file does not hold")
        tensor = tensors[key]
        if tag == "ndarray":
            return tensor.numpy().astype(np.dtype(str(tree["dtype"])), copy=False)
        layout = _MEMORY_FORMATS.get(str(tree.get("memory_format")))
        return tensor.contiguous(memory_format=layout) if layout is not None else tensor
    if tag == "ndarray_inline":
        return np.asarray(tree["v"], dtype=np.dtype(str(tree["dtype"]))).reshape(tree["shape"])
    if tag == "tensor_inline":
        dtype = getattr(torch, str(tree["dtype"]))
        return torch.tensor(tree["v"], dtype=dtype).reshape(tree["shape"])
    raise SafeTreeError(f"unknown entry type {tag!r}")


_MEMORY_FORMATS = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}


def _memory_format(tensor: torch.Tensor) -> str | None:
    """The name of a channels-last layout the tensor is in (and is not also plainly contiguous)."""
    if tensor.is_contiguous():
        return None
    for name, layout in _MEMORY_FORMATS.items():
        if tensor.dim() == (4 if name == "channels_last" else 5) and tensor.is_contiguous(memory_format=layout):
            return name
    return None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save(path: Path, value: Any, durable: bool = False) -> Path:
    """Write ``value`` as one ``.safetensors`` file (tensors, plus the JSON tree in its header), atomically."""
    from safetensors.torch import save_file

    tree, tensors = encode(value)
    with atomic_path(Path(path), durable=durable) as tmp:
        save_file(tensors, str(tmp), metadata={TREE_KEY: json.dumps(tree)})
    return Path(path)


def load(path: Path, device: str | torch.device = "cpu") -> Any:
    """Read a file written by :func:`save`.

    Raises:
        FileNotFoundError: no such file.
        SafeTreeError: not a safetensors file, truncated, or without medseg's structure header.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # safetensors raises its own error types for a bad header or short file
        raise SafeTreeError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); it is truncated, "
                            "corrupt, or another format (medseg never unpickles .pt/.pkl files)") from err
    if TREE_KEY not in header:
        return tensors  # a plain state dict written by another tool
    try:
        tree = json.loads(header[TREE_KEY])
    except json.JSONDecodeError as err:
        raise SafeTreeError(f"{path}: its structure header is not valid JSON ({err})") from err
    return decode(tree, tensors)


def dumps_json(value: Any) -> str:
    """``value`` as JSON with arrays inlined (small metadata: affines, spacings, transform traces)."""
    tree, tensors = encode(value, inline_arrays=True)
    if tensors:  # encode(inline_arrays=True) puts every array into the JSON
        raise TypeError("internal: inline encoding left tensors behind")
    return json.dumps(tree)


def loads_json(text: str) -> Any:
    """Read what :func:`dumps_json` wrote."""
    return decode(json.loads(text), {})
