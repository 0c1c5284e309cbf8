"""Post-processing of predicted label maps: small components removed, their size chosen on validation.

nnU-Net decides its connected-component post-processing on cross-validation; here the evaluate
stage of the validation split tries ``postprocess.search_min_component_size`` per label on the
predictions it already made, and writes what helped to ``<run_dir>/postprocess.json``. The test
split's evaluation and the packaged contract (so ``medseg predict``) then apply those sizes.

Sizes count voxels of the network's grid (the preprocessed spacing), where evaluation scores and
where predict applies them, so one size means one physical volume for every input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.tasks.segmentation.metrics import case_dice

#: Where the evaluate stage of the validation split writes the sizes it chose, in the run folder.
POSTPROCESS_FILE = "postprocess.json"

#: A threshold is kept only if it raises the validation cases' mean Dice by more than this: a
#: smaller gain on a few cases is as likely noise as a rule that carries to new scans.
MIN_GAIN = 0.002


def remove_small_components(label_map: np.ndarray, min_sizes: Mapping[int, int]) -> np.ndarray:
    """``label_map`` without the components (face-connected, per label) smaller than their label's size.

    A removed component takes the value most common in its one-voxel outer shell (face neighbours
    outside it): a speck of "enhancing" inside "edema" becomes edema rather than a hole, an isolated
    speck becomes background. Ties go to the lower value (background first); a component with no
    shell (it fills the image) becomes 0. Labels are processed in ascending value on the result so
    far, so a speck relabelled into a later label counts toward that label's components.

    Args:
        label_map: integer label values, 2D or 3D (any number of spatial axes).
        min_sizes: label value -> voxels; a component of fewer voxels is removed (0: keep all).

    Returns:
        A new array of ``label_map``'s shape and dtype.

    Raises:
        ValueError: a negative size.
    """
    out = np.array(label_map, copy=True)
    structure = ndimage.generate_binary_structure(out.ndim, 1)
    for value, min_size in sorted(min_sizes.items()):
        if min_size < 0:
            raise ValueError(f"min_sizes[{value}] = {min_size}: a component size is a voxel count >= 0 "
                             "(0 keeps every component)")
        if min_size == 0:
            continue
        components, count = ndimage.label(out == value, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        is_small = sizes < min_size
        is_small[0] = False  # index 0 is everything outside the label
        if is_small.any():
            _relabel(out, components, is_small)
    return out


def _relabel(out: np.ndarray, components: np.ndarray, is_small: np.ndarray) -> None:
    """Give each small component (``is_small[id]``) the most common value of its outer shell, in place.

    The shell is found for all components at once: every face neighbour of a small component's
    voxels that lies outside that component, each neighbour counted once per component however
    many of its voxels it touches.
    """
    inside = is_small[components]
    coords = np.nonzero(inside)
    ids = components[coords]
    flat = out.ravel()
    keys = []
    for axis in range(out.ndim):
        for step in (-1, 1):
            moved = list(coords)
            moved[axis] = coords[axis] + step
            valid = (moved[axis] >= 0) & (moved[axis] < out.shape[axis])
            neighbour = np.ravel_multi_index(tuple(m[valid] for m in moved), out.shape)
            outside = components.ravel()[neighbour] != ids[valid]
            keys.append(ids[valid][outside].astype(np.int64) * out.size + neighbour[outside])
    unique = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    shell_ids, shell_voxels = np.divmod(unique, out.size)
    rank = np.cumsum(is_small) - 1  # component id -> row of the vote table
    values = int(out.max()) + 1
    votes = np.bincount(rank[shell_ids] * values + flat[shell_voxels].astype(np.int64),
                        minlength=int(is_small.sum()) * values).reshape(-1, values)
    winner = np.zeros(is_small.shape, dtype=out.dtype)
    winner[is_small] = votes.argmax(axis=1)  # no shell: a row of zeros, so background
    out[inside] = winner[components[inside]]


def sizes_by_value(sizes: Mapping[str, int], labels: Mapping[int, str]) -> dict[int, int]:
    """Label name -> size (config, contract, ``postprocess.json``) as label value -> size.

    Raises:
        ValueError: a name that is no foreground label of ``labels``.
    """
    values = {name: value for value, name in labels.items() if value != 0}
    unknown = sorted(set(sizes) - set(values))
    if unknown:
        raise ValueError(f"min_component_size names {unknown}, which are not foreground labels; expected names of "
                         f"{sorted(values)}")
    return {values[name]: int(size) for name, size in sizes.items()}


# ----------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class SizeSearch:
    """What :func:`search_min_sizes` found.

    Attributes:
        min_sizes: label value -> the chosen size, only for labels where one helped.
        before: mean per-case Dice with no component removed.
        after: mean per-case Dice with ``min_sizes`` applied.
        per_label: label value -> threshold -> mean per-case Dice with that threshold for the label
            (and the sizes chosen for the labels searched before it); threshold 0 is no removal.
    """

    min_sizes: dict[int, int]
    before: float
    after: float
    per_label: dict[int, dict[int, float]]


def mean_case_dice(cases: Sequence[tuple[np.ndarray, np.ndarray]], values: Sequence[int],
                   min_sizes: Mapping[int, int]) -> float:
    """Mean over ``(prediction, reference)`` cases of each case's mean Dice over the labels ``values``,
    after :func:`remove_small_components`; labels absent from both maps of a case, and cases with
    no such label, are left out (NaN for none at all)."""
    means = []
    for pred, truth in cases:
        dice = case_dice(remove_small_components(pred, min_sizes) if min_sizes else pred, truth, values)
        finite = dice[~np.isnan(dice)]
        if finite.size:
            means.append(float(finite.mean()))
    return float(np.mean(means)) if means else float("nan")


def search_min_sizes(cases: Sequence[tuple[np.ndarray, np.ndarray]], values: Sequence[int],
                     candidates: Sequence[int], min_gain: float = MIN_GAIN) -> SizeSearch:
    """Choose, label by label, the removal size that best raises the cases' mean per-case Dice.

    Greedy in label order: each label tries every candidate on top of the sizes already chosen for
    the labels before it, and keeps the best if it beats no removal (0) by more than ``min_gain``.
    The score is the mean Dice over all ``values``, not the label's own: a removed speck takes a
    neighbouring label, so one label's threshold changes the others' Dice too.

    Args:
        cases: ``(prediction, reference)`` label maps on the same grid, e.g. the validation split.
        values: the foreground label values to search and score.
        candidates: sizes in voxels to try (0 and repeats are ignored; no removal is always tried).
        min_gain: the least improvement of the mean Dice a threshold must bring.
    """
    tried = sorted({int(c) for c in candidates if int(c) > 0})
    chosen: dict[int, int] = {}
    before = current = mean_case_dice(cases, values, {})
    per_label: dict[int, dict[int, float]] = {}
    for value in values:
        scores = {0: current, **{t: mean_case_dice(cases, values, {**chosen, value: t}) for t in tried}}
        per_label[value] = scores
        best = max(tried, key=lambda t: (_finite(scores[t]), -t), default=None)
        if best is not None and _finite(scores[best]) > _finite(current) + min_gain:
            chosen[value] = best
            current = scores[best]
    return SizeSearch(chosen, before, current, per_label)


def _finite(score: float) -> float:
    return -math.inf if math.isnan(score) else score


# ----------------------------------------------------------------------------------- the file


def write_search(path: Path, search: SizeSearch, names: Mapping[int, str], candidates: Sequence[int]) -> Path:
    """``postprocess.json``: the chosen sizes and the scores they were chosen on, by label name."""
    from medseg.io.atomic import atomic_write_text

    record = {
        "min_component_size": {names[v]: size for v, size in search.min_sizes.items()},
        "searched": sorted({int(c) for c in candidates}),
        "val_dice_mean_before": _json_number(search.before),
        "val_dice_mean_after": _json_number(search.after),
        "per_label": {names[v]: {str(t): _json_number(s) for t, s in scores.items()}
                      for v, scores in search.per_label.items()},
    }
    return atomic_write_text(path, json.dumps(record, indent=2))


def read_chosen_sizes(run_dir: Path) -> dict[str, int] | None:
    """The sizes (label name -> voxels) the validation search wrote to ``run_dir``, or None if it
    wrote none (no search configured, or skipped because the validation cases were trained on).

    Raises:
        ValueError: the file is not what :func:`write_search` writes.
    """
    path = run_dir / POSTPROCESS_FILE
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text())["min_component_size"]
        return {str(name): int(size) for name, size in sizes.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: expected the JSON the validation search writes, with 'min_component_size' "
                         f"mapping label names to voxel counts ({err!r}); delete it to fall back to the config's "
                         "postprocess.min_component_size") from err


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)
