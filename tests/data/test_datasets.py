"""The memory-mapped disk cache returns exactly what fresh preprocessing does, and nothing stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import IntensityConfig, PatchConfig, PreprocessConfig
from medseg.data.datasets import MappedCacheDataset
from medseg.data.sampling import split_transforms
from medseg.data.transforms import training_transforms, validation_transforms
from tests.conftest import make_case


def _items(tmp_path: Path, n: int = 2) -> list[dict]:
    items = []
    for i in range(n):
        image, label, affine = make_case((23, 31, 17), seed=i, spacing=(0.8, 1.3, 2.9))
        nib.save(nib.Nifti1Image(image, affine), tmp_path / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / f"lbl{i}.nii.gz")
        items.append({"image": str(tmp_path / f"img{i}.nii.gz"), "label": str(tmp_path / f"lbl{i}.nii.gz"),
                      "case_id": f"c{i}", "sha256": f"hash{i}"})
    return items


PRE = PreprocessConfig(orientation="RAS", spacing=(1.1, 1.1, 2.0), intensity=IntensityConfig(mode="zscore"))


def test_cached_volumes_equal_freshly_preprocessed_ones_with_their_geometry(tmp_path: Path) -> None:
    items = _items(tmp_path)
    chain = validation_transforms(PRE)
    dataset = MappedCacheDataset(items, chain, tmp_path / "cache")
    for index, item in enumerate(items):
        fresh = chain(dict(item))
        first, again = dataset[index], dataset[index]  # stored, then read back mapped
        for cached in (first, again):
            for key in ("image", "label"):
                assert isinstance(cached[key], MetaTensor)
                assert cached[key].dtype == fresh[key].dtype
                assert torch.equal(cached[key].as_tensor(), fresh[key].as_tensor())
                assert torch.allclose(cached[key].affine, fresh[key].affine)
                assert torch.allclose(torch.as_tensor(cached[key].pixdim), torch.as_tensor(fresh[key].pixdim))
                assert len(cached[key].applied_operations) == len(fresh[key].applied_operations)
            assert cached["case_id"] == item["case_id"]
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == len(items)
    assert not list((tmp_path / "cache").glob(".*tmp*")), "a temporary entry was left behind"


def test_training_prefix_with_sampler_indices_round_trips(tmp_path: Path) -> None:
    items = _items(tmp_path, 1)
    prefix, _ = split_transforms(training_transforms(PRE, PatchConfig(size=(8, 8, 8)), [], 3, 3))
    fresh = prefix(dict(items[0]))
    # the deterministic, cached prefix computes the sampler's indices, as int32
    assert fresh["label_fg_indices"].dtype == np.int32 and fresh["label_bg_indices"].dtype == np.int32
    cached = MappedCacheDataset(items, prefix, tmp_path / "cache")[0]
    assert set(cached) == set(fresh)
    for key, value in fresh.items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            assert np.array_equal(np.asarray(cached[key]), np.asarray(value)), key


def test_an_entry_is_computed_once_and_reread_without_the_transform(tmp_path: Path) -> None:
    items = _items(tmp_path, 1)
    calls = []

    class Counting:
        def __init__(self, chain):
            self.chain = chain

        def __call__(self, item):
            calls.append(1)
            return self.chain(item)

    chain = validation_transforms(PRE)
    dataset = MappedCacheDataset(items, chain, tmp_path / "cache")
    dataset.transform = Counting(chain)
    dataset[0]
    dataset[0]
    reopened = MappedCacheDataset(items, chain, tmp_path / "cache")  # a later run with the same settings
    reopened.transform = Counting(chain)
    reopened[0]
    assert len(calls) == 1


def test_changed_settings_or_content_never_reuse_an_entry(tmp_path: Path) -> None:
    items = _items(tmp_path, 1)
    base = MappedCacheDataset(items, validation_transforms(PRE), tmp_path / "cache")
    other_spacing = MappedCacheDataset(items, validation_transforms(PRE.model_copy(update={"spacing": (1.1, 1.1, 2.5)})),
                                       tmp_path / "cache")
    changed_file = MappedCacheDataset([{**items[0], "sha256": "changed"}], validation_transforms(PRE), tmp_path / "cache")
    entries = {base.entry(0), other_spacing.entry(0), changed_file.entry(0)}
    assert len(entries) == 3
    assert other_spacing[0]["image"].shape != base[0]["image"].shape


def test_writing_into_a_mapped_array_never_changes_the_cache(tmp_path: Path) -> None:
    items = _items(tmp_path, 1)
    dataset = MappedCacheDataset(items, validation_transforms(PRE), tmp_path / "cache")
    before = dataset[0]["image"].as_tensor().clone()
    dataset[0]["image"].as_tensor().fill_(7.0)  # copy-on-write mapping: a private page, not the file
    assert torch.equal(dataset[0]["image"].as_tensor(), before)


class _Marker:
    """Unpickling this creates a file: what a hostile pickle planted in a shared cache would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_cache_index_runs_nothing_and_the_entry_is_rebuilt(tmp_path: Path) -> None:
    import pickle

    items = _items(tmp_path, 1)
    chain = validation_transforms(PRE)
    dataset = MappedCacheDataset(items, chain, tmp_path / "cache")
    expected = dataset[0]["image"].as_tensor().clone()
    entry = dataset.entry(0)
    marker = tmp_path / "pwned"
    for planted in (pickle.dumps(_Marker(str(marker))), b'{"image": {"array": "../../etc/passwd"}}', b""):
        (entry / "index.json").write_bytes(planted)
        # the old format's file name too: never read, whatever it holds
        (entry / "index.pt").write_bytes(pickle.dumps(_Marker(str(marker))))
        again = MappedCacheDataset(items, chain, tmp_path / "cache")[0]
        assert torch.equal(again["image"].as_tensor(), expected)
        assert not marker.exists(), "unpickling the planted index ran its code"
        assert (entry / "index.json").read_bytes().startswith(b"{")


def test_a_damaged_or_copied_cache_entry_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    """A cache folder shared between runs: arrays changed after they were written (a bit flip, a
    colleague's edit) or an entry copied under another record's name are preprocessed again."""
    items = _items(tmp_path, 2)
    chain = validation_transforms(PRE)
    dataset = MappedCacheDataset(items, chain, tmp_path / "cache")
    expected = [dataset[i]["image"].as_tensor().clone() for i in range(2)]
    first, second = dataset.entry(0), dataset.entry(1)
    image_file = next(p for p in sorted(first.glob("*.npy")) if np.load(p).shape == tuple(expected[0].shape))
    blob = bytearray(image_file.read_bytes())
    blob[-5] ^= 0x40  # one flipped bit in the image data: still a valid .npy
    image_file.write_bytes(bytes(blob))
    again = MappedCacheDataset(items, chain, tmp_path / "cache")  # a later run: checks before it maps
    assert torch.equal(again[0]["image"].as_tensor(), expected[0])
    shutil.rmtree(second)
    shutil.copytree(first, second)  # record 0's arrays under record 1's name
    assert torch.equal(MappedCacheDataset(items, chain, tmp_path / "cache")[1]["image"].as_tensor(), expected[1])
