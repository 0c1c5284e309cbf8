"""Random-ellipse phantoms: reproducible bytes, inside the scanner's circle, reused when unchanged."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.manifest import read_manifest, sha256_of
from medseg.tasks.reconstruction.config import PhantomConfig
from medseg.tasks.reconstruction.phantoms import ellipse_phantom, write_phantoms


def test_phantom_values_stay_in_range_and_inside_the_circle() -> None:
    image = ellipse_phantom(45, np.random.default_rng(0))
    assert image.shape == (45, 45) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.2
    y, x = np.mgrid[-1:1:45j, -1:1:45j]
    assert np.all(image[x ** 2 + y ** 2 > 0.98] == 0)  # every view sees the whole object


def test_the_same_config_writes_byte_identical_sets(tmp_path: Path) -> None:
    cfg = PhantomConfig(train=3, val=1, test=2, size=33, seed=5)
    first = write_phantoms(cfg, tmp_path / "a" / "manifest.csv", tmp_path / "a", progress=False)
    second = write_phantoms(cfg, tmp_path / "b" / "manifest.csv", tmp_path / "b", progress=False)
    assert first.generated and first.cases == 6
    a, b = read_manifest(first.manifest), read_manifest(second.manifest)
    assert [c.image_sha256 for c in a.cases] == [c.image_sha256 for c in b.cases]
    assert [c.split for c in a.cases].count("train") == 3
    case = a.cases[0]
    assert case.label is None and case.image_sha256[0] == sha256_of(tmp_path / "a" / case.images[0])
    assert nib.load(tmp_path / "a" / case.images[0]).shape == (33, 33, 1)
    # unchanged config: nothing rewritten; another seed: another set
    again = write_phantoms(cfg, first.manifest, tmp_path / "a", progress=False)
    assert not again.generated
    other = write_phantoms(cfg.model_copy(update={"seed": 6}), first.manifest, tmp_path / "a", progress=False)
    assert other.generated
    assert read_manifest(first.manifest).cases[0].image_sha256 != case.image_sha256
