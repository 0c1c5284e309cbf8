"""A seeded, CT-like synthetic segmentation dataset in mixed formats (DICOM series + SEG, and NRRD).

Each case is a torso-like slab: air outside a body ellipse, a fat layer, soft tissue, a ring of
rib-like bone, and three foreground classes with their own (overlapping, noisy) intensities:

====  ======  ========================================================  ==============
 1    organ   a large deformed ellipsoid (several % of the voxels)       ~60 HU
 2    vessel  a tube running through every slice, drifting in-plane     ~180 HU
 3    lesion  a small ellipsoid inside the organ, darker rim;           ~20 HU (rim -10)
              in about half of the cases only (well under 0.1 %)
====  ======  ========================================================  ==============

Sizes vary per case around the nominal ``shape`` (odd sizes on purpose), spacing is anisotropic
(0.7 x 0.7 x 5 mm by default), the orientation is a small rotation about z and the origin is not
zero. Even cases are a DICOM CT series (``<case>/image/``, one file per slice) with a DICOM SEG
(``<case>/label.dcm``) referencing it; odd cases are ``<case>/image.nrrd`` and ``<case>/label.nrrd``.
``dataset.json`` follows nnU-Net v2, listing the files under its ``dataset`` key (nnU-Net's way to
name files outside ``imagesTr``/``labelsTr``).

Arrays are in medseg's (x, y, z) index order; geometry (origin, direction) is in ITK/DICOM LPS.
Writing the DICOM SEG needs the optional ``highdicom`` (``pip install medseg[dicom-seg]``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from medseg._version import __version__
from medseg.io.atomic import atomic_write_text, current_umask

Shape3D = tuple[int, int, int]
Spacing3D = tuple[float, float, float]

#: Class value -> name, as in ``dataset.json`` (0 is background).
LABELS: dict[int, str] = {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
#: Mean HU per tissue; noise (and a slight blur) make neighbouring classes overlap.
HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "bone": 700.0, "organ": 60.0, "vessel": 180.0,
      "lesion": 20.0, "lesion_rim": -10.0}
NOISE_HU = 15.0
#: DICOM stores HU + 1024 as int16 (RescaleIntercept -1024, RescaleSlope 1), as many CT scanners do.
RESCALE_INTERCEPT = -1024
# Fixed, so that one seed gives byte-identical slice files (UIDs are derived from the seed too).
_DATE, _TIME = "20240101", "120000"


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: arrays in (x, y, z) order, geometry in LPS (ITK/DICOM)."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8, values in LABELS
    spacing: Spacing3D
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; columns are the x, y, z axis directions

    @property
    def has_lesion(self) -> bool:
        return bool((self.label == 3).any())

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """``array`` (x, y, z) as a SimpleITK image on this case's grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def synthetic_ct_case(index: int, seed: int = 0, shape: Shape3D = (128, 128, 24),
                      spacing: Spacing3D = (0.7, 0.7, 5.0), lesion: bool = True) -> SyntheticCase:
    """Generate case ``index`` of the dataset seeded ``seed`` (independent of how many cases there are).

    Args:
        index: case number; with ``seed`` it fixes the random stream.
        seed: dataset seed.
        shape: nominal (x, y, z) size; in-plane sizes vary by about +-12 %, the slice count by about
            +-17 % (128 x 128 x 24 gives 112-144 x 112-144 x 20-28).
        spacing: (x, y, z) voxel size in mm.
        lesion: whether to draw the lesion (class 3).

    Raises:
        ValueError: a size below 8 x 8 x 2 or a non-positive spacing.
    """
    if len(shape) != 3 or min(shape[:2]) < 8 or shape[2] < 2:
        raise ValueError(f"shape={tuple(shape)}: expected (x, y, z) with x, y >= 8 and z >= 2, e.g. (128, 128, 24)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={tuple(spacing)}: expected three positive sizes in mm, e.g. (0.7, 0.7, 5.0)")
    rng = np.random.default_rng([seed, index])
    nx = _vary(rng, shape[0], 0.125) | 1  # odd in-plane widths on purpose
    ny = _vary(rng, shape[1], 0.125)
    nz = max(2, _vary(rng, shape[2], 1 / 6))
    scale = min(shape[0], shape[1])  # structures scale with the nominal size, not the varied one
    x, y = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij")
    z = np.arange(nz, dtype=np.float32)
    # the draws happen in this order: a case's stream must not change when the code is rearranged
    image, label, organ, (zc, hz) = _anatomy(rng, x, y, z, scale)
    if lesion:
        _draw_lesion(rng, image, label, organ, x, y, z, zc, hz, scale, spacing)
    image = _scanner(rng, image)
    origin, direction = _scan_pose(rng, nx, ny, spacing)
    return SyntheticCase(image, label, (float(spacing[0]), float(spacing[1]), float(spacing[2])), origin, direction)


def _anatomy(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray,
             scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """Body, fat, bone ring, organ (1) and vessel (2): the image in HU, the label, the organ's mask and
    its z-centre and half-height (where the lesion goes)."""
    nx, ny, nz = x.shape[0], x.shape[1], z.shape[0]
    # Body: an ellipse a little off-centre, breathing slightly along z; fat under the skin; bone ring.
    bx, by = nx / 2 + rng.uniform(-0.04, 0.04) * nx, ny / 2 + rng.uniform(-0.04, 0.04) * ny
    ax, ay = 0.44 * nx * rng.uniform(0.92, 1.0), 0.36 * ny * rng.uniform(0.92, 1.0)
    body_phase = rng.uniform(0, 2 * np.pi)
    body_scale = 1 + 0.03 * np.sin(2 * np.pi * z / max(nz, 4) + body_phase)
    rho_body = np.sqrt(((x - bx) / ax) ** 2 + ((y - by) / ay) ** 2)[..., None] / body_scale  # (x, y, z)
    theta_body = np.arctan2((y - by) / ay, (x - bx) / ax)[..., None]
    image = np.full((nx, ny, nz), HU["air"], dtype=np.float32)
    image[rho_body < 1.0] = HU["fat"]
    image[rho_body < 0.9] = HU["soft_tissue"]
    ribs = (rho_body > 0.8) & (rho_body < 0.845) & (np.cos(9 * theta_body + rng.uniform(0, 2 * np.pi)) > -0.2)
    image[ribs] = HU["bone"]

    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    # Organ and vessel sit on opposite sides of the body centre.
    psi = rng.uniform(0, 2 * np.pi)
    side = psi + np.pi + rng.uniform(-0.5, 0.5)
    ox, oy = bx + 0.28 * ax * np.cos(side), by + 0.28 * ay * np.sin(side)
    rx, ry = rng.uniform(0.36, 0.46) * ax, rng.uniform(0.28, 0.36) * ay
    phi = rng.uniform(0, np.pi)
    u = ((x - ox) * np.cos(phi) + (y - oy) * np.sin(phi)) / rx
    v = (-(x - ox) * np.sin(phi) + (y - oy) * np.cos(phi)) / ry
    theta = np.arctan2(v, u)
    wobble = 1 + 0.12 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi)) + 0.06 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    zc, hz = rng.uniform(0.4, 0.6) * nz, rng.uniform(0.32, 0.45) * nz
    taper = np.sqrt(np.clip(1 - ((z - zc) / hz) ** 2, 0, None))  # (z,)
    organ = (np.sqrt(u**2 + v**2) / wobble)[..., None] < taper * 1.0
    organ &= rho_body < 0.78
    label[organ] = 1
    image[organ] = HU["organ"]

    vessel_radius = rng.uniform(0.035, 0.05) * scale
    drift = rng.uniform(-0.25, 0.25, size=2) * vessel_radius  # voxels per slice
    bend = rng.uniform(0.5, 1.5) * vessel_radius
    zz = z - nz / 2
    vx = bx + 0.5 * ax * np.cos(psi) + drift[0] * zz + bend * np.sin(zz / max(nz, 4) * np.pi)
    vy = by + 0.5 * ay * np.sin(psi) + drift[1] * zz
    vessel = (x[..., None] - vx) ** 2 + (y[..., None] - vy) ** 2 < vessel_radius**2
    vessel &= rho_body < 0.78
    label[vessel] = 2
    image[vessel] = HU["vessel"]

    return image, label, organ, (zc, hz)


def _draw_lesion(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, organ: np.ndarray, x: np.ndarray,
                 y: np.ndarray, z: np.ndarray, zc: float, hz: float, scale: int, spacing: Spacing3D) -> None:
    """The lesion (3), in place: a rim and a darker core inside the organ's middle third."""
    # Centre in a voxel of the organ's middle third, radius ~3-4.5 mm at 128 voxels in-plane.
    core = np.argwhere(organ & (np.abs(z - zc) < max(hz / 3, 0.5))[None, None, :])
    if len(core) == 0:
        core = np.argwhere(organ)
    cx, cy, cz = core[rng.integers(len(core))].astype(np.float32)
    radius = rng.uniform(0.035, 0.05) * scale
    radius_z = max(radius * spacing[0] / spacing[2], 0.6)  # always at least its own slice
    rho_lesion = np.sqrt(((x[..., None] - cx) ** 2 + (y[..., None] - cy) ** 2) / radius**2
                         + ((z - cz) / radius_z) ** 2)
    mask = rho_lesion < 1.0
    label[mask] = 3
    image[mask] = HU["lesion_rim"]
    image[rho_lesion < 0.65] = HU["lesion"]


def _scanner(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Partial volume in-plane, then scanner noise; stored as int16 HU."""
    image = gaussian_filter(image, sigma=(0.6, 0.6, 0.0))
    image += rng.normal(0.0, NOISE_HU, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image


def _scan_pose(rng: np.random.Generator, nx: int, ny: int,
               spacing: Spacing3D) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """A gantry tilt of 5-15 degrees about z and an origin near the body centre."""
    angle = np.deg2rad(rng.uniform(5, 15) * rng.choice([-1, 1]))
    c, s = float(np.cos(angle)), float(np.sin(angle))
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    # Origin rounded to 0.01 mm so that DICOM's decimal strings hold it exactly.
    origin = (round(-nx * spacing[0] / 2 + rng.uniform(-20, 20), 2),
              round(-ny * spacing[1] / 2 + rng.uniform(-20, 20), 2),
              round(rng.uniform(-300, 100), 2))
    return origin, direction


def _vary(rng: np.random.Generator, nominal: int, fraction: float) -> int:
    spread = max(1, round(nominal * fraction))
    return int(nominal + rng.integers(-spread, spread + 1))


def write_synthetic_ct(root: Path, n_cases: int = 24, seed: int = 0, shape: Shape3D = (128, 128, 24),
                       spacing: Spacing3D = (0.7, 0.7, 5.0), progress: bool = False) -> dict:
    """Write the seeded synthetic CT dataset into case folders under ``root``.

    Layout: ``<root>/case_000/image/*.dcm`` + ``label.dcm`` (DICOM SEG) for even cases,
    ``<root>/case_001/image.nrrd`` + ``label.nrrd`` for odd ones, and ``<root>/dataset.json``.
    Each case folder is built in a hidden temporary folder and renamed into place, so an interrupted
    run never leaves a half-written case under its final name. Existing case folders are replaced.

    Args:
        root: dataset folder (created).
        n_cases: number of cases; the lesion is drawn in ``ceil(n_cases / 2)`` of them, chosen by ``seed``.
        seed: one seed fixes every voxel and every UID.
        shape: nominal (x, y, z) size, see :func:`synthetic_ct_case`.
        spacing: (x, y, z) voxel size in mm.
        progress: show a progress bar.

    Returns:
        A summary: ``root``, ``cases`` (per case: id, format, image and label paths relative to
        ``root``, shape, spacing, origin, direction, voxel counts per class, has_lesion),
        ``class_fractions`` (voxel fraction of each class over the dataset) and ``lesion_cases``.

    Raises:
        ValueError: ``n_cases`` below 1, or a bad shape/spacing.
        ImportError: ``highdicom`` is missing (needed for the DICOM SEG labels).
    """
    if n_cases < 1:
        raise ValueError(f"n_cases={n_cases}: need at least one case")
    _require_highdicom()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_lesion = (n_cases + 1) // 2
    lesion_ids = {int(i) for i in np.random.default_rng([seed, 1_000_003]).permutation(n_cases)[:n_lesion]}
    cases: list[dict] = []
    totals = np.zeros(len(LABELS), dtype=np.int64)
    for index in tqdm(range(n_cases), desc="synthetic CT", unit="case", disable=not progress):
        case_id = f"case_{index:03d}"
        case = synthetic_ct_case(index, seed, shape, spacing, lesion=index in lesion_ids)
        dicom = index % 2 == 0
        with _case_folder(root / case_id) as tmp:
            if dicom:
                uids = _uids(seed, case_id)
                _write_ct_series(case, tmp / "image", case_id, uids)
                _write_label_seg(case.label, tmp / "image", uids["series"], tmp / "label.dcm")
            else:
                sitk.WriteImage(case.to_sitk(case.image), str(tmp / "image.nrrd"), useCompression=True)
                sitk.WriteImage(case.to_sitk(case.label), str(tmp / "label.nrrd"), useCompression=True)
        counts = np.bincount(case.label.ravel(), minlength=len(LABELS))
        totals += counts
        cases.append({
            "case_id": case_id, "format": "dicom" if dicom else "nrrd",
            "image": f"{case_id}/image" if dicom else f"{case_id}/image.nrrd",
            "label": f"{case_id}/label.dcm" if dicom else f"{case_id}/label.nrrd",
            "shape": list(case.image.shape), "spacing": list(case.spacing), "origin": list(case.origin),
            "direction": list(case.direction),
            "voxels": {LABELS[v]: int(counts[v]) for v in LABELS}, "has_lesion": case.has_lesion,
        })
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in LABELS.items()},
        "numTraining": n_cases,
        "file_ending": "mixed",
        "description": (f"Seeded synthetic CT (medseg.data.synthetic, seed {seed}, nominal shape {list(shape)}, "
                        f"spacing {list(spacing)} mm): even cases DICOM series + DICOM SEG, odd cases NRRD. "
                        "Lesion (3) present in about half the cases."),
        "dataset": {c["case_id"]: {"images": [c["image"]], "label": c["label"]} for c in cases},
    }
    atomic_write_text(root / "dataset.json", json.dumps(dataset, indent=2))
    total = int(totals.sum())
    return {
        "root": str(root),
        "cases": cases,
        "class_fractions": {LABELS[v]: float(totals[v] / total) for v in LABELS},
        "lesion_cases": [c["case_id"] for c in cases if c["has_lesion"]],
    }


def _require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "write_synthetic_ct needs highdicom to write the DICOM SEG labels: pip install 'medseg[dicom-seg]'"
        ) from err


@contextmanager
def _case_folder(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; on success it replaces ``final``."""
    # ".<name>.<random>.tmp", like medseg.io.atomic's temporaries
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        old = None
        if final.exists():  # a folder cannot be renamed onto a full one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _uids(seed: int, case_id: str) -> dict[str, str]:
    """Study, series and frame-of-reference UIDs derived from the seed and case (reproducible)."""
    return {kind: generate_uid(entropy_srcs=["medseg.synthetic_ct", str(seed), case_id, kind])
            for kind in ("study", "series", "frame")}


def _ds(values: Sequence[float] | np.ndarray) -> list[str]:
    """Decimal strings that fit DICOM's 16 characters."""
    return [f"{v:.10g}" if abs(v) >= 1e-9 else "0" for v in values]


def _write_ct_series(case: SyntheticCase, folder: Path, case_id: str, uids: dict[str, str]) -> None:
    """One CT Image Storage file per slice, ``slice_000.dcm``... from inferior to superior."""
    folder.mkdir(parents=True)
    direction = np.asarray(case.direction).reshape(3, 3)
    orientation = _ds([*direction[:, 0], *direction[:, 1]])
    stored = (case.image.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
    for k in range(case.image.shape[2]):
        position = np.asarray(case.origin) + direction[:, 2] * case.spacing[2] * k
        sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = _DATE
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = _TIME
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "medseg synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "medseg synthetic CT"
        ds.SeriesDescription = "synthetic CT"
        ds.PatientName = f"Synthetic^{case_id}"
        ds.PatientID = case_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = _ds([case.spacing[2]])[0]
        ds.SpacingBetweenSlices = _ds([case.spacing[2]])[0]
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = uids["study"]
        ds.SeriesInstanceUID = uids["series"]
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = orientation
        ds.FrameOfReferenceUID = uids["frame"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds([position[2]])[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = case.image.shape[1], case.image.shape[0]
        ds.PixelSpacing = _ds([case.spacing[1], case.spacing[0]])  # between rows (y), between columns (x)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(RESCALE_INTERCEPT), "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


def _segment_codes() -> dict[int, tuple]:
    """(segmented property category, segmented property type) codes per class."""
    from pydicom.sr.codedict import codes

    return {1: (codes.SCT.AnatomicalStructure, codes.SCT.Organ),
            2: (codes.SCT.AnatomicalStructure, codes.SCT.BloodVessel),
            3: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)}


def _write_label_seg(label: np.ndarray, series_folder: Path, series_uid: str, path: Path) -> None:
    """A BINARY DICOM SEG of ``label`` (x, y, z) referencing the series: one segment per class
    (segment number = class value) and a frame for every slice of every segment, empty ones too.

    medseg.io.dicom_seg.write_dicom_seg is not used: it omits empty frames (highdicom's default)
    and describes every segment as generic tissue from an AI algorithm.
    """
    import highdicom as hd

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder), series_uid)
    sources = [pydicom.dcmread(f) for f in files]
    if len(sources) != label.shape[2]:
        raise ValueError(f"{series_folder}: {len(sources)} slices but the label has {label.shape[2]}")
    normal = np.cross(np.asarray(sources[0].ImageOrientationPatient[:3], float),
                      np.asarray(sources[0].ImageOrientationPatient[3:], float))
    along = [float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))) for s in sources]
    if along != sorted(along):  # GDCM's order is the label's slice order; check rather than trust
        raise ValueError(f"{series_folder}: slices are not listed in position order")
    frames = np.ascontiguousarray(label.transpose(2, 1, 0))  # (slices, rows = y, columns = x)
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="medseg.data.synthetic", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=LABELS[value], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value, (category, kind) in _segment_codes().items()
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(entropy_srcs=[series_uid, "seg_series"]),
        series_number=2, sop_instance_uid=generate_uid(entropy_srcs=[series_uid, "seg_instance"]),
        instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg.data.synthetic",
        software_versions=__version__, device_serial_number="none",
        series_description="synthetic CT ground truth", omit_empty_frames=False,
    )
    seg.save_as(path)



# ------------------------------------------------------------------ multi-modal brain tumour (BraTS-like)

#: Label value -> name of the tumour dataset (nnU-Net v2 ``dataset.json`` holds the inverse).
TUMOUR_LABELS: dict[int, str] = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
TUMOUR_CHANNELS = ("FLAIR", "T1c")
#: Mean (FLAIR, T1c) per tissue before texture, per-case gain, bias field and noise. Distractors
#: overlap the tumour on purpose: white-matter hyperintensities are as bright as edema on FLAIR,
#: vessels as bright as the enhancing rim on T1c, ventricles as dark as necrosis on T1c.
TUMOUR_INTENSITY: dict[str, tuple[float, float]] = {
    "brain": (0.45, 0.50), "csf": (0.18, 0.20), "hyperintensity": (0.80, 0.50), "vessel": (0.47, 0.80),
    "edema": (0.76, 0.43), "enhancing": (0.68, 0.84), "necrosis": (0.56, 0.23),
}
TUMOUR_NOISE = 0.07


@dataclass(frozen=True)
class TumourCase:
    """One generated brain: channel arrays and label in (x, y, z) order, ``affine`` voxel -> RAS mm."""

    flair: np.ndarray  # float32, 0 outside the brain (skull-stripped)
    t1c: np.ndarray    # float32, 0 outside the brain
    label: np.ndarray  # uint8, values in TUMOUR_LABELS
    affine: np.ndarray


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise with unit standard deviation (texture, shape wobble, bias field)."""
    field = gaussian_filter(rng.normal(size=tuple(shape)).astype(np.float32), sigma=sigma)
    return field / max(float(field.std()), 1e-6)


def _ellipsoid_radius(grid: Sequence[np.ndarray], centre: np.ndarray, axes: np.ndarray,
                      rotation: np.ndarray) -> np.ndarray:
    """Normalised radius (1 on the surface) of a rotated ellipsoid, on a grid of mm coordinates."""
    offset = [g - c for g, c in zip(grid, centre)]
    rho = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for row, axis in zip(rotation.T, axes):  # each ellipsoid axis: project, scale, square
        rho += ((offset[0] * row[0] + offset[1] * row[1] + offset[2] * row[2]) / axis) ** 2
    return np.sqrt(rho)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _tumours(rng: np.random.Generator, grid: Sequence[np.ndarray], brain: np.ndarray, brain_rho: np.ndarray,
             brain_axes: np.ndarray, spacing: Spacing3D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole tumour, core and necrosis masks of 1-3 tumours, nested exactly: each core lies in the
    one-voxel erosion of its whole tumour, each necrosis in the erosion of its core (full 3x3x3
    structure), so a core's neighbours are tumour and a necrosis' neighbours are core."""
    from scipy.ndimage import binary_erosion

    full = np.ones((3, 3, 3), dtype=bool)
    whole, core, necrosis = (np.zeros(brain.shape, dtype=bool) for _ in range(3))
    step = max(spacing)
    wobble = _smooth_field(rng, brain.shape, sigma=2.5)
    inner = np.argwhere(brain & (brain_rho < 0.6))
    count = int(rng.integers(1, 4))
    for _ in range(count):
        centre = np.array([g.ravel()[i] for g, i in zip(grid, inner[rng.integers(len(inner))])])
        # a few % to ~15 % of the brain in all, whatever the count; never thinner than the erosions
        r_whole = max(4 * step, float(brain_axes.min()) * rng.uniform(0.35, 0.55) / count ** 0.25)
        r_core = max(2.5 * step, r_whole * rng.uniform(0.55, 0.72))
        r_necrosis = max(1.5 * step, r_core * rng.uniform(0.6, 0.8))
        shift = rng.uniform(-0.15, 0.15, 3) * r_whole  # the core sits off-centre in its edema
        rotation = _rotation(rng)  # shared: the parts of one tumour are aligned, each stretched its own way
        rho = [_ellipsoid_radius(grid, c, r * rng.uniform(0.8, 1.2, 3), rotation)
               for r, c in ((r_whole, centre), (r_core, centre + shift), (r_necrosis, centre + shift))]
        one_whole = (rho[0] + 0.12 * wobble < 1) & brain
        one_core = (rho[1] + 0.08 * wobble < 1) & binary_erosion(one_whole, full)
        one_necrosis = (rho[2] < 1) & binary_erosion(one_core, full)
        whole |= one_whole
        core |= one_core
        necrosis |= one_necrosis
    return whole, core, necrosis


def _satellites(rng: np.random.Generator, whole: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Small fragmented enhancing spots (1 to ~30 voxels) in the edema, apart from the cores: random
    walks kept to the eroded whole tumour, so the edema encloses every one of them."""
    from scipy.ndimage import binary_dilation, binary_erosion

    full = np.ones((3, 3, 3), dtype=bool)
    allowed = binary_erosion(whole, full) & ~binary_dilation(core, full, iterations=2)
    spots = np.zeros(whole.shape, dtype=bool)
    seeds = np.argwhere(allowed)
    if len(seeds) == 0:
        return spots
    for _ in range(int(rng.integers(8, 17))):
        voxel = seeds[rng.integers(len(seeds))].copy()
        for _ in range(int(rng.integers(1, 30))):
            spots[tuple(voxel)] = True
            axis = rng.integers(3)
            voxel[axis] = np.clip(voxel[axis] + rng.choice([-1, 1]), 0, whole.shape[axis] - 1)
    return spots & allowed


def _distractors(rng: np.random.Generator, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR-bright blobs and T1c-bright vessel segments in normal brain (not labelled)."""
    blobs, vessels = np.zeros(normal.shape, dtype=bool), np.zeros(normal.shape, dtype=bool)
    seeds = np.argwhere(normal)
    for target, count, length in ((blobs, rng.integers(2, 6), 24), (vessels, rng.integers(3, 7), 40)):
        for _ in range(int(count)):
            voxel = seeds[rng.integers(len(seeds))].copy()
            direction = rng.integers(3)  # vessels run mostly one way; blobs wander
            for _ in range(int(rng.integers(length // 2, length))):
                target[tuple(voxel)] = True
                axis = direction if (target is vessels and rng.random() < 0.7) else rng.integers(3)
                voxel[axis] = np.clip(voxel[axis] + rng.choice([-1, 1]), 0, normal.shape[axis] - 1)
    from scipy.ndimage import binary_dilation

    blobs = binary_dilation(blobs)  # patches a few voxels thick, not threads the blur would wash out
    return blobs & normal, vessels & normal


def synthetic_tumour_case(index: int, seed: int = 0, shape: Shape3D = (64, 64, 48),
                          spacing: Spacing3D = (1.2, 1.2, 2.0)) -> TumourCase:
    """Generate brain ``index`` of the tumour dataset seeded ``seed`` (independent of the case count).

    A skull-stripped brain-like ellipsoid with smooth texture and ventricles; 1-3 tumours, each an
    edema (bright on FLAIR) enclosing an enhancing rim (bright on T1c) enclosing a necrotic core
    (dark on T1c), random rotated ellipsoids with wobbly surfaces; 8-16 small enhancing satellites in
    the edema; unlabelled distractors; then partial-volume blur, a multiplicative bias field,
    noise and a per-case gain per channel.

    Raises:
        ValueError: a size below 16 voxels or a non-positive spacing.
    """
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape={tuple(shape)}: expected (x, y, z) with every size >= 16, e.g. (64, 64, 48)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={tuple(spacing)}: expected three positive sizes in mm, e.g. (1.2, 1.2, 2.0)")
    rng = np.random.default_rng([seed, index, 31])  # its own stream: not the CT dataset's
    grid = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape([-1 if a == i else 1 for a in range(3)])
            for i, (n, s) in enumerate(zip(shape, spacing))]
    extent = np.array(shape) * np.array(spacing)
    brain_axes = extent * np.array([0.42, 0.45, 0.42]) * rng.uniform(0.88, 1.0, 3)
    brain_rho = _ellipsoid_radius(grid, rng.uniform(-0.03, 0.03, 3) * extent, brain_axes, np.eye(3))
    brain_rho = brain_rho + 0.04 * _smooth_field(rng, shape, sigma=4.0)
    brain = brain_rho < 1.0
    ventricles = brain & (_ellipsoid_radius(grid, np.zeros(3), brain_axes * [0.12, 0.3, 0.2], np.eye(3)) < 1)

    whole, core, necrosis = _tumours(rng, grid, brain, brain_rho, brain_axes, spacing)
    enhancing = (core | _satellites(rng, whole, core)) & ~necrosis
    label = np.zeros(shape, dtype=np.uint8)
    label[whole] = 2
    label[enhancing] = 3
    label[necrosis] = 1
    blobs, vessels = _distractors(rng, brain & ~whole & ~ventricles)

    tissue = {"csf": ventricles, "hyperintensity": blobs, "vessel": vessels, "edema": label == 2,
              "enhancing": label == 3, "necrosis": label == 1}
    texture = _smooth_field(rng, shape, sigma=1.5)
    channels = []
    for channel in range(len(TUMOUR_CHANNELS)):
        image = np.where(brain, TUMOUR_INTENSITY["brain"][channel], 0.0).astype(np.float32)
        for name, mask in tissue.items():  # each tumour part a little brighter or darker per case
            image[mask] = TUMOUR_INTENSITY[name][channel] * rng.uniform(0.92, 1.08)
        image *= 1 + 0.1 * texture
        image = gaussian_filter(image, sigma=0.7)  # partial volume
        image *= np.exp(0.12 * _smooth_field(rng, shape, sigma=min(shape) / 4))  # bias field
        image += rng.normal(0.0, TUMOUR_NOISE, shape).astype(np.float32)
        image = np.where(brain, np.maximum(image, 0.0) * 1000 * rng.uniform(0.7, 1.3), 0.0)
        channels.append(image.astype(np.float32))
    return TumourCase(channels[0], channels[1], label, _tumour_affine(rng, shape, spacing))


def _tumour_affine(rng: np.random.Generator, shape: Shape3D, spacing: Spacing3D) -> np.ndarray:
    """A small head tilt (about z and x), the volume's centre near the scanner's origin."""
    about_z, about_x = np.deg2rad(rng.uniform(3, 10) * rng.choice([-1, 1])), np.deg2rad(rng.uniform(-5, 5))
    rz = np.array([[np.cos(about_z), -np.sin(about_z), 0], [np.sin(about_z), np.cos(about_z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(about_x), -np.sin(about_x)], [0, np.sin(about_x), np.cos(about_x)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + rng.uniform(-10, 10, 3)
    return affine


def write_synthetic_tumour_dataset(out: Path, n_train: int = 6, n_test: int = 4, shape: Shape3D = (64, 64, 48),
                                   spacing: Spacing3D = (1.2, 1.2, 2.0), seed: int = 0,
                                   progress: bool = False) -> Path:
    """Write a seeded BraTS-like two-channel tumour dataset in nnU-Net v2 layout.

    ``imagesTr/case_000_0000.nii.gz`` (FLAIR) and ``_0001`` (T1c), ``labelsTr/case_000.nii.gz``;
    the test cases (numbered after the training ones) in ``imagesTs/`` and ``labelsTs/``; and
    ``dataset.json`` with ``channel_names``, ``labels`` (background 0, necrosis 1, edema 2,
    enhancing 3), ``numTraining`` and ``file_ending``. Labels nest exactly: necrosis is enclosed
    by the enhancing rim, rim and satellites by the edema (nnU-Net's BraTS regions whole tumour >
    tumour core > enhancing). Each file is written under a hidden temporary name and renamed into
    place; case files of an earlier, larger run in the same folder are removed.

    Args:
        out: dataset folder (created).
        n_train, n_test: numbers of training and test cases.
        shape: (x, y, z) size of every case.
        spacing: (x, y, z) voxel size in mm.
        seed: one seed fixes every voxel.
        progress: show a progress bar.

    Returns:
        ``out``.

    Raises:
        ValueError: ``n_train`` below 1, ``n_test`` below 0, or a bad shape or spacing.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: need at least one training case and no negative count")
    out = Path(out)
    folders = {name: out / name for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    written: set[Path] = set()
    for index in tqdm(range(n_train + n_test), desc="synthetic tumour", unit="case", disable=not progress):
        case = synthetic_tumour_case(index, seed, shape, spacing)
        split = "Tr" if index < n_train else "Ts"
        case_id = f"case_{index:03d}"
        files = {folders[f"images{split}"] / f"{case_id}_0000.nii.gz": case.flair,
                 folders[f"images{split}"] / f"{case_id}_0001.nii.gz": case.t1c,
                 folders[f"labels{split}"] / f"{case_id}.nii.gz": case.label}
        for path, array in files.items():
            image = nib.Nifti1Image(array, case.affine)
            image.set_qform(case.affine, code=1)  # both forms, so every reader sees the same geometry
            image.set_sform(case.affine, code=1)
            image.header.set_xyzt_units("mm")
            _save_atomic(image, path)
            written.add(path)
    for folder in folders.values():  # leftovers of an earlier run with more cases
        for stale in folder.glob("case_*.nii.gz") if folder.is_dir() else ():
            if stale not in written:
                stale.unlink()
    dataset = {
        "channel_names": {str(i): name for i, name in enumerate(TUMOUR_CHANNELS)},
        "labels": {name: value for value, name in TUMOUR_LABELS.items()},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "description": (f"Seeded synthetic BraTS-like brain tumours (medseg.data.synthetic, seed {seed}, shape "
                        f"{list(shape)}, spacing {list(spacing)} mm): necrosis inside an enhancing rim inside "
                        f"edema, small enhancing satellites. {n_test} test case(s) in imagesTs/labelsTs."),
    }
    atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=2))
    return out


def _save_atomic(image: nib.Nifti1Image, path: Path) -> None:
    """``nib.save`` under a hidden temporary name, then rename: no half-written file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(image, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
