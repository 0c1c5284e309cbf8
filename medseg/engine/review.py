"""The batch review page: one self-contained HTML file to look through a predict's cases, worst first.

``review.html`` sits beside ``predictions.csv`` and needs nothing else: styles and script are
inline, thumbnails are PNG ``data:`` URIs, links to each case's files are relative. It opens from
a laptop, a shared drive or an MLflow artifact alike, with no server and nothing fetched.

Rows start worst first: failed cases, then the cases the QC flagged, then the rest, each group by
its uncertainty score (:data:`WORST_FIRST`); any column header re-sorts. Each row has a thumbnail
made from the case's input and its written outputs, chosen by what the main output holds, not
by which task wrote it:

* an integer volume (a mask): three orthogonal planes through the largest predicted structure,
  each label's edge outlined on the image (a fill would hide the edge being judged);
* floating-point volumes (reconstructions): the input and each output side by side, one window;
* no output file (classification): the image's middle planes; its class probabilities are bars;
* a JSON of boxes (detection): the axial plane through the centre of each of the best boxes, every
  box crossing it outlined in its class's colour with its score written at its corner.

Every plane is turned to the closest RAS axes first and carries the patient directions at its edges
(R/L, A/P, S/I), read from the case's affine; a click zooms a thumbnail. A flagged case's reasons are
written in words (:func:`plain_reasons`): "less certain than 90 % of the validation cases", not
"mean entropy 0.263 > 0.2278". A reviewer accepts or rejects each case and comments; the page keeps
the decisions in the browser and downloads them as ``review.csv``.

A thumbnail that cannot be made leaves its row with a note; it never stops the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import nibabel as nib
import numpy as np
from monai.data.utils import to_affine_nd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from medseg._version import __version__ as medseg_version
from medseg.io.atomic import atomic_write_text
from medseg.io.readers import load_volume

if TYPE_CHECKING:
    from medseg.engine.results import CaseResult

log = logging.getLogger(__name__)

#: Longest side of one plane in a thumbnail, in pixels: 500 cases stay a few MB of page.
THUMBNAIL_PX = 112
#: Per-case scores that order the rows within a group, the first one present deciding; True: a
#: higher value is worse. (See :mod:`medseg.engine.uncertainty`; ``ssim`` ranks reconstructions.)
WORST_FIRST: tuple[tuple[str, bool], ...] = (("mean_entropy", True), ("entropy", True), ("agreement", False),
                                              ("max_probability", False), ("ssim", False))
#: Mask colours by label value (1 → the first); distinct on grey, after Sasha Trubetskoy's palette.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212))
_NIFTI = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------------- QC summary


def is_flagged(result: CaseResult) -> bool:
    """Whether the QC flagged the case (a finished case read back from the report holds the text "True")."""
    flag = result.values.get("qc_flag")
    return flag is True or str(flag).strip().lower() in ("true", "1")


def reason_kinds(reason: str) -> list[str]:
    """The kinds of a ``qc_reason``, its numbers dropped: "blob1 volume z = +3.2 (|z| > 3); mean entropy
    0.41 > 0.3" → ["blob1 volume z", "mean entropy"], so cases can be counted per reason."""
    kinds = []
    for part in (p.strip() for p in reason.split(";")):
        if part:
            found = re.match(r"(.*?)\s+(?:=\s*)?[-+]?\d", part)
            kinds.append(found.group(1) if found else part)
    return kinds


def qc_summary(results: Sequence[CaseResult], thresholds: Mapping[str, float]) -> dict[str, Any]:
    """How many cases the QC flagged, per reason, with the thresholds that applied (``qc_summary.json``)."""
    flagged = {r.case_id: str(r.values.get("qc_reason") or "") for r in results if is_flagged(r)}
    by_reason = Counter(kind for reason in flagged.values() for kind in reason_kinds(reason))
    return {"cases": len(results), "flagged": len(flagged), "thresholds": dict(thresholds),
            "by_reason": dict(by_reason.most_common()), "flagged_cases": flagged}


# ----------------------------------------------------------------------------------- reasons in words


#: The percentile of the validation cases' mean entropy that a segmentation model's contract keeps as
#: ``qc.max_mean_entropy`` (``ENTROPY_QUANTILE`` of medseg.tasks.segmentation.training; a test keeps them equal).
VALIDATION_PERCENTILE = 90


@dataclass(frozen=True)
class QcReference:
    """What a model's contract says its QC thresholds mean, to put a flag in words.

    Attributes:
        validation_entropy: the contract's ``qc.max_mean_entropy``: the validation cases' 90th
            percentile of mean entropy (None: the contract has none).
        training_volumes: label name -> ``{"mean", "std", "cases"}`` of the training split's
            volumes in mL (the contract's ``label_volumes_ml``).
    """

    validation_entropy: float | None = None
    training_volumes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def from_contract(cls, contract: Mapping[str, Any] | None) -> QcReference:
        contract = contract or {}
        entropy = _number((contract.get("qc") or {}).get("max_mean_entropy"))
        volumes = contract.get("label_volumes_ml") or {}
        return cls(entropy, {str(k): v for k, v in volumes.items() if isinstance(v, Mapping)})


def _words(name: str) -> str:
    """A label or class name as words: ``left_caudate_nucleus`` -> ``left caudate nucleus``."""
    return name.replace("_", " ")


def _volume_words(name: str, volume: float | None, z: float, stats: Mapping[str, float] | None) -> str:
    """A volume far from the training cases', said as a ratio to their average when it is known."""
    side = "above" if z > 0 else "below"
    sd = f"{abs(z):.1f} SD {side} the training average"
    mean = _number((stats or {}).get("mean"))
    if volume is not None and volume <= 0:
        return f"no {name} found ({f'training cases average {mean:.2f} mL' if mean else sd})"
    if mean is None or mean <= 0 or volume is None:
        size = f" ({volume:.2f} mL)" if volume is not None else ""
        return f"{name} volume {'unusually large' if z > 0 else 'unusually small'}{size}: {sd}"
    ratio = volume / mean
    how = f"{ratio:.1f}x the average training case" if ratio >= 1 else f"only {100 * ratio:.0f} % of the average training case"
    return f"{name} volume {how} ({volume:.2f} mL against {mean:.2f} mL; {sd})"


def _entropy_words(entropy: float, limit: float, reference: QcReference) -> str:
    if reference.validation_entropy is not None and math.isclose(limit, reference.validation_entropy, rel_tol=1e-6):
        far = limit > 0 and entropy >= 2 * limit
        return (f"{'far ' if far else ''}less certain than {VALIDATION_PERCENTILE} % of the validation cases "
                f"(uncertainty {entropy:.3f}; their {VALIDATION_PERCENTILE}th percentile {limit:.3f})")
    if reference.validation_entropy is None:  # what the limit means is not known here
        return f"less certain than the QC limit allows (uncertainty {entropy:.3f}; limit {limit:g})"
    return f"less certain than this batch's limit allows (uncertainty {entropy:.3f}; limit {limit:g}, set with --qc)"


def _box_words(part: str) -> str | None:
    """A detection QC reason in words ("edge boxes 1 > 0" -> "1 confident box touches the image's
    edge: ..."); None for any other reason."""
    found = re.fullmatch(r"(boxes|confident boxes|top score|edge boxes) ([-+]?[\d.]+) [<>] ([-+]?[\d.eE]+)", part)
    if not found:
        return None
    kind, value, limit = found.group(1), float(found.group(2)), found.group(3)
    if kind == "boxes":
        return ("no box found: a scan without lesions, or lesions the detector missed" if value == 0 else
                f"only {value:.0f} box(es) found, fewer than the {limit} expected")
    if kind == "confident boxes":
        return f"{value:.0f} confident boxes (score 0.5 or more), more than the {limit} this model expects of a scan"
    if kind == "top score":
        return f"only low-confidence boxes: the best scores {value:.2f}, below {limit}"
    return (f"{value:.0f} confident box(es) touching the image's edge (at most {limit} expected): a lesion there "
            "may be cut off, or the box may be an artefact of the edge")


def plain_reasons(result: CaseResult, thresholds: Mapping[str, float], reference: QcReference | None = None) -> list[str]:
    """Why the QC flagged a case, in words a clinician reads without the report's column names.

    The case's ``qc_reason`` says which checks it failed (it is what flagged it); the words come from
    its values and, when known, what the thresholds mean (``reference``, from the model's contract):
    "less certain than 90 % of the validation cases (uncertainty 0.263; their 90th percentile 0.228)",
    "anterior volume 3.1x the average training case (4.65 mL against 1.50 mL; 4.2 SD above the
    training average)". A part it does not know is kept as written.
    """
    reference = reference or QcReference()
    out = []
    for part in (p.strip() for p in str(result.values.get("qc_reason") or "").split(";")):
        volume_z = re.match(r"(.+?) volume z = ([-+]?[\d.]+)", part)
        entropy = _number(result.values.get("mean_entropy"))
        agreement = _number(result.values.get("agreement"))
        if volume_z:
            name = volume_z.group(1)
            z = _number(result.values.get(f"volume_z_{name}"))
            out.append(_volume_words(_words(name), _number(result.values.get(f"volume_ml_{name}")),
                                     z if z is not None else float(volume_z.group(2)),
                                     reference.training_volumes.get(name)))
        elif part.startswith("mean entropy") and entropy is not None and "max_mean_entropy" in thresholds:
            out.append(_entropy_words(entropy, thresholds["max_mean_entropy"], reference))
        elif _box_words(part) is not None:
            out.append(str(_box_words(part)))
        elif part.startswith("agreement") and agreement is not None and "min_agreement" in thresholds:
            out.append(f"the flipped or ensembled predictions disagree: they overlap by {agreement:.2f} (Dice), "
                       f"less than the {thresholds['min_agreement']:g} expected")
        elif part:
            out.append(part)
    return out


# ----------------------------------------------------------------------------------- order


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def worst_first(results: Sequence[CaseResult]) -> list[CaseResult]:
    """Failed cases, then flagged ones, then the rest; within each, by the first score of
    :data:`WORST_FIRST` the batch has, worst first (cases without it last), then by case id."""
    score_column = next((column for column, _ in WORST_FIRST
                         if any(_number(r.values.get(column)) is not None for r in results)), None)
    higher_is_worse = dict(WORST_FIRST).get(score_column or "", True)

    def key(result: CaseResult) -> tuple[int, int, float, str]:
        score = _number(result.values.get(score_column)) if score_column else None
        badness = math.inf if score is None else (-score if higher_is_worse else score)
        return (result.status != "failed", not is_flagged(result), badness, result.case_id)

    return sorted(results, key=key)


# ----------------------------------------------------------------------------------- thumbnails


#: The patient's directions along each RAS+ world axis: (towards negative, towards positive).
_TOWARDS = (("L", "R"), ("P", "A"), ("I", "S"))
#: What each letter at a panel's edge means, for its tooltip.
DIRECTION_WORDS = {"R": "patient's right", "L": "patient's left", "A": "anterior (front)",
                   "P": "posterior (back)", "S": "superior (head)", "I": "inferior (feet)"}


def direction_letter(vector: Sequence[float] | np.ndarray) -> str:
    """The patient direction a world (RAS+) vector runs along most: ``R``/``L``, ``A``/``P`` or ``S``/``I``.

    An oblique direction gets the letter of its largest component, as DICOM viewers label
    oblique planes by their closest anatomical direction.
    """
    components = np.asarray(vector, dtype=np.float64)[:3]
    axis = int(np.argmax(np.abs(components)))
    return _TOWARDS[axis][int(components[axis] > 0)]


@dataclass(frozen=True)
class BoxMark:
    """A drawn box's label on a panel: its text (the score) at its top-left corner, as fractions of
    the panel's width and height from its left and top, and its colour."""

    left: float
    top: float
    text: str
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Panel:
    """One plane of a thumbnail: its PNG, its name, and the patient directions at its
    (left, right, top, bottom) edges, read from the affine: ("R", "L", "A", "P") for an axial plane."""

    png: bytes
    caption: str
    edges: tuple[str, str, str, str]
    marks: tuple[BoxMark, ...] = ()


@dataclass(frozen=True)
class Thumbnail:
    """A case's picture: its panels, or none and a note saying why."""

    panels: tuple[Panel, ...] = ()
    note: str = ""

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(panel.caption for panel in self.panels)


def _first_volume(array: np.ndarray) -> np.ndarray:
    while array.ndim > 3:  # channels or time points: the first is enough to look at
        array = array[..., 0]
    return array


def _read_input(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The input's first channel and its RAS affine, read as predict read it (a DICOM series is a folder)."""
    volume = load_volume(path)
    array = _first_volume(np.asarray(volume[0].detach().cpu().numpy()))
    return array, np.asarray(volume.affine, dtype=np.float64)


def _read_output(path: str) -> np.ndarray:
    image = nib.load(path)
    return _first_volume(np.asanyarray(image.dataobj))  # type: ignore[attr-defined]


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` turned onto the closest RAS axes (flips and axis swaps, no resampling) and the
    affine of the turned array, so planes show as anatomy does whatever the file's orientation."""
    affine3 = np.asarray(to_affine_nd(3, affine), dtype=np.float64)
    array3 = array.reshape(array.shape + (1,) * (3 - array.ndim))
    orientation = nib.orientations.io_orientation(affine3)
    turned = nib.orientations.apply_orientation(array3, orientation)
    return turned, affine3 @ nib.orientations.inv_ornt_aff(orientation, array3.shape)


def _window(array: np.ndarray) -> tuple[float, float]:
    """Grey levels from the 0.5th to the 99.5th percentile (on at most ~1M voxels, for speed)."""
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    return low, (high if high > low else low + 1.0)


def _largest_structure_centre(mask: np.ndarray) -> tuple[int, ...] | None:
    """The centre (voxel indices) of the largest connected foreground structure; None if none."""
    components, count = ndimage.label(mask > 0)
    if count == 0:
        return None
    sizes = np.bincount(components.reshape(-1))[1:]
    largest = np.argwhere(components == 1 + int(np.argmax(sizes)))
    return tuple(int(round(c)) for c in largest.mean(axis=0))


#: The three planes: (name, the axis they cut, and, after cutting, whether to flip the horizontal axis).
#: Displayed with superior / anterior up; axial and coronal radiologically (the patient's right on the left).
_PLANES = (("axial", 2, True), ("coronal", 1, True), ("sagittal", 0, False))


@dataclass(frozen=True)
class _Plane:
    name: str
    pixels: np.ndarray  # rows x cols, shown upright
    pixel_mm: tuple[float, float]  # (row, col) sizes
    edges: tuple[str, str, str, str]  # patient directions at the left, right, top, bottom


def _planes(volume: np.ndarray, affine: np.ndarray, centre: Sequence[int],
            axes: Sequence[int] = (2, 1, 0)) -> list[_Plane]:
    """Planes of a canonical volume through ``centre``; planes one voxel thick in either direction
    (2D images) are left out. Each knows the patient directions at its edges from ``affine``."""
    out = []
    for name, axis, flip in _PLANES:
        if axis not in axes:
            continue
        plane = np.take(volume, int(np.clip(centre[axis], 0, volume.shape[axis] - 1)), axis=axis)
        if min(plane.shape) < 2:
            continue
        across, up = [a for a in range(3) if a != axis]
        shown = plane.T[::-1]  # rows: the second kept axis, upward; cols: the first kept axis
        rightward = affine[:3, across] * (-1.0 if flip else 1.0)  # world direction of a step to the right
        if flip:
            shown = shown[:, ::-1]
        edges = (direction_letter(-rightward), direction_letter(rightward), direction_letter(affine[:3, up]),
                 direction_letter(-affine[:3, up]))
        pixel_mm = (float(np.linalg.norm(affine[:3, up])), float(np.linalg.norm(affine[:3, across])))
        out.append(_Plane(name, shown, pixel_mm, edges))
    return out


def _panel_size(shape: tuple[int, ...], pixel_mm: tuple[float, float]) -> tuple[int, int]:
    """(height, width) in pixels keeping the physical aspect, the longer side THUMBNAIL_PX."""
    height_mm, width_mm = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = THUMBNAIL_PX / max(height_mm, width_mm, 1e-9)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _grey_panel(plane: np.ndarray, window: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    low, high = window
    grey = np.clip((np.nan_to_num(plane.astype(np.float64)) - low) / (high - low), 0, 1) * 255
    resized = Image.fromarray(np.ascontiguousarray(grey.astype(np.uint8)), mode="L").resize(
        (size[1], size[0]), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.float64)[..., None], 3, axis=2)


def _nearest(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(size[0]) + 0.5) * plane.shape[0] / size[0], plane.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[1]) + 0.5) * plane.shape[1] / size[1], plane.shape[1] - 1).astype(int)
    return plane[rows][:, cols]


def _outline(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label's edge drawn on ``rgb`` in its colour, one pixel wide, the inside left as it is:
    the reviewer judges the edge against the image, which a fill would hide. The label plane is
    smoothed to the panel's size (bilinear, half-way), so edges follow the anatomy, not voxel steps."""
    out = rgb.copy()
    size = rgb.shape[:2]
    for value in np.unique(labels):
        if value == 0:
            continue
        inside = np.ascontiguousarray((labels == value).astype(np.uint8) * 255)
        region = np.asarray(Image.fromarray(inside, mode="L").resize((size[1], size[0]), Image.Resampling.BILINEAR)) >= 128
        if not region.any():  # thinner than a pixel once shrunk: keep it visible
            region = _nearest(labels == value, size)
        edge = region & ~ndimage.binary_erosion(region, border_value=0)
        out[edge] = PALETTE[(int(value) - 1) % len(PALETTE)]
    return out


def _png(panel: np.ndarray) -> bytes:
    """An (H, W, 3) panel as a palette PNG."""
    # 256 colours, not dithered: a third of the RGB file's size (500 cases stay a few MB), no visible loss.
    picture = Image.fromarray(np.clip(panel, 0, 255).astype(np.uint8), mode="RGB").quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_thumbnail(image: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> Thumbnail:
    volume, turned_affine = _canonical(image, affine)
    labels, _ = _canonical(mask, affine)
    centre = _largest_structure_centre(labels)
    note = "" if centre is not None else "nothing predicted: planes through the middle"
    centre = centre if centre is not None else tuple(s // 2 for s in volume.shape)
    window = _window(volume)
    panels = []
    for grey, cut in zip(_planes(volume, turned_affine, centre), _planes(labels, turned_affine, centre)):
        size = _panel_size(grey.pixels.shape, grey.pixel_mm)
        picture = _outline(_grey_panel(grey.pixels, window, size), _nearest(cut.pixels, size))
        panels.append(Panel(_png(picture), grey.name, grey.edges))
    return Thumbnail(tuple(panels), note)


def _side_by_side_thumbnail(image: np.ndarray, affine: np.ndarray, outputs: Sequence[tuple[str, np.ndarray]]) -> Thumbnail:
    """The input and each output on their middle axial plane (in-plane for 2D), one grey window."""
    volume, turned_affine = _canonical(image, affine)
    centre = tuple(s // 2 for s in volume.shape)
    axis = 2 if volume.shape[2] > 1 else int(np.argmin(volume.shape))
    window = _window(volume)
    panels = []
    for name, array in (("input", image), *outputs):
        turned, _ = _canonical(array, affine)
        planes = _planes(turned, turned_affine, centre, axes=(axis,)) or _planes(turned, turned_affine, centre)
        if planes:
            plane = planes[0]
            picture = _grey_panel(plane.pixels, window, _panel_size(plane.pixels.shape, plane.pixel_mm))
            panels.append(Panel(_png(picture), name, plane.edges))
    return Thumbnail(tuple(panels))


def _image_thumbnail(image: np.ndarray, affine: np.ndarray) -> Thumbnail:
    volume, turned_affine = _canonical(image, affine)
    window = _window(volume)
    panels = []
    for plane in _planes(volume, turned_affine, tuple(s // 2 for s in volume.shape)):
        picture = _grey_panel(plane.pixels, window, _panel_size(plane.pixels.shape, plane.pixel_mm))
        panels.append(Panel(_png(picture), plane.name, plane.edges))
    return Thumbnail(tuple(panels))


#: Boxes a detection thumbnail pictures: the best ones, each on the axial plane through its centre.
REVIEW_BOXES = 3


@dataclass(frozen=True)
class ReviewBox:
    """One predicted box as a ``<case>_boxes.json`` holds it: voxel indices of the input as stored
    (start inclusive, end exclusive), its class value and its score."""

    start: tuple[float, ...]
    end: tuple[float, ...]
    value: int
    score: float


def read_boxes(path: str | Path) -> list[ReviewBox]:
    """The boxes of a ``<case>_boxes.json``, best first.

    Raises:
        ValueError: the file holds no ``boxes`` list of boxes with ``voxels`` start and end.
    """
    records = json.loads(Path(path).read_text()).get("boxes")
    if not isinstance(records, list):
        raise ValueError(f"{Path(path).name}: Expected a JSON object with a 'boxes' list. Got {type(records).__name__}")
    boxes = [ReviewBox(tuple(float(v) for v in r["voxels"]["start"]), tuple(float(v) for v in r["voxels"]["end"]),
                       int(r.get("class", 1)), float(r.get("score", 1.0))) for r in records]
    return sorted(boxes, key=lambda b: -b.score)


def _turned_box(box: ReviewBox, shape: tuple[int, ...], orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``box``'s start and end on the volume turned by :func:`_canonical` (``orientation``: nibabel's
    ``io_orientation`` of the input's affine; ``shape``: the input's, padded to 3D)."""
    start = np.array([*box.start, *(0.0,) * (3 - len(box.start))])
    end = np.array([*box.end, *(1.0,) * (3 - len(box.end))])
    turned_start, turned_end = np.zeros(3), np.zeros(3)
    for axis, (target, direction) in enumerate(orientation):
        low, high = (start[axis], end[axis]) if direction > 0 else (shape[axis] - end[axis], shape[axis] - start[axis])
        turned_start[int(target)], turned_end[int(target)] = low, high
    return turned_start, turned_end


def _box_cut(start: np.ndarray, end: np.ndarray, shape: tuple[int, ...], axis: int, index: int) -> np.ndarray | None:
    """The box's footprint on plane ``index`` along ``axis`` of a turned volume of ``shape``: a slab
    one plane thick (for :func:`_planes`); None when the box does not cross that plane."""
    low = np.clip(np.floor(start + 1e-6), 0, shape).astype(int)
    high = np.clip(np.ceil(end - 1e-6), 0, shape).astype(int)
    high = np.maximum(high, np.minimum(low + 1, shape))  # a box thinner than a voxel still shows
    if not low[axis] <= index < high[axis]:
        return None
    slab = np.zeros([1 if a == axis else s for a, s in enumerate(shape)], dtype=np.uint8)
    slab[tuple(slice(0, 1) if a == axis else slice(low[a], high[a]) for a in range(3))] = 1
    return slab


def _box_panel(volume: np.ndarray, turned_affine: np.ndarray, window: tuple[float, float], axis: int,
               centre: tuple[int, ...], turned: Sequence[tuple[ReviewBox, np.ndarray, np.ndarray]], caption: str) -> Panel:
    """The plane through ``centre`` along ``axis``, each box crossing it outlined and its score written."""
    plane = _planes(volume, turned_affine, centre, axes=(axis,))[0]
    size = _panel_size(plane.pixels.shape, plane.pixel_mm)
    picture = _grey_panel(plane.pixels, window, size)
    marks = []
    at = tuple(0 if a == axis else c for a, c in enumerate(centre))
    for box, start, end in turned:
        slab = _box_cut(start, end, volume.shape, axis, centre[axis])
        if slab is None:
            continue
        cut = _planes(slab, turned_affine, at, axes=(axis,))[0].pixels
        picture = _outline(picture, _nearest(cut * box.value, size))
        rows, cols = np.nonzero(cut)
        marks.append(BoxMark(float(cols.min()) / cut.shape[1], float(rows.min()) / cut.shape[0], f"{box.score:.2f}",
                             PALETTE[(box.value - 1) % len(PALETTE)]))
    return Panel(_png(picture), caption, plane.edges, tuple(marks))


def _boxes_thumbnail(image: np.ndarray, affine: np.ndarray, boxes: Sequence[ReviewBox]) -> Thumbnail:
    """The axial plane (in-plane for 2D) through the centre of each of the :data:`REVIEW_BOXES` best
    boxes, every box crossing it outlined in its class's colour with its score at its top-left corner."""
    if not boxes:
        return replace(_image_thumbnail(image, affine), note="no boxes predicted: planes through the middle")
    volume, turned_affine = _canonical(image, affine)
    orientation = nib.orientations.io_orientation(np.asarray(to_affine_nd(3, affine), dtype=np.float64))
    shape3 = tuple(image.shape) + (1,) * (3 - image.ndim)
    turned = [(box, *_turned_box(box, shape3, orientation)) for box in boxes]
    axis = 2 if volume.shape[2] > 1 else int(np.argmin(volume.shape))
    window = _window(volume)
    panels = []
    for rank, (_, start, end) in enumerate(turned[:REVIEW_BOXES], 1):
        centre = tuple(int(np.clip(np.floor((s + e) / 2), 0, n - 1)) for s, e, n in zip(start, end, volume.shape))
        panels.append(_box_panel(volume, turned_affine, window, axis, centre, turned,
                                 f"box {rank}"))
    more = len(boxes) - REVIEW_BOXES
    return Thumbnail(tuple(panels), f"{more} more box(es) with lower scores in the JSON" if more > 0 else "")


def case_thumbnail(result: CaseResult, output_columns: Sequence[str]) -> Thumbnail:
    """The thumbnail of one case from its input and written outputs (see the module's docstring).

    Never raises: a case that cannot be pictured gets a :class:`Thumbnail` without panels and a note.
    """
    if result.status == "failed":
        return Thumbnail(note="failed: no output to show")
    try:
        image, affine = _read_input(result.input)
        main_output = next((result.outputs[c] for c in output_columns if c in result.outputs), "")
        if main_output.endswith(".json"):
            return _boxes_thumbnail(image, affine, read_boxes(main_output))
        files = [(column, result.outputs[column]) for column in output_columns
                 if column in result.outputs and result.outputs[column].endswith(_NIFTI)]
        if not files:
            return _image_thumbnail(image, affine)
        main_column, main_path = files[0]
        main = _read_output(main_path)
        if main.shape != image.shape:
            return Thumbnail(note=f"no thumbnail: {Path(main_path).name} has shape {main.shape}, the input "
                                  f"{image.shape}")
        if main.dtype.kind in "iub":
            return _mask_thumbnail(image, affine, main)
        others = [(column, _read_output(path)) for column, path in files[1:]]
        shown = [(column.removesuffix("_output"), array) for column, array in others if array.shape == image.shape]
        return _side_by_side_thumbnail(image, affine, [*shown, (main_column, main)])
    except Exception as err:  # readers raise many types; the row stays, with the reason
        log.debug("review: no thumbnail for %s", result.case_id, exc_info=True)
        return Thumbnail(note=f"no thumbnail: {type(err).__name__}: {err}"[:300])


# ----------------------------------------------------------------------------------- the page


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str | Path, page_dir: Path) -> str:
    """A link from the page to ``path``: relative, so the folder can move or be copied whole."""
    target = Path(path).resolve()
    try:
        relative = os.path.relpath(target, page_dir.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return target.as_uri()
    return quote(Path(relative).as_posix())


def _display(value: Any) -> str:
    number = _number(value)
    if number is None or isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value)):
        return "" if value is None else str(value)
    return f"{number:.4g}"


@dataclass(frozen=True)
class _Column:
    key: str
    title: str
    numeric: bool
    parts: tuple[str, ...] = ()  # the report columns a folded column shows (VOLUMES)


#: More labels than this and their volumes share one column (:data:`VOLUMES`), so the table still fits 1400 px.
MAX_VOLUME_COLUMNS = 3
#: The folded column of every label's volume; it sorts by the largest distance from the training volumes.
VOLUMES = "volumes"


#: Report column -> (header in words, with units; what it means), for the columns every task shares.
_TITLES: dict[str, tuple[str, str]] = {
    "status": ("status", "ok: predicted; failed: see error; skipped: finished by an earlier run"),
    "qc_flag": ("QC", "flagged: a result to look at before trusting it (see 'why flagged')"),
    "qc_reason": ("why flagged", "which QC threshold the case crossed (the thresholds are in the header)"),
    "mean_entropy": ("uncertainty (mean entropy, 0-1)",
                     "mean normalised entropy of the predicted probabilities over the predicted structures: "
                     "0 certain, 1 a coin toss; the QC threshold is the validation split's 90th percentile"),
    "entropy": ("uncertainty (entropy, 0-1)", "normalised entropy of the class probabilities: 0 certain, 1 a coin toss"),
    "agreement": ("agreement (Dice, 0-1)", "mean Dice between the flips or ensemble members' masks: low is unstable"),
    "max_probability": ("top probability", "the probability of the predicted class"),
    "n_boxes": ("boxes", "boxes found in the scan (every score above the model's threshold)"),
    "confident_boxes": ("confident boxes", "boxes scoring 0.5 or more"),
    "max_score": ("best score", "the score of the scan's best box"),
    "edge_boxes": ("boxes at the edge", "confident boxes touching the image's edge: a lesion there may be cut off"),
    "predicted_name": ("predicted class", "the most probable class"),
    "seconds": ("time (s)", "seconds to read, predict and write this case"),
    VOLUMES: ("volumes (mL; SD from training)",
              "each label's predicted volume in millilitres, on the input's own grid, and how many standard deviations "
              "it lies from the training split's average; sorts by the largest of those distances"),
}
#: Report column prefixes -> (header, tooltip), ``{}`` the label or class name.
_PREFIX_TITLES: tuple[tuple[str, str, str], ...] = (
    ("volume_ml_", "{} volume (mL; SD from training)",
     "the predicted {} volume in millilitres, on the input's own grid; below it, how many standard deviations it "
     "lies from the training split's average volume (the report's volume_z_{} column)"),
    ("volume_z_", "{} volume vs training (z)",
     "how many standard deviations the {} volume lies from the training split's volumes"),
    ("prob_", "p({})", "the probability the model gives class {}"),
)


def column_title(key: str) -> tuple[str, str]:
    """The header a reviewer reads for report column ``key``, and its tooltip (the key itself when unknown)."""
    if key in _TITLES:
        return _TITLES[key]
    for prefix, title, tip in _PREFIX_TITLES:
        if key.startswith(prefix):
            name = key.removeprefix(prefix)
            return title.format(_words(name)), tip.format(_words(name), name)
    return key, f"report column {key}"


def _columns(results: Sequence[CaseResult], value_columns: Sequence[str]) -> list[_Column]:
    """The table's sortable data columns: status; the QC flag, reason and scores; the task's
    other values that any case has (voxel counts left out: the volumes say the same in mL; a volume's
    z-score is shown in its volume's cell, so a 1400 px window holds the table); seconds."""
    qc = [c for c in ("qc_flag", "qc_reason") if c in value_columns]
    present = [c for c in value_columns if c not in qc and not c.startswith("voxels_")
               and any(r.values.get(c) not in (None, "") for r in results)]
    present = [c for c in present if not (c.startswith("volume_z_") and "volume_ml_" + c.removeprefix("volume_z_")
                                          in present)]
    scores = {c for c, _ in WORST_FIRST}
    first = [c for c in present if c in scores or c.startswith("volume_z_")]
    keys = [*qc, *first, *(c for c in present if c not in first)]
    volumes = tuple(k for k in keys if k.startswith("volume_ml_"))
    columns = [_Column("status", "status", False)]  # a failed case's error is where its picture would be
    if len(volumes) > MAX_VOLUME_COLUMNS:
        keys = [VOLUMES if k == volumes[0] else k for k in keys if k == volumes[0] or k not in volumes]
    for key in keys:
        if key == VOLUMES:
            columns.append(_Column(VOLUMES, VOLUMES, True, volumes))
            continue
        numeric = key == "qc_flag" or all(_number(r.values.get(key)) is not None for r in results
                                          if r.values.get(key) not in (None, ""))
        columns.append(_Column(key, key, numeric))
    columns.append(_Column("seconds", "seconds", True))
    return columns


def _cell(result: CaseResult, column: _Column, reasons: Sequence[str] = ()) -> str:
    """One data cell; ``reasons``: the QC flag's reasons in words (:func:`plain_reasons`)."""
    if column.key == "status":
        return f'<td data-sort="{_e(result.status)}" class="status {_e(result.status)}">{_e(result.status)}</td>'
    if column.key == "seconds":
        return f'<td data-sort="{result.seconds:.6f}" class="num">{result.seconds:.2f}</td>'
    if column.key == VOLUMES:
        return _volumes_cell(result, column.parts)
    if column.key == "qc_flag":
        flagged = is_flagged(result)
        mark = '<span title="flagged: look before trusting it" aria-label="flagged">⚑</span>' if flagged else ""
        return f'<td data-sort="{int(flagged)}" class="flag">{mark}</td>'
    value = result.values.get(column.key)
    if column.numeric:
        number = _number(value)
        z = _number(result.values.get("volume_z_" + column.key.removeprefix("volume_ml_")))
        below = f'<div class="z">{z:+.1f} SD</div>' if column.key.startswith("volume_ml_") and z is not None else ""
        return f'<td data-sort="{"" if number is None else repr(number)}" class="num">{_e(_display(value))}{below}</td>'
    text = "" if value is None else str(value)
    if column.key == "qc_reason":  # in words; the report's wording stays in the tooltip and the sort key
        items = "".join(f"<li>{_e(reason)}</li>" for reason in reasons)
        return (f'<td data-sort="{_e(text)}" class="reason" title="{_e(text)}">'
                f'{f"<ul>{items}</ul>" if items else ""}</td>')
    return f'<td data-sort="{_e(text)}">{_e(text)}</td>'


def _volumes_cell(result: CaseResult, keys: Sequence[str]) -> str:
    """Every label's volume and its distance from the training volumes, one line each; sorted by the largest distance."""
    lines, distances = [], []
    for key in keys:
        name = key.removeprefix("volume_ml_")
        volume, z = _number(result.values.get(key)), _number(result.values.get(f"volume_z_{name}"))
        if volume is None:
            continue
        distances += [abs(z)] if z is not None else []
        shown = f' <span class="z">{z:+.1f} SD</span>' if z is not None else ""
        lines.append(f'<div>{_e(_words(name))} {_e(_display(result.values.get(key)))}{shown}</div>')
    key = repr(max(distances)) if distances else ""
    return f'<td data-sort="{key}" class="num volumes">{"".join(lines)}</td>'


def _probability_bars(result: CaseResult) -> str:
    """Class probabilities (``prob_<class>`` values) as bars, the most probable one marked."""
    numbers = [(k.removeprefix("prob_"), _number(v)) for k, v in result.values.items() if k.startswith("prob_")]
    probs = [(name, p) for name, p in numbers if p is not None]
    if not probs:
        return ""
    top = max(p for _, p in probs)
    bars = "".join(
        f'<div class="bar{" top" if p == top else ""}"><span class="name">{_e(name)}</span> '
        f'<span class="track"><span class="fill" style="width:{100 * min(max(p, 0.0), 1.0):.1f}%"></span></span> '
        f'<span class="p">{p:.3f}</span></div>' for name, p in probs)
    return f'<div class="probs">{bars}</div>'


_EDGES = ("left", "right", "top", "bottom")


def _panel_figure(case_id: str, panel: Panel) -> str:
    """A panel's image with the patient directions at its edges and its name below."""
    data = base64.b64encode(panel.png).decode("ascii")
    left, right, top, bottom = panel.edges
    letters = "".join(f'<span class="edge {side}" title="{_e(DIRECTION_WORDS[letter])}">{letter}</span>'
                      for side, letter in zip(_EDGES, panel.edges))
    letters += "".join(_box_mark(mark) for mark in panel.marks)
    alt = f"{case_id}: {panel.caption}, patient {left} on the left, {top} at the top"
    return (f'<figure class="panel"><div class="frame"><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f'{letters}</div><figcaption>{_e(panel.caption)}</figcaption></figure>')


def _box_mark(mark: BoxMark) -> str:
    """A box's score just above its top-left corner, kept inside the picture (inside the box when it
    touches the top edge; moved left when it would run past the right edge, a thumbnail being narrow)."""
    placement = f"top:{mark.top * 100:.1f}%" if mark.top < 0.12 else f"bottom:{(1 - mark.top) * 100:.1f}%"
    left = f"min({mark.left * 100:.1f}%,calc(100% - {len(mark.text)}ch))"
    return (f'<span class="score" style="left:{left};{placement};color:rgb{mark.colour}" '
            f'title="the box\'s score">{_e(mark.text)}</span>')


def _thumbnail_cell(result: CaseResult, thumbnail: Thumbnail) -> str:
    parts = []
    if thumbnail.panels:
        figures = "".join(_panel_figure(result.case_id, panel) for panel in thumbnail.panels)
        parts.append(f'<div class="thumb" role="button" tabindex="0" aria-expanded="false" '
                     f'aria-label="zoom the planes of {_e(result.case_id)}" title="click to zoom">{figures}</div>')
    if result.status == "failed" and result.error:  # why, and the fix, where the picture would be
        parts.append(f'<div class="error"><b>failed:</b> {_e(result.error)}</div>')
    elif thumbnail.note:
        parts.append(f'<div class="note">{_e(thumbnail.note)}</div>')
    parts.append(_probability_bars(result))
    return f'<td class="picture">{"".join(parts)}</td>'


def _header_cells(columns: Sequence[_Column]) -> list[str]:
    """Sortable headers in words with units; the report's column name stays in ``data-key``."""
    cells = []
    for column in columns:
        words, tip = column_title(column.key)
        cells.append(f'<th data-key="{_e(column.key)}" data-type="{"num" if column.numeric else "text"}" '
                     f'title="{_e(tip)} (the report\'s column {_e(column.key)})">{_e(words)}</th>')
    return cells


def _decision_cell(result: CaseResult) -> str:
    """Accept / reject and a comment, kept by the page's script (localStorage) and downloaded as review.csv."""
    case = _e(result.case_id)
    return (f'<td class="decision"><select aria-label="decision for {case}"><option value=""></option>'
            '<option value="accept">accept</option><option value="reject">reject</option></select>'
            f'<input type="text" aria-label="comment on {case}" placeholder="comment"></td>')


def _case_cell(result: CaseResult, output_columns: Sequence[str], page_dir: Path) -> str:
    links = [f'<a href="{_href(result.outputs[c], page_dir)}">{_e(c)}</a>' for c in output_columns
             if c in result.outputs and result.status != "failed"]
    if result.input:
        links.append(f'<a href="{_href(result.input, page_dir)}">input</a>')
    return (f'<td data-sort="{_e(result.case_id)}" class="case"><b>{_e(result.case_id)}</b>'
            f'<div class="links">{" ".join(links)}</div></td>')


_STYLE = """
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:12px 16px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:18px;margin:0 0 6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:6px 0}
dt{color:#666}dd{margin:0;overflow-wrap:anywhere}
.counts span{display:inline-block;margin-right:10px;padding:1px 8px;border-radius:10px;background:#eee}
.counts .failed{background:#fdd}.counts .flagged{background:#fec}
.legend span{margin-right:10px}.legend i{display:inline-block;width:8px;height:8px;margin-right:4px;vertical-align:-1px;border:2px solid}
table{border-collapse:collapse;margin:0 8px 24px;background:#fff;width:calc(100% - 16px)}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 5px;vertical-align:top;text-align:left}
th{position:sticky;top:0;background:#f0f0f0;z-index:4;user-select:none;font-size:12px;font-weight:600;hyphens:auto}
th[data-type]{cursor:pointer}th[data-type]:hover{background:#e2e2e2}
th[data-type=num]{text-align:right}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.num .z{color:#777;font-size:11px}
td.volumes div{white-space:nowrap}
td.case{min-width:8em;max-width:14em;overflow-wrap:anywhere}.links a{margin-right:6px;font-size:12px}
td.status.failed{color:#b00020;font-weight:600}td.status.skipped{color:#666}
td.flag{color:#b35c00;font-weight:600;font-size:15px;text-align:center}
tr.failed{background:#fff3f3}tr.flagged{background:#fff8ec}
td.picture .error{color:#b00020;max-width:26em;overflow-wrap:anywhere;font-size:12px}
td.reason{min-width:12em;max-width:22em;font-size:12px}td.reason ul{margin:0;padding-left:1.1em}
.thumb{display:flex;gap:2px;align-items:flex-start;width:max-content;cursor:zoom-in;transform-origin:left top;
  background:#fff;border-radius:2px}
.thumb:focus-visible{outline:2px solid #0a6ebd}
.thumb.zoomed{cursor:zoom-out;position:relative;z-index:3;box-shadow:0 2px 14px rgba(0,0,0,.55);padding:2px}
figure.panel{margin:0}.frame{position:relative;line-height:0;width:fit-content}.frame img{display:block}
.edge{position:absolute;font:700 9px/1 system-ui,sans-serif;color:#ffe14d;text-shadow:0 0 2px #000,0 0 2px #000;
  pointer-events:none}
.edge.left{left:1px;top:50%;transform:translateY(-50%)}.edge.right{right:1px;top:50%;transform:translateY(-50%)}
.edge.top{top:1px;left:50%;transform:translateX(-50%)}.edge.bottom{bottom:1px;left:50%;transform:translateX(-50%)}
.score{position:absolute;font:700 8px/1 system-ui,sans-serif;text-shadow:0 0 2px #000,0 0 2px #000;
  pointer-events:none;white-space:nowrap}
figcaption{color:#888;font-size:11px;line-height:1.3;text-align:center}
td.decision select{display:block;margin-bottom:3px}td.decision input{width:7em}
tr.accepted td.decision{background:#e8f6e8}tr.rejected td.decision{background:#fde8e8}
button{font:inherit;margin-left:8px}
.note{color:#666;font-style:italic;max-width:24em}
.probs{margin-top:3px;font-size:12px}.bar{display:flex;align-items:center;gap:4px}
.bar .name{min-width:5em}.bar .track{display:inline-block;width:80px;height:8px;background:#e6e6e6}
.bar .fill{display:block;height:8px;background:#888}.bar.top .fill{background:#0a6ebd}.bar.top .name{font-weight:600}
"""

# Sorting: a header click sorts by its column (ascending, then descending); empty cells stay last,
# ties keep the worst-first rank. Keys are in each cell's data-sort.
_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("cases");
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function sortBy(th) {
    var col = th.cellIndex;
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") === "num";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
      var rank = Number(a.getAttribute("data-rank")) - Number(b.getAttribute("data-rank"));
      if (x === "" || y === "") { return (x === "") - (y === "") || rank; }
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return (ascending ? order : -order) || rank;
    });
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rowsFragment = document.createDocumentFragment();
    rows.forEach(function (row) { rowsFragment.appendChild(row); });
    body.appendChild(rowsFragment);
  }
  // Review decisions: kept in this browser for this page, downloaded as review.csv
  var storeKey = "medseg-review:" + location.pathname;
  function decisions() {
    return Array.prototype.map.call(body.rows, function (row) {
      var cell = row.querySelector("td.decision");
      return {case_id: row.getAttribute("data-case"), decision: cell.querySelector("select").value,
              comment: cell.querySelector("input").value};
    });
  }
  function csvCell(text) {
    if (/^[=+\\-@\\t\\r]/.test(text)) { text = "'" + text; }  // a spreadsheet must not run it as a formula
    return /[",\\n\\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }
  function reviewCsv() {
    var lines = ["case_id,decision,comment"];
    decisions().forEach(function (d) { lines.push([d.case_id, d.decision, d.comment].map(csvCell).join(",")); });
    return lines.join("\\n") + "\\n";
  }
  function remember() {
    var kept = {};
    decisions().forEach(function (d) { if (d.decision || d.comment) { kept[d.case_id] = d; } });
    try { localStorage.setItem(storeKey, JSON.stringify(kept)); } catch (e) { /* private mode: not kept */ }
  }
  function mark(row) {
    var value = row.querySelector("td.decision select").value;
    row.classList.toggle("accepted", value === "accept");
    row.classList.toggle("rejected", value === "reject");
  }
  var saved = {};
  try { saved = JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { saved = {}; }
  Array.prototype.forEach.call(body.rows, function (row) {
    var cell = row.querySelector("td.decision"), kept = saved[row.getAttribute("data-case")];
    if (kept) { cell.querySelector("select").value = kept.decision; cell.querySelector("input").value = kept.comment; }
    mark(row);
    cell.addEventListener("change", function () { mark(row); remember(); });
    cell.addEventListener("input", remember);
  });
  window.medsegReviewCsv = reviewCsv;
  document.getElementById("download-review").addEventListener("click", function () {
    var link = document.createElement("a");
    link.href = "data:text/csv;charset=utf-8," + encodeURIComponent(reviewCsv());  // nothing leaves the page
    link.download = "review.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
  });
  // Zoom: a click (or Enter) enlarges a case's planes in place, as far as the window allows (2.5x at most)
  function zoom(thumb) {
    var zoomed = !thumb.classList.contains("zoomed");
    thumb.classList.toggle("zoomed", zoomed);
    thumb.setAttribute("aria-expanded", String(zoomed));
    if (!zoomed) { thumb.style.transform = ""; return; }
    var box = thumb.getBoundingClientRect();
    var room = (document.documentElement.clientWidth - box.left - 12) / box.width;
    thumb.style.transform = "scale(" + Math.max(1.5, Math.min(2.5, room)).toFixed(2) + ")";
  }
  Array.prototype.forEach.call(document.querySelectorAll(".thumb"), function (thumb) {
    thumb.addEventListener("click", function () { zoom(thumb); });
    thumb.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); zoom(thumb); }
    });
  });
  headers.forEach(function (th) {
    if (!th.hasAttribute("data-type")) { return; }
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(th); }
    });
  });
})();
"""


#: QC threshold -> how the page's header says it, ``{}`` the value.
_THRESHOLD_WORDS = {
    "max_abs_volume_z": "a label's volume within {} SD of the training average",
    "max_mean_entropy": "uncertainty at most {}",
    "min_agreement": "flips or ensemble members agreeing at least {} (Dice)",
    "min_boxes": "at least {} box(es) found",
    "max_confident_boxes": "at most {} confident boxes (score 0.5 or more)",
    "min_top_score": "a best box scoring at least {}",
    "max_edge_boxes": "at most {} confident box(es) touching the image's edge",
}


def _thresholds_words(thresholds: Mapping[str, float], reference: QcReference) -> str:
    """The QC thresholds in words (the keys in its tooltip), the entropy's meaning when the contract's."""
    words = []
    for key, value in sorted(thresholds.items()):
        said = _THRESHOLD_WORDS.get(key, key + " {}").format(f"{value:g}")
        if key == "max_mean_entropy" and reference.validation_entropy is not None and math.isclose(
                value, reference.validation_entropy, rel_tol=1e-6):
            said += f" (the validation cases' {VALIDATION_PERCENTILE}th percentile)"
        words.append(said)
    keys = ", ".join(f"{k} = {v:g}" for k, v in sorted(thresholds.items()))
    return f'<span title="{_e(keys)}">{_e("; ".join(words) or "none")}</span>'


def _rows(ordered: Sequence[CaseResult], columns: Sequence[_Column], output_columns: Sequence[str], page_dir: Path,
          thresholds: Mapping[str, float], reference: QcReference, progress: bool) -> list[str]:
    """One table row per case in ``ordered``, its rank the worst-first order the ``#`` column restores."""
    rows = []
    for rank, result in enumerate(tqdm(ordered, desc="review", unit="case", disable=not progress), 1):
        classes = "failed" if result.status == "failed" else "flagged" if is_flagged(result) else ""
        reasons = plain_reasons(result, thresholds, reference) if is_flagged(result) else []
        cells = [f'<td data-sort="{rank}" class="num">{rank}</td>', _case_cell(result, output_columns, page_dir),
                 _thumbnail_cell(result, case_thumbnail(result, output_columns)), _decision_cell(result),
                 *(_cell(result, c, reasons) for c in columns)]
        rows.append(f'<tr data-rank="{rank}" data-case="{_e(result.case_id)}" class="{classes}">{"".join(cells)}</tr>')
    return rows


def _page_header(results: Sequence[CaseResult], task: str, model_uri: str, labels: Mapping[int, str],
                 thresholds: str, links: str) -> str:
    counts = Counter(r.status for r in results)
    flagged = sum(is_flagged(r) for r in results)
    legend = "".join(f'<span><i style="border-color:rgb{PALETTE[(v - 1) % len(PALETTE)]}"></i>{_e(name)}</span>'
                     for v, name in sorted(labels.items()) if v != 0)
    directions = ", ".join(f"{letter} {words}" for letter, words in DIRECTION_WORDS.items())
    return f"""<header>
<h1>medseg predict review: {len(results)} case(s), {_e(task)}</h1>
<div class="counts"><span>ok {counts["ok"]}</span><span class="failed">failed {counts["failed"]}</span><span>skipped {counts["skipped"]}</span><span class="flagged">flagged {flagged}</span></div>
<dl>
<dt>model</dt><dd>{_e(model_uri)}</dd>
<dt>QC flags a case with</dt><dd>anything beyond: {thresholds}</dd>
{f"<dt>outlines</dt><dd class='legend'>{legend}</dd>" if legend else ""}
<dt>pictures</dt><dd>letters at the edges: {_e(directions)}; axial and coronal planes as radiologists view them (the patient's right on the left); click a picture to zoom</dd>
<dt>files</dt><dd>{links}</dd>
<dt>written</dt><dd>{_e(time.strftime("%Y-%m-%d %H:%M:%S"))} by medseg {_e(medseg_version)}; click a column header to sort, # for worst first again</dd>
<dt>review</dt><dd>accept or reject each case and add a comment; this browser keeps them for this page.
<button type="button" id="download-review">download review.csv</button></dd>
</dl>
</header>"""


def write_review(results: Sequence[CaseResult], path: Path, *, task: str, model_uri: str,
                 labels: Mapping[int, str], output_columns: Sequence[str], value_columns: Sequence[str],
                 qc_thresholds: Mapping[str, float], links: Mapping[str, Path] | None = None,
                 progress: bool = False, contract: Mapping[str, Any] | None = None) -> Path:
    """Write the review page of a batch (atomically) and return its path.

    Args:
        results: every case of the batch, in any order (the page starts worst first).
        path: the page, in the output folder: links to the cases' files are relative to it.
        task: the model's task, for the header.
        model_uri: the model (or ensemble) that predicted, for the header.
        labels: label value -> name, for the outline colours' legend.
        output_columns: report columns holding output files, the main one first.
        value_columns: report columns of the task's values, in report order.
        qc_thresholds: the QC thresholds that applied, for the header.
        links: more files to link from the header (title -> path): the report, the summary.
        progress: a progress bar while the thumbnails are made.
        contract: the model's contract: what its QC thresholds mean (the validation cases' entropy
            percentile, the training volumes), so the reasons can say so (:class:`QcReference`).

    Raises:
        OSError: the page could not be written (nothing half-written is left).
    """
    page_dir = path.parent
    reference = QcReference.from_contract(contract)
    columns = _columns(results, value_columns)
    heads = ['<th data-key="#" data-type="num" aria-sort="ascending" '
             'title="worst first: failed, flagged, then by uncertainty">#</th>',
             '<th data-key="case" data-type="text" title="the case, its output files and its input">case</th>',
             '<th data-key="thumbnail" title="three planes through the largest structure, each label outlined, '
             'the patient directions at the edges; click to zoom. A failed case: why, and the fix">pictures</th>',
             '<th data-key="review" title="your decision and comment; download review.csv to keep them">review</th>',
             *_header_cells(columns)]
    rows = _rows(worst_first(results), columns, output_columns, page_dir, qc_thresholds, reference, progress)
    header_links = " ".join(f'<a href="{_href(p, page_dir)}">{_e(title)}</a>' for title, p in (links or {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>medseg review: {_e(task)}, {len(results)} case(s)</title>
<style>{_STYLE}</style>
</head>
<body>
{_page_header(results, task, model_uri, labels, _thresholds_words(qc_thresholds, reference), header_links)}
<table id="cases">
<thead><tr>{"".join(heads)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return atomic_write_text(path, page)


def write_qc_summary(results: Sequence[CaseResult], thresholds: Mapping[str, float], path: Path) -> dict[str, Any]:
    """Write :func:`qc_summary` as JSON (atomically) and return it."""
    summary = qc_summary(results, thresholds)
    atomic_write_text(path, json.dumps(summary, indent=2))
    return summary
