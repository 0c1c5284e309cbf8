"""2D MedMNIST ``.npz`` -> a torchvision ``ImageFolder`` tree of PNG files.

Layout: ``<out>/<split>/<class_name>/<split>_<index:05d>.png`` with MedMNIST's own train/val/test
split kept and ``index`` the sample's position in that split of the ``.npz``. Grey images become
8-bit grey PNGs, RGB images RGB PNGs; array row 0 is the PNG's top row (the PNG convention, and
how MedMNIST shows its images). Every class gets a folder in every split, even when
``limit_per_split`` leaves it empty, so the class indices ``ImageFolder`` derives (sorted folder
names) are the same for all splits; pass ``allow_empty=True`` to ``ImageFolder`` in that case.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from medseg.data.manifest import sha256_of
from medseg.data.medmnist import KNOWN_LABELS, SPLITS, _image_kind, _load_arrays
from medseg.errors import ManifestError
from medseg.io.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: A class name must be one plain folder name.
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*")
#: The files this writer names (older ones of these are removed before a rewrite).
_PNG_NAME = re.compile(r"(train|val|test)_\d{5}\.png")


def write_imagefolder_from_medmnist(npz: Path, out: Path, labels: dict[int, str] | None = None,
                                    limit_per_split: int | None = None, progress: bool = False) -> dict:
    """Write every sample of a 2D MedMNIST file as a PNG in an ``ImageFolder`` tree under ``out``.

    Args:
        npz: a 2D MedMNIST file (grey or RGB) with its ``train/val/test`` arrays.
        out: root of the tree (created); PNGs this writer left there before are replaced.
        labels: class index -> folder name; default: MedMNIST's names for known files
            (:data:`medseg.data.medmnist.KNOWN_LABELS`), else ``class_<k>``.
        limit_per_split: keep only the first N samples of each split (tests, demos).
        progress: show a progress bar.

    Returns:
        ``out``, ``labels`` (index -> name), ``class_to_idx`` (what ``ImageFolder`` will assign:
        sorted names), ``counts`` (split -> class name -> files written), ``channels``, ``size``.

    Raises:
        ManifestError: unreadable or not a MedMNIST file, a 3D file, multi-label targets, labels
            outside the map, class names that are not plain folder names, or images that are not 8-bit.
    """
    npz, out = Path(npz), Path(out)
    if limit_per_split is not None and limit_per_split < 0:
        raise ManifestError(f"limit_per_split={limit_per_split}: must be 0 or more (or None for every sample)")
    arrays = _load_arrays(npz)
    channels, names = _checked_2d_file(npz, arrays, labels)
    class_to_idx = {n: i for i, n in enumerate(sorted(names.values()))}
    if any(class_to_idx[n] != k for k, n in names.items()):
        log.warning("%s: ImageFolder numbers classes by sorted folder name %s, not by MedMNIST's label %s",
                    out, class_to_idx, {n: k for k, n in names.items()})

    jobs: list[tuple[Path, np.ndarray]] = []
    counts: dict[str, dict[str, int]] = {split: dict.fromkeys(names.values(), 0) for split in SPLITS}
    for split in SPLITS:
        for class_name in names.values():
            folder = out / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():  # a rewrite with fewer samples must not keep the old ones
                if _PNG_NAME.fullmatch(old.name):
                    old.unlink()
        images, y = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        count = len(images) if limit_per_split is None else min(limit_per_split, len(images))
        for index in range(count):
            class_name = names[int(y[index])]
            counts[split][class_name] += 1
            jobs.append((out / split / class_name / f"{split}_{index:05d}.png", images[index]))
    for path, image in tqdm(jobs, desc=f"PNG {npz.name}", unit="image", disable=not progress):
        with atomic_path(path, suffix=".png") as tmp:
            # uint8 (H, W) -> mode "L", (H, W, 3) -> "RGB"; row 0 is the top row
            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    size = [int(s) for s in arrays["train_images"].shape[1:3]]
    info = {"source": str(npz), "source_sha256": sha256_of(npz), "labels": {str(k): v for k, v in names.items()},
            "class_to_idx": class_to_idx, "channels": channels, "size": size, "counts": counts}
    atomic_write_text(out / "medmnist_imagefolder.json", json.dumps(info, indent=2))
    return {"out": str(out), "labels": names, "class_to_idx": class_to_idx, "counts": counts,
            "channels": channels, "size": size}


def _checked_2d_file(npz: Path, arrays: dict[str, np.ndarray], labels: dict[int, str] | None) -> tuple[int, dict[int, str]]:
    """The file's channel count and class names, after refusing what an ImageFolder tree cannot hold."""
    name = npz.name.removesuffix(".npz")
    kinds = {split: _image_kind(arrays[f"{split}_images"], npz) for split in SPLITS}
    dims, channels = kinds["train"]
    if dims != 2:
        raise ManifestError(
            f"{npz}: a 3D MedMNIST file (images of shape {arrays['train_images'].shape[1:]}); an ImageFolder "
            "tree holds 2D pictures only. Use a 2D file (e.g. pneumoniamnist.npz), or import 3D files with "
            "`medseg manifest build --from-medmnist`."
        )
    if len(set(kinds.values())) > 1:
        raise ManifestError(f"{npz}: the splits hold different kinds of images ((dims, channels) per split: {kinds})")
    for split in SPLITS:
        images = arrays[f"{split}_images"]
        if images.dtype != np.uint8:
            raise ManifestError(f"{npz}: {split}_images are {images.dtype}, expected uint8 (8-bit MedMNIST pixels)")
        y = arrays[f"{split}_labels"]
        if y.ndim == 2 and y.shape[1] > 1:
            raise ManifestError(f"{npz}: {split}_labels has {y.shape[1]} columns: a multi-label set (like ChestMNIST); "
                                "an ImageFolder tree gives each image one class")
    values = sorted({int(v) for s in SPLITS for v in np.unique(arrays[f"{s}_labels"])})
    names = dict(labels) if labels else KNOWN_LABELS.get(name, {v: f"class_{v}" for v in range(max(values) + 1)})
    outside = sorted(set(values) - set(names))
    if outside:
        raise ManifestError(f"{npz}: labels {outside} are not in the label map {names}; pass labels for every class")
    bad = [n for n in names.values() if not _FOLDER_NAME.fullmatch(n) or n in (".", "..")]
    if bad or len(set(names.values())) != len(names):
        raise ManifestError(f"labels={names}: class names must be distinct plain folder names (letters, digits, "
                            f"' _.+-', not starting with a dot or dash); bad: {bad or 'duplicates'}")
    return channels, names
