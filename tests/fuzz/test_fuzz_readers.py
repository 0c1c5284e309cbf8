"""Every hostile file is read into a usable image or refused with a message naming it: empty,
truncated and bit-flipped files of every format, headers that lie (Hypothesis), impossible
values, odd shapes and names. ``make fuzz`` runs the slow part too, with thousands of cases."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.engine.case_io import peak_rss_mb
from medseg.errors import ImageValueError, VolumeReadError
from medseg.io.discovery import discover
from medseg.io.preflight import check_values
from medseg.io.readers import load_volume
from tests.fuzz.hostile import (
    FUZZ_MEMORY_BYTES,
    TALLY,
    bit_flipped,
    good_files,
    good_volume,
    keeps_promise,
    metaimage,
    nrrd,
    raw_nifti,
    truncated,
)

FAST = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "40"))
SLOW = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES_SLOW", "1500"))
FORMATS = (".nii", ".nii.gz", ".mha", ".nrrd", ".dcm")


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("suffix", FORMATS)
def test_empty_truncated_and_bit_flipped_files_keep_the_promise(tmp_path: Path, suffix: str) -> None:
    source = good_files(tmp_path / "good", seed=1)[suffix]
    assert keeps_promise(source, f"well-formed {suffix}") == "read"
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    assert keeps_promise(tmp_path / f"empty{suffix}", f"empty {suffix}") == "refused"
    assert "empty (0 bytes)" in _message(tmp_path / f"empty{suffix}")
    original = np.asarray(load_volume(source))
    for fraction in (0.02, 0.1, 0.3, 0.5, 0.8, 0.97, 0.999):
        target = truncated(source, tmp_path / f"cut{int(fraction * 1000)}{suffix}", fraction)
        if keeps_promise(target, f"truncated {suffix}") == "read":  # only a gzip trailer lost: the data are whole
            np.testing.assert_array_equal(np.asarray(load_volume(target)), original, err_msg=f"{target}: wrong data")
    rng = random.Random(f"flip{suffix}")
    for i in range(FAST):
        keeps_promise(bit_flipped(source, tmp_path / f"flip{i}{suffix}", rng, flips=rng.choice((1, 2, 8))),
                      f"bit-flipped {suffix}")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", FORMATS)
def test_many_bit_flipped_files_keep_the_promise(tmp_path: Path, suffix: str) -> None:
    source = good_files(tmp_path / "good", seed=2)[suffix]
    rng = random.Random(f"slow-flip{suffix}")
    for _ in range(SLOW):
        target = bit_flipped(source, tmp_path / f"flip{suffix}", rng, flips=rng.choice((1, 2, 4, 16, 64)))
        keeps_promise(target, f"bit-flipped {suffix}")
        if rng.random() < 0.3:
            keeps_promise(truncated(target, tmp_path / f"cut{suffix}", rng.random()), f"truncated {suffix}")


def _message(path: Path) -> str:
    try:
        check_values(load_volume(path), str(path))
    except (VolumeReadError, ImageValueError) as err:
        return str(err)
    return ""


# ----------------------------------------------------------------------------------- lying headers


_dims = st.lists(st.one_of(st.integers(-3, 12), st.sampled_from([0, 1, 2000, 2**15 - 1])), min_size=1, max_size=7)
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1e-30, 1e30]))
_datatypes = st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 0, 1, 32, 128, 2304, 9999])


@st.composite
def nifti_headers(draw: st.DrawFn) -> dict:
    dims = draw(_dims)
    srow = np.eye(4)
    if draw(st.booleans()):
        srow[:3, :] = np.asarray(draw(st.lists(_floats, min_size=12, max_size=12)), dtype=np.float64).reshape(3, 4)
    pixdim = draw(st.lists(_floats, min_size=3, max_size=7))
    return {"shape": tuple(dims), "datatype": draw(_datatypes), "pixdim": pixdim, "srow": srow,
            "sform_code": draw(st.sampled_from([0, 1, 2, 4])), "qform_code": draw(st.sampled_from([0, 1])),
            "vox_offset": draw(st.sampled_from([352.0, 0.0, 348.0, 10_000.0, -5.0, 1e12])),
            "payload_bytes": draw(st.sampled_from([0, 17, 512, 3000, 40_000])),
            "gz": draw(st.booleans())}


def _lying_nifti(spec: dict, folder: Path) -> Path:
    payload = np.random.default_rng(len(spec["shape"])).normal(size=spec["payload_bytes"] // 4).astype(np.float32).tobytes()
    return raw_nifti(folder / ("lying.nii.gz" if spec["gz"] else "lying.nii"), None, shape=spec["shape"],
                     datatype=spec["datatype"], pixdim=spec["pixdim"], srow=spec["srow"], sform_code=spec["sform_code"],
                     qform_code=spec["qform_code"], vox_offset=spec["vox_offset"], payload=payload)


@given(nifti_headers())
@_settings(FAST)
def test_nifti_headers_that_lie_keep_the_promise(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        keeps_promise(_lying_nifti(spec, Path(folder)), "NIfTI header lies (Hypothesis)")


@pytest.mark.slow
@given(nifti_headers())
@_settings(SLOW)
def test_many_nifti_headers_that_lie_keep_the_promise(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        keeps_promise(_lying_nifti(spec, Path(folder)), "NIfTI header lies (Hypothesis)")


@st.composite
def sitk_headers(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 5))
    return {"dims": tuple(draw(st.lists(st.sampled_from([0, 1, 2, 5, 9, 70_000, -1]), min_size=n, max_size=n))),
            "type": draw(st.sampled_from(["MET_FLOAT", "MET_SHORT", "MET_UCHAR", "MET_DOUBLE", "MET_NONE", "MET_FOO"])),
            "spacing": tuple(draw(st.lists(_floats, min_size=n, max_size=n))),
            "matrix": tuple(draw(st.lists(st.one_of(_floats, st.sampled_from([0.0, 1.0])), min_size=n * n, max_size=n * n))),
            "payload": draw(st.sampled_from([0, 4, 100, 4000])), "nrrd": draw(st.booleans())}


def _lying_sitk(spec: dict, folder: Path) -> Path:
    data = np.random.default_rng(3).normal(size=(spec["payload"] // 4,)).astype(np.float32)
    if spec["nrrd"]:
        n = len(spec["dims"])
        directions = [tuple(spec["matrix"][i * n:(i + 1) * n]) for i in range(n)]
        type_name = {"MET_FLOAT": "float", "MET_SHORT": "short", "MET_UCHAR": "uchar", "MET_DOUBLE": "double"}.get(
            spec["type"], "quaternion")
        return nrrd(folder / "lying.nrrd", data, sizes=spec["dims"], type_name=type_name, directions=directions,
                    payload=data.tobytes())
    return metaimage(folder / "lying.mha", data, dim_size=spec["dims"], element_type=spec["type"],
                     spacing=spec["spacing"], matrix=spec["matrix"], payload=data.tobytes())


@given(sitk_headers())
@_settings(FAST)
def test_metaimage_and_nrrd_headers_that_lie_keep_the_promise(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        keeps_promise(_lying_sitk(spec, Path(folder)), "MHA/NRRD header lies (Hypothesis)")


@pytest.mark.slow
@given(sitk_headers())
@_settings(SLOW)
def test_many_metaimage_and_nrrd_headers_that_lie_keep_the_promise(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        keeps_promise(_lying_sitk(spec, Path(folder)), "MHA/NRRD header lies (Hypothesis)")


def test_a_header_claiming_more_memory_than_the_machine_has_is_refused_before_allocating(tmp_path: Path) -> None:
    """The issue's example: 2000³ float32 over a few KiB. Refused from the header, memory unchanged."""
    before = peak_rss_mb()
    for name in ("huge.nii", "huge.nii.gz"):
        path = raw_nifti(tmp_path / name, None, shape=(2000, 2000, 2000), payload=bytes(4096))
        assert keeps_promise(path, "header claims too much memory") == "refused"
        message = _message(path)
        assert "shape (2000, 2000, 2000)" in message and "29.8 GiB" in message and "available" in message, message
    path = metaimage(tmp_path / "huge.mha", np.zeros(8, np.float32), dim_size=(4000, 4000, 4000))
    assert keeps_promise(path, "header claims too much memory") == "refused"
    assert peak_rss_mb() - before < FUZZ_MEMORY_BYTES / 2**20  # nothing near the claimed size was allocated


def test_a_header_that_claims_more_data_than_the_file_holds_says_both(tmp_path: Path) -> None:
    path = raw_nifti(tmp_path / "short.nii.gz", None, shape=(40, 40, 40), payload=bytes(4096))
    message = _message(path)
    assert "truncated or corrupt" in message and "40×40×40 float32 = 250.0 KiB" in message, message
    assert "decompresses to 4.3 KiB" in message, message
    path = raw_nifti(tmp_path / "short.nii", None, shape=(40, 40, 40), payload=bytes(4096))
    assert "the file holds 4.3 KiB" in _message(path)


@pytest.mark.parametrize("case", ["zero pixdim", "non-finite sform", "singular sform", "zero spacing mha",
                                  "nan spacing nrrd", "inf pixdim beside an sform"])
def test_impossible_voxel_sizes_and_affines_are_refused(tmp_path: Path, case: str) -> None:
    data = good_volume(4)
    singular = np.eye(4)
    singular[0] = singular[1]
    nan_affine = np.eye(4)
    nan_affine[2, 3] = np.nan
    path = {
        "zero pixdim": lambda: raw_nifti(tmp_path / "a.nii.gz", data, pixdim=[0.0, 1.0, 1.0], sform_code=0, qform_code=0),
        "non-finite sform": lambda: raw_nifti(tmp_path / "b.nii.gz", data, srow=nan_affine),
        "singular sform": lambda: raw_nifti(tmp_path / "c.nii.gz", data, srow=singular),
        "zero spacing mha": lambda: metaimage(tmp_path / "d.mha", data, spacing=(1.0, 0.0, 1.0)),
        "nan spacing nrrd": lambda: nrrd(tmp_path / "e.nrrd", data, directions=[(1, 0, 0), (0, float("nan"), 0), (0, 0, 1)]),
        # found by the slow part: MONAI rebuilt the affine from an Inf pixdim that disagreed with the sform
        "inf pixdim beside an sform": lambda: raw_nifti(tmp_path / "f.nii", np.arange(2, dtype=np.uint8) + 1,
                                                        pixdim=[2.0, float("inf"), 0.0], sform_code=1),
    }[case]()
    assert keeps_promise(path, "impossible voxel size or affine") == "refused"


def test_sheared_and_negative_voxel_sizes_are_read_with_their_geometry(tmp_path: Path) -> None:
    data = good_volume(5)
    sheared = np.array([[1.0, 0.4, 0.0, 3.0], [0.0, 1.2, 0.0, -2.0], [0.0, 0.0, 2.5, 1.0], [0, 0, 0, 1]])
    path = raw_nifti(tmp_path / "sheared.nii.gz", data, srow=sheared)
    assert keeps_promise(path, "sheared affine") == "read"
    np.testing.assert_allclose(np.asarray(load_volume(path).affine), sheared, atol=1e-5)
    path = raw_nifti(tmp_path / "negative.nii.gz", data, pixdim=[-0.8, 0.9, 2.5], sform_code=0, qform_code=1)
    assert keeps_promise(path, "negative pixdim (taken as its size, as ITK and nibabel do)") == "read"


# ----------------------------------------------------------------------------------- values and shapes


@st.composite
def hostile_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.int32]))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=3)))
    kind = draw(st.sampled_from(["nan", "inf", "constant", "one nan", "fine"]))
    array = np.random.default_rng(draw(st.integers(0, 2**16))).normal(50, 10, shape).astype(dtype)
    if kind == "constant":
        array[...] = draw(st.sampled_from([0, 1, -1000, 255]))
    elif np.issubdtype(dtype, np.floating) and kind in ("nan", "inf", "one nan"):
        flat = array.reshape(-1)
        flat[: (1 if kind == "one nan" else flat.size)] = np.nan if "nan" in kind else np.inf
    return array


@given(hostile_arrays())
@_settings(FAST)
def test_non_finite_and_constant_images_are_refused_by_name(array: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "values.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        outcome = keeps_promise(path, "NaN/Inf/constant values (Hypothesis)")
        finite = bool(np.all(np.isfinite(array.astype(np.float64))))
        constant = array.size > 0 and bool(array.min() == array.max())
        assert outcome == ("read" if finite and not constant else "refused"), (array.dtype, array.ravel()[:5])


def test_one_voxel_one_slice_and_5d_files(tmp_path: Path) -> None:
    one_voxel = raw_nifti(tmp_path / "voxel.nii.gz", np.array([[[7.0]]], np.float32))
    assert keeps_promise(one_voxel, "1-voxel volume") == "refused"  # one voxel is one value: constant
    one_slice = raw_nifti(tmp_path / "slice.nii.gz", good_volume(6, (9, 11, 1)))
    assert keeps_promise(one_slice, "one-slice volume") == "read"
    five_d = raw_nifti(tmp_path / "five.nii.gz", good_volume(7, (5, 6, 7, 2, 3)))
    assert keeps_promise(five_d, "5D file") == "refused"
    assert "5D image" in _message(five_d)


# ----------------------------------------------------------------------------------- names and folders


def test_awkward_names_are_found_and_named_safely(tmp_path: Path) -> None:
    names = ["scan with spaces.nii.gz", "süß-ümlaut.nii.gz", "-leading-dash.nii.gz", "a..b.nii.gz", "日本.nii.gz"]
    (tmp_path / "in").mkdir()
    for i, name in enumerate(names):
        nib.save(nib.Nifti1Image(good_volume(10 + i), np.eye(4)), tmp_path / "in" / name)
    (tmp_path / "in" / ".hidden.nii.gz").write_bytes(b"")  # hidden files are not scans
    found = discover(tmp_path / "in")
    assert len(found.cases) == len(names)
    for case in found.cases:
        assert keeps_promise(case.path, "awkward file name") == "read"
        assert case.case_id and not case.case_id.startswith((".", "-")) and "/" not in case.case_id, case.case_id
        assert all(c.isascii() for c in case.case_id), case.case_id


def test_symlink_loops_do_not_hang_discovery(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    nib.save(nib.Nifti1Image(good_volume(20), np.eye(4)), root / "sub" / "real.nii.gz")
    (root / "sub" / "loop").symlink_to(root)  # a folder that contains itself
    (root / "self.nii.gz").symlink_to(root / "self.nii.gz")  # a file link to itself
    (root / "dangling.nii.gz").symlink_to(root / "gone.nii.gz")
    found = discover(root)
    assert [c.case_id for c in found.cases if not c.problem] == ["sub__real"]
    for case in found.cases:
        if case.problem:
            assert case.path.name in case.problem
    TALLY.add("symlink loops and dangling links", "skipped by discovery")
