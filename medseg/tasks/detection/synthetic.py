"""A seeded synthetic CT set for detection: medseg's synthetic torso (:func:`medseg.data.synthetic.
synthetic_ct_case`, organ, vessel, ribs, noise, tilted grid, anisotropic voxels) without its one
rare lesion, and instead several small lesions per scan in the organ, each its own size and
contrast (hypo- or hyperdense, some faint). The label map holds the lesions only (value 1).

Written as NIfTI (``images/``, ``labels/``) under ``data.root / data.synthetic.folder``, with a
manifest (60 % train, 20 % val, 20 % test) and ``lesions.json`` (every lesion's centre, radius
and contrast). Nothing is rewritten when the folder holds the set of this exact config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion
from tqdm import tqdm

from medseg.data.manifest import Case, Manifest, read_manifest, sha256_of, write_manifest
from medseg.data.synthetic import NOISE_HU, synthetic_ct_case
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.tasks.detection.config import SyntheticLesionsConfig

INFO_FILE = "lesions.json"
#: A lesion's contrast is at least this far from the organ (HU): fainter ones are noise.
MIN_CONTRAST_HU = 15.0


@dataclass(frozen=True)
class Lesion:
    centre_voxel: tuple[float, float, float]
    radius_mm: float
    contrast_hu: float


def _draw_lesions(rng: np.random.Generator, image: np.ndarray, organ: np.ndarray, spacing: tuple[float, ...],
                  cfg: SyntheticLesionsConfig) -> tuple[np.ndarray, list[Lesion]]:
    """Lesions painted into ``image`` (in place) inside ``organ``, apart from each other; their label map."""
    label = np.zeros(image.shape, dtype=np.uint8)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(image.shape, spacing)], indexing="ij")
    inner = binary_erosion(organ, iterations=2)
    candidates = np.argwhere(inner if inner.any() else organ)
    lesions: list[Lesion] = []
    wanted = int(rng.integers(cfg.lesions[0], cfg.lesions[1] + 1))
    for _ in range(wanted * 50):  # tries: lesions must not touch
        if len(lesions) == wanted or len(candidates) == 0:
            break
        centre = candidates[rng.integers(len(candidates))].astype(np.float64)
        radius = float(rng.uniform(*cfg.radius_mm))
        centre_mm = centre * np.asarray(spacing)
        if any(np.linalg.norm(centre_mm - np.asarray(o.centre_voxel) * spacing) < radius + o.radius_mm + 2.0
               for o in lesions):
            continue
        contrast = float(rng.uniform(*cfg.contrast_hu))
        if abs(contrast) < MIN_CONTRAST_HU:
            contrast = float(np.copysign(MIN_CONTRAST_HU, contrast or 1.0))
        stretch = rng.uniform(0.8, 1.2, 3)  # ellipsoids, not balls
        # at least one slice thick whatever the slice spacing
        radii = np.maximum(radius * stretch, np.asarray(spacing) * 0.6)
        rho = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii)))
        mask = rho < 1.0
        if not mask.any():
            continue
        # a soft edge (partial volume) over the outer fifth of the radius
        image += (contrast * np.clip((1.0 - rho) / 0.2, 0.0, 1.0)).astype(image.dtype)
        label[mask] = 1
        lesions.append(Lesion(tuple(float(c) for c in centre), radius, contrast))  # type: ignore[arg-type]
    return label, lesions


def lesion_case(index: int, cfg: SyntheticLesionsConfig) -> tuple[sitk.Image, sitk.Image, list[Lesion]]:
    """Scan ``index`` of the set: the image (HU) and lesion label as SimpleITK images on the
    scan's tilted grid, and its lesions."""
    case = synthetic_ct_case(index, cfg.seed, cfg.shape, cfg.spacing, lesion=False)
    rng = np.random.default_rng([cfg.seed, index, 0x1E51])  # not the torso's stream
    image = case.image.astype(np.float32)
    label, lesions = _draw_lesions(rng, image, case.label == 1, case.spacing, cfg)
    image += rng.normal(0.0, NOISE_HU / 3, image.shape).astype(np.float32)  # the lesions get texture too
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return case.to_sitk(hu), case.to_sitk(label), lesions


def _split(index: int, total: int) -> str:
    n_test = max(1, round(total * 0.2))
    n_val = max(1, round(total * 0.2))
    if index >= total - n_test:
        return "test"
    return "val" if index >= total - n_test - n_val else "train"


def write_lesion_dataset(cfg: SyntheticLesionsConfig, root: Path, manifest_path: Path, progress: bool = False) -> Path:
    """Write the set under ``root / cfg.folder`` and its manifest (paths relative to ``root``).

    Returns:
        The manifest's path.
    """
    folder, manifest_path = Path(root) / cfg.folder, Path(manifest_path)
    info_path = folder / INFO_FILE
    settings = cfg.model_dump(mode="json")
    if info_path.is_file() and manifest_path.is_file() \
            and json.loads(info_path.read_text()).get("config") == settings \
            and len(read_manifest(manifest_path).cases) == cfg.cases:
        return manifest_path
    cases, described = [], {}
    for index in tqdm(range(cfg.cases), desc="synthetic lesions", unit="scan", disable=not progress):
        case_id = f"scan_{index:03d}"
        image, label, lesions = lesion_case(index, cfg)
        paths = {}
        for kind, volume in (("images", image), ("labels", label)):
            relative = f"{cfg.folder}/{kind}/{case_id}.nii.gz"
            (Path(root) / relative).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(root) / relative, suffix=".nii.gz") as tmp:
                sitk.WriteImage(volume, str(tmp), useCompression=True)
            paths[kind] = relative
        cases.append(Case(case_id, (paths["images"],), paths["labels"], _split(index, cfg.cases),
                          image_sha256=(sha256_of(Path(root) / paths["images"]),),
                          label_sha256=sha256_of(Path(root) / paths["labels"])))
        described[case_id] = [lesion.__dict__ for lesion in lesions]
    write_manifest(Manifest(manifest_path, tuple(cases)), manifest_path)
    # last: its presence means the set is complete
    atomic_write_text(info_path, json.dumps({"config": settings, "lesions": described}, indent=1))
    return manifest_path
