"""Nested values stored as JSON plus safetensors come back with their types, and nothing else is accepted."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.io import safe_tree


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


VALUE = {
    "model": OrderedDict(w=torch.randn(3, 4), b=torch.zeros(0), n=torch.tensor(7, dtype=torch.int64)),
    "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2, dtype=torch.float16)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "nesterov": False}]},
    "numpy": np.arange(6, dtype=">i4").reshape(2, 3),
    "bool": np.array([True, False]),
    "floats": [float("nan"), float("inf"), -0.5],
    "dtype": torch.bfloat16,
    "np_dtype": np.dtype("uint16"),
    "tuple_keys": {(1, 2): "a"},
    "none": None,
    "text": "ümlaut",
}


def test_a_nested_checkpoint_round_trips_with_its_types(tmp_path: Path) -> None:
    path = safe_tree.save(tmp_path / "state.safetensors", VALUE)
    back = safe_tree.load(path)
    assert _same(back["model"], dict(VALUE["model"]))
    assert _same(back["optimizer"], VALUE["optimizer"])
    assert back["numpy"].tolist() == VALUE["numpy"].tolist() and back["numpy"].dtype == VALUE["numpy"].dtype
    for key in ("bool", "floats", "dtype", "np_dtype", "tuple_keys", "none", "text"):
        assert _same(back[key], VALUE[key]), key


def test_inline_json_holds_small_arrays() -> None:
    meta = {"affine": torch.diag(torch.tensor([0.7, 1.3, 2.5, 1.0], dtype=torch.float64)),
            "spatial_shape": np.array([23, 31, 17]), "orig_size": (23, 31, 17)}
    back = safe_tree.loads_json(safe_tree.dumps_json(meta))
    assert _same(back, meta)


def test_values_that_would_need_pickle_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot be stored without pickling"):
        safe_tree.encode({"fn": print})
    with pytest.raises(TypeError, match="object array"):
        safe_tree.encode({"a": np.array([object()])})


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, pickle.dumps({"a": 1}), b"PK\x03\x04 zip"])
def test_a_file_that_is_not_safetensors_is_refused_without_unpickling(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.safetensors"
    path.write_bytes(content)
    with pytest.raises(safe_tree.SafeTreeError, match="not a readable safetensors file"):
        safe_tree.load(path)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = safe_tree.save(tmp_path / "state.safetensors", {"w": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(safe_tree.SafeTreeError):
        safe_tree.load(path)


def test_channels_last_layouts_and_colliding_names_survive(tmp_path: Path) -> None:
    weight = torch.randn(4, 3, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    image = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    value = {"a": {"b": torch.ones(2)}, "a.b": torch.zeros(2), "w": weight, "x": image}
    back = safe_tree.load(safe_tree.save(tmp_path / "s.safetensors", value))
    assert back["w"].stride() == weight.stride() and torch.equal(back["w"], weight)
    assert back["x"].stride() == image.stride() and torch.equal(back["x"], image)
    assert torch.equal(back["a"]["b"], torch.ones(2)) and torch.equal(back["a.b"], torch.zeros(2))
