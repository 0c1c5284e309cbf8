"""Random-ellipse phantoms: the training images of sparse-view CT (FBPConvNet's recipe).

Each phantom is a body ellipse filled with smaller ellipses of random position, size, angle and
intensity (added, as in Shepp-Logan, then clipped to [0, 1]), inside the circle that every
projection angle sees. The set depends only on ``PhantomConfig`` (its own seed, not the run's), so
the files, and the manifest's hashes, are the same on every machine; they are written as
uncompressed NIfTI so the bytes are too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.data.manifest import Case, Manifest, read_manifest, sha256_of, write_manifest
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.tasks.reconstruction.config import PhantomConfig

INFO_FILE = "phantoms.json"


@dataclass(frozen=True)
class PhantomSet:
    manifest: Path
    data_dir: Path
    cases: int
    generated: bool  # False: an identical set was already there


def ellipse_phantom(size: int, rng: np.random.Generator, ellipses: tuple[int, int] = (4, 12)) -> np.ndarray:
    """One (size, size) float32 phantom in [0, 1], zero outside the inscribed circle."""
    y, x = np.mgrid[-1:1:complex(0, size), -1:1:complex(0, size)]
    image = np.zeros((size, size), dtype=np.float64)

    def add(cx: float, cy: float, a: float, b: float, angle: float, value: float) -> None:
        c, s = np.cos(angle), np.sin(angle)
        u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
        image[(u / a) ** 2 + (v / b) ** 2 <= 1.0] += value

    add(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.6, 0.85), rng.uniform(0.5, 0.8),
        rng.uniform(0, np.pi), rng.uniform(0.3, 0.6))  # the body
    for _ in range(int(rng.integers(ellipses[0], ellipses[1] + 1))):
        radius = rng.uniform(0.0, 0.5)
        theta = rng.uniform(0, 2 * np.pi)
        add(radius * np.cos(theta), radius * np.sin(theta), rng.uniform(0.03, 0.3), rng.uniform(0.03, 0.3),
            rng.uniform(0, np.pi), rng.uniform(-0.3, 0.5))
    image[x ** 2 + y ** 2 > 0.98] = 0.0
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def write_phantoms(cfg: PhantomConfig, manifest_path: Path, data_dir: Path, progress: bool = True) -> PhantomSet:
    """Write ``cfg.train + cfg.val + cfg.test`` phantoms under ``data_dir`` and their manifest.

    Nothing is rewritten when ``data_dir`` already holds the set of this exact config and the
    manifest lists it (the verify stage still checks every hash).
    """
    manifest_path, data_dir = Path(manifest_path), Path(data_dir)
    info = {"kind": "random ellipse phantoms", **cfg.model_dump(mode="json")}
    info_path = data_dir / INFO_FILE
    counts = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    if info_path.is_file() and manifest_path.is_file() and json.loads(info_path.read_text()) == info:
        existing = read_manifest(manifest_path)
        if len(existing.cases) == sum(counts.values()):
            return PhantomSet(manifest_path, data_dir, len(existing.cases), generated=False)
    rng = np.random.default_rng(cfg.seed)
    cases: list[Case] = []
    total = sum(counts.values())
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    with tqdm(total=total, desc="phantoms", unit="image", disable=not progress) as bar:
        for split, count in counts.items():
            (data_dir / split).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                case_id = f"phantom_{split}_{index:04d}"
                relative = f"{split}/{case_id}.nii"
                path = data_dir / relative
                image = ellipse_phantom(cfg.size, rng, cfg.ellipses)
                with atomic_path(path, suffix=".nii") as tmp:
                    nib.save(nib.Nifti1Image(image[:, :, None], affine), str(tmp))
                cases.append(Case(case_id, (relative,), None, split, image_sha256=(sha256_of(path),)))
                bar.update()
    write_manifest(Manifest(manifest_path, tuple(cases)), manifest_path)
    atomic_write_text(info_path, json.dumps(info, indent=2))  # last: its presence means the set is complete
    return PhantomSet(manifest_path, data_dir, len(cases), generated=True)
