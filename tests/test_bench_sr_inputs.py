"""bench_sr's inputs: a thin volume's crop, thick slices and interpolations on the right grids, and
the MNI152 T1 template read from nilearn's wheel without the network."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

import nibabel as nib
import numpy as np
import pytest

from medseg.tasks.reconstruction.config import SuperResolutionConfig
from medseg.tasks.reconstruction.slice_profile import simulate_thick, thick_affine, upsample
from tests.conftest import REPO, oblique_affine

BENCHMARKS = REPO / "benchmarks"


def _bench_sr() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling tiny.py
    try:
        spec = importlib.util.spec_from_file_location("bench_sr", BENCHMARKS / "bench_sr.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _read(path: Path) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(path))


def test_a_case_is_cropped_to_whole_thick_slices_and_interpolated_back_on_its_grid(tmp_path: Path) -> None:
    """An SLA-stored, oblique volume of 11 axial slices at 3x: 9 thin slices are kept (3 thick ones),
    found along the file's first axis (S), and every output but the thick one lies on the crop's grid."""
    rng = np.random.default_rng(7)
    ras = rng.random((6, 5, 11)).astype(np.float32)
    label = (ras > 0.5).astype(np.uint8)
    affine = oblique_affine((1.0, 1.1, 0.9), (-7.0, 12.0, 30.0), angle_deg=23.0)
    image = nib.Nifti1Image(ras, affine)
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                                nib.orientations.axcodes2ornt(("S", "L", "A")))
    stored = image.as_reoriented(transform)
    stored_label = np.asarray(nib.Nifti1Image(label, affine).as_reoriented(transform).dataobj)
    volume = np.asarray(stored.dataobj, dtype=np.float32)
    seconds = _bench_sr().write_case_inputs("case", volume, stored.affine, 3, tmp_path, stored_label)
    assert set(seconds) == {"trilinear", "bspline"} and all(s >= 0 for s in seconds.values())
    original = _read(tmp_path / "original" / "case.nii.gz")
    np.testing.assert_array_equal(np.asarray(original.dataobj), volume[:9])
    np.testing.assert_allclose(original.affine, stored.affine)
    np.testing.assert_array_equal(np.asarray(_read(tmp_path / "labels" / "case.nii.gz").dataobj), stored_label[:9])
    thick = _read(tmp_path / "thick" / "case.nii.gz")
    expected, _ = simulate_thick(volume[:9], stored.affine, 0, SuperResolutionConfig(factor=3, axis=2))
    np.testing.assert_allclose(np.asarray(thick.dataobj), expected, atol=1e-6)
    np.testing.assert_allclose(thick.affine, thick_affine(stored.affine, 0, 3), atol=1e-9)
    for kind, order in (("trilinear", 1), ("bspline", 3)):
        written = _read(tmp_path / kind / "case.nii.gz")
        np.testing.assert_allclose(written.affine, stored.affine, atol=1e-9)
        np.testing.assert_allclose(np.asarray(written.dataobj), upsample(expected, 0, 3, order=order), atol=1e-5)


def test_the_mni152_template_comes_from_nilearns_wheel_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nilearn", reason="nilearn is a benchmark-only dependency: pip install -e '.[bench]'")

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("the MNI152 template must be read from the installed package, not downloaded")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    volume, affine = _bench_sr().mni152_t1()
    assert volume.shape == (197, 233, 189) and volume.dtype == np.float32
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 1.0)  # 1 mm isotropic
    assert 0.0 <= volume.min() < volume.max() and (volume > 0.1 * volume.max()).mean() > 0.1  # a brain, not blank
