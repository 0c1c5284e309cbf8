"""nnU-Net's planning rules as plain functions of a fingerprint's numbers.

Each rule is what ``nnunetv2/experiment_planning`` does (ExperimentPlanner's
``determine_fullres_target_spacing``, ``get_pool_and_conv_props``, the normalisation choice
and the patch/batch sizing), written as a function with no I/O so that each one is unit-tested
on its own. The budget-aware choices medseg adds on top (which width, patch scale, precision)
live in :mod:`medseg.planning.budget`; nnU-Net's own default plan, for ``medseg plan --explain``,
is :func:`nnunet_default_plan`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: nnU-Net: an axis is anisotropic when its spacing is more than this times the others'.
ANISOTROPY_THRESHOLD = 3.0
#: nnU-Net's reference patch volume before clipping: 256^3 (3D), 2048^2 (2D).
REFERENCE_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
#: nnU-Net's smallest feature map edge (an axis is pooled while it stays at least twice this).
MIN_FEATURE_MAP = 4
#: nnU-Net's features: 32 at the first stage, doubling, capped at 320 (3D) / 512 (2D).
NNUNET_BASE_FEATURES = 32
NNUNET_MAX_FEATURES = {3: 320, 2: 512}
#: nnU-Net's GPU reference: an 8 GB card holds this estimate at batch 2 (3D) / 12 (2D).
NNUNET_REFERENCE_BATCH = {3: 2, 2: 12}
NNUNET_REFERENCE_ESTIMATE = {3: 560_000_000, 2: 560_000_000}
#: nnU-Net: one batch covers at most 5 % of the dataset's voxels.
MAX_DATASET_FRACTION_PER_BATCH = 0.05
#: Channel names nnU-Net normalises as CT (clip to foreground percentiles, dataset z-score).
CT_NAMES = {"ct", "ctscan", "computed_tomography"}
#: nnU-Net: z-score inside the nonzero mask when cropping to nonzero keeps less than this.
NONZERO_MASK_CROP_RATIO = 0.75


@dataclass(frozen=True)
class SpacingDecision:
    spacing: list[float]
    anisotropic_axis: int | None
    reason: str


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> SpacingDecision:
    """nnU-Net's full-resolution target spacing: the per-axis median, except on a very anisotropic
    axis, which takes its 10th-percentile spacing (never finer than the largest other spacing).

    Anisotropic: the coarsest axis's median spacing is more than 3x the finest's, and that axis
    has fewer than a third of the voxels of the smallest other axis (median shapes, after
    resampling). Then the median would over-resample thin-slice outliers into mostly
    interpolated data, so nnU-Net takes a finer, 10th-percentile spacing there.
    """
    spacing_array = np.asarray(spacings, dtype=np.float64)
    shape_array = np.asarray(shapes, dtype=np.float64)
    target = np.median(spacing_array, axis=0)
    resampled_shape = np.median(shape_array * spacing_array / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    spacing_ratio = target[worst] / max(min(target[others]), 1e-8) if others else 1.0
    few_voxels = resampled_shape[worst] * ANISOTROPY_THRESHOLD < min(resampled_shape[others]) if others else False
    if spacing_ratio > ANISOTROPY_THRESHOLD and few_voxels:
        low = float(np.percentile(spacing_array[:, worst], 10))
        chosen = max(low, float(max(target[others])))
        target[worst] = chosen
        return SpacingDecision([float(v) for v in target], worst,
                               f"median spacing, axis {worst} anisotropic ({spacing_ratio:.1f}x the others, "
                               f"{resampled_shape[worst]:.0f} voxels): its 10th percentile {chosen:g} mm (nnU-Net)")
    return SpacingDecision([float(v) for v in target], None, "median spacing of the training cases (nnU-Net)")


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    """nnU-Net's starting patch: edges proportional to 1/spacing (the same size in mm on every
    axis), scaled to 256^3 (3D) / 2048^2 (2D) voxels, then clipped to the median resampled shape."""
    dims = len(spacing)
    inverse = np.array([1.0 / s for s in spacing])
    scaled = inverse / inverse.prod() ** (1.0 / dims) * REFERENCE_PATCH_VOXELS[dims] ** (1.0 / dims)
    return [int(round(min(p, m))) for p, m in zip(scaled, median_shape)]


@dataclass(frozen=True)
class Topology:
    """A U-Net's per-stage layout: ``strides[0]`` is the first stage's (all 1), then one per pooling."""

    kernels: list[list[int]]
    strides: list[list[int]]
    patch: list[int]            # the patch, padded to a multiple of the pooling product per axis
    pools_per_axis: list[int]

    @property
    def stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> list[int]:
        return [2**p for p in self.pools_per_axis]


def pool_and_conv(spacing: Sequence[float], patch: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP,
                  max_pools: int = 999) -> Topology:
    """nnU-Net's ``get_pool_and_conv_props``: pool an axis while it stays at least ``2 x
    min_feature_map`` voxels and its spacing is within 2x of the finest current spacing; a
    lone poolable axis needs 3x; kernel 3 on axes within 2x of the finest spacing, else 1 (a
    5 mm axis next to 0.7 mm ones gets 1-wide kernels until pooling has evened them out: an
    in-plane-first topology). Returns the patch padded so every axis divides by its pooling."""
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch]
    kernel = [1] * dims
    pools = [0] * dims
    strides: list[list[int]] = [[1] * dims]
    kernels: list[list[int]] = []
    while True:
        valid = [a for a in range(dims) if current_size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2 and pools[a] < max_pools]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for a in range(dims):
            if kernel[a] != 3 and current_spacing[a] / min(current_spacing) < 2:
                kernel[a] = 3
        step = [1] * dims
        for a in valid:
            step[a] = 2
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(step)
        kernels.append(list(kernel))
    kernels.append([3] * dims)
    divisor = [2**p for p in pools]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor)]
    return Topology(kernels=kernels, strides=strides, patch=padded, pools_per_axis=pools)


def leave_crop_room(spacing: Sequence[float], topology: Topology, median_shape: Sequence[float]) -> Topology:
    """Keep every patch axis below the median image size, so random crops still move.

    nnU-Net pads the image by half a patch before it crops, so a patch as big as the image still
    lands anywhere; MONAI's croppers pad only up to the patch size, so such a patch is always the
    whole image, in the same place: no positional variety at all, and the network overfits (on
    MSD Hippocampus nnU-Net's [40, 56, 40] patch, bigger than the median [35, 50, 36] image,
    trained to a lower validation Dice than [32, 48, 32]). An axis at or above the median size
    takes the largest multiple of its pooling below it; the topology is then derived again.
    """
    for _ in range(8):
        over = [a for a, (p, m, d) in enumerate(zip(topology.patch, median_shape, topology.divisor)) if p >= m and p > d]
        if not over:
            break
        patch = list(topology.patch)
        for a in over:
            d = topology.divisor[a]
            patch[a] = max(d, int(math.ceil(median_shape[a]) - 1) // d * d)
        topology = pool_and_conv(spacing, patch)
    return topology


def nnunet_features(stages: int, dims: int, base: int = NNUNET_BASE_FEATURES) -> list[int]:
    """nnU-Net's features per stage: ``base`` doubling, capped at 320 (3D) / 512 (2D)."""
    return [min(base * 2**i, NNUNET_MAX_FEATURES[dims]) for i in range(stages)]


def feature_map_estimate(patch: Sequence[int], topology: Topology, features: Sequence[int], in_channels: int,
                         classes: int) -> float:
    """Voxels x features held for the backward pass (nnU-Net's ``static_estimate_VRAM_usage`` in
    spirit): per stage two convolutions (encoder) plus a transposed convolution and two
    convolutions (decoder), each with its norm and nonlinearity output."""
    size = np.array(patch, dtype=np.float64)
    total = float(np.prod(size)) * (in_channels + classes)
    for stage, stride in enumerate(topology.strides):
        size = np.ceil(size / np.array(stride))
        voxels = float(np.prod(size))
        encoder = 2 * 3 * features[stage] * voxels          # conv, norm, nonlinearity; twice
        decoder = (2 * 3 + 1) * features[stage] * voxels if stage < len(topology.strides) - 1 else 0
        total += encoder + decoder
    return total


@dataclass(frozen=True)
class NnunetPlan:
    """What nnU-Net's default (GPU, 8 GB) planner would choose for the 3d_fullres / 2d configuration."""

    spacing: list[float]
    patch: list[int]
    batch_size: int
    pools_per_axis: list[int]
    features: list[int]
    kernels: list[list[int]]
    strides: list[list[int]]


def nnunet_default_plan(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], in_channels: int,
                        classes: int) -> NnunetPlan:
    """nnU-Net's default plan re-derived from its rules (target spacing, patch from 256^3 shrunk
    until the feature-map estimate fits the 8 GB reference, batch scaled from 2 and capped at 5 %
    of the dataset's voxels). An estimate of its estimate: medseg's feature-map count follows
    nnU-Net's, not its exact constants, so patch and batch can differ by a step."""
    decision = target_spacing(spacings, shapes)
    spacing = decision.spacing
    median = list(np.median(np.asarray(shapes) * np.asarray(spacings) / np.asarray(spacing), axis=0))
    dims = len(spacing)
    patch = initial_patch(spacing, median)
    topology = pool_and_conv(spacing, patch)
    features = nnunet_features(topology.stages, dims)
    reference = NNUNET_REFERENCE_ESTIMATE[dims] * 2  # the reference holds batch 2
    estimate = 2 * feature_map_estimate(topology.patch, topology, features, in_channels, classes)
    while estimate > reference:
        ratios = [p / m for p, m in zip(topology.patch, median)]
        axis = int(np.argmax(ratios))
        shrunk = list(topology.patch)
        shrunk[axis] -= topology.divisor[axis]
        if shrunk[axis] < topology.divisor[axis]:
            break
        topology = pool_and_conv(spacing, shrunk)
        features = nnunet_features(topology.stages, dims)
        estimate = 2 * feature_map_estimate(topology.patch, topology, features, in_channels, classes)
    batch = int(math.floor(reference / max(estimate / 2, 1.0)))
    dataset_voxels = float(np.sum(np.prod(np.asarray(shapes) * np.asarray(spacings) / np.asarray(spacing), axis=1)))
    cap = int(dataset_voxels * MAX_DATASET_FRACTION_PER_BATCH / float(np.prod(topology.patch)))
    batch = max(NNUNET_REFERENCE_BATCH[dims], min(batch, cap))
    return NnunetPlan(spacing=spacing, patch=topology.patch, batch_size=batch, pools_per_axis=topology.pools_per_axis,
                      features=features, kernels=topology.kernels, strides=topology.strides)


@dataclass(frozen=True)
class NormalisationDecision:
    intensity: dict[str, object]
    crop_foreground: bool
    reason: str


def is_ct(channel_name: str) -> bool:
    return channel_name.strip().lower().replace(" ", "_") in CT_NAMES


def normalisation(channel_name: str, percentile_00_5: float, percentile_99_5: float, mean: float, std: float,
                  median_crop_ratio: float) -> NormalisationDecision:
    """nnU-Net's normalisation by channel name: CT clips to the dataset's foreground 0.5-99.5
    percentiles and z-scores with the foreground mean and std (HU mean the same thing in every
    scan); anything else is z-scored per image, inside the nonzero mask when cropping to it
    removes more than a quarter of the image (skull-stripped MR: the zero background would
    otherwise dominate the statistics)."""
    if is_ct(channel_name):
        return NormalisationDecision(
            {"mode": "clip_zscore", "clip": [round(percentile_00_5, 2), round(percentile_99_5, 2)],
             "mean": round(mean, 3), "std": round(max(std, 1e-6), 3)},
            crop_foreground=median_crop_ratio < NONZERO_MASK_CROP_RATIO,
            reason=f"{channel_name}: clip to foreground p0.5-p99.5, z-score with foreground mean/std (nnU-Net CT)")
    use_mask = median_crop_ratio < NONZERO_MASK_CROP_RATIO
    return NormalisationDecision(
        {"mode": "zscore", "nonzero": use_mask}, crop_foreground=use_mask,
        reason=(f"{channel_name}: per-image z-score" + (
            f" inside the nonzero mask (cropping keeps {median_crop_ratio:.0%} < 75 %)" if use_mask else
            f" (cropping to nonzero keeps {median_crop_ratio:.0%}, so no mask)") + " (nnU-Net)"))


def rare_classes(fractions: dict[int, float], presence: dict[int, float], rare_fraction: float = 0.1,
                 rare_presence: float = 0.75) -> list[int]:
    """Foreground classes a patch sampler must seek out: under ``rare_fraction`` of the median
    foreground class's voxel share, or present in fewer than ``rare_presence`` of the cases."""
    foreground = {v: f for v, f in fractions.items() if v != 0}
    if not foreground:
        return []
    typical = float(np.median(list(foreground.values())))
    return sorted(v for v, f in foreground.items()
                  if f < rare_fraction * typical or presence.get(v, 1.0) < rare_presence)


# ------------------------------------------------------------------- nested and small structures

#: Image-relative rarity (:func:`rare_against_image`): under 1 % of the cropped image's voxels...
RARE_IMAGE_FRACTION = 0.01
#: ... or a median component smaller than this many voxels (a 10^3 cube).
SMALL_COMPONENT_VOXELS = 1000
#: Small-component removal thresholds to try, as fractions of the 5th-percentile true component.
MIN_COMPONENT_FRACTIONS = (0.25, 0.5)


def containment_tree(shell: Mapping[int, Mapping[int, float]], threshold: float = 0.9) -> dict[int, int | None]:
    """Which foreground class sits inside which: nnU-Net's region hierarchy, read off the data.

    ``shell[B][C]`` is the share of the outer shell of class B (a one-voxel dilation of B minus B,
    :func:`medseg.planning.fingerprint.class_shells`) that holds value C, 0 being background. A
    encloses B when, walling off A, B cannot reach the background: take B's *pocket*, the classes
    connected to B (through shell shares above ``1 - threshold``) without passing A or background;
    every class of the pocket must have the part of its shell outside the pocket at least
    ``threshold`` made of A. So a necrotic core inside an enhancing rim is enclosed by the rim, and
    by the edema around the rim too (its pocket, core and rim, meets nothing but edema); a rim's
    inner shell, the core it holds, does not count against the edema. B's parent is its innermost
    encloser, the one the others enclose. Two classes that enclose each other (interleaved) get
    neither relation, and a parent cycle is cut, so the result is always a forest.

    Args:
        shell: foreground value -> neighbour value -> share of its outer shell (shares of one class
            sum to 1; a class without an entry has no shell, e.g. it fills the image).
        threshold: the share of the outside shell that must be the encloser.

    Returns:
        Foreground value -> parent value, or None for a class on the outside (a root).

    Raises:
        ValueError: ``threshold`` outside (0.5, 1]: below a half, two classes could each "enclose" B.
    """
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: expected a share in (0.5, 1], e.g. 0.9")
    classes = sorted(v for v in shell if v != 0)
    enclosers = {b: {a for a in classes if a != b and _encloses(shell, a, b, threshold)} for b in classes}
    for b in classes:  # interleaved classes each "enclose" the other: neither does
        for a in list(enclosers[b]):
            if b in enclosers[a]:
                enclosers[b].discard(a)
                enclosers[a].discard(b)
    tree: dict[int, int | None] = {}
    for b in classes:
        # innermost: the encloser that the most of B's other enclosers also enclose
        ranked = sorted(enclosers[b], key=lambda a: (-len(enclosers[a] & enclosers[b]), -shell[b].get(a, 0.0), a))
        tree[b] = ranked[0] if ranked else None
    return _cut_cycles(tree)


def _encloses(shell: Mapping[int, Mapping[int, float]], a: int, b: int, threshold: float) -> bool:
    noise = 1.0 - threshold
    pocket, frontier = {b}, [b]
    while frontier:  # classes reachable from B through real contact, without crossing A or background
        x = frontier.pop()
        for y in set(shell.get(x, {})) | {y for y in shell if x in shell[y]}:
            touching = max(shell.get(x, {}).get(y, 0.0), shell.get(y, {}).get(x, 0.0))
            if y not in pocket and y not in (0, a) and touching > noise:
                pocket.add(y)
                frontier.append(y)
    for x in pocket:
        outside = sum(share for y, share in shell.get(x, {}).items() if y not in pocket)
        if outside > 0 and shell[x].get(a, 0.0) < threshold * outside:
            return False
    return any(shell.get(x, {}).get(a, 0.0) > 0 for x in pocket)  # the pocket must touch A at all


def _cut_cycles(tree: dict[int, int | None]) -> dict[int, int | None]:
    out = dict(tree)
    for start in out:
        seen: list[int] = []
        node: int | None = start
        while node is not None and node not in seen:
            seen.append(node)
            node = out.get(node)
        if node is not None:  # back at a class already walked: cut every parent on the loop
            for member in seen[seen.index(node):]:
                out[member] = None
    return out


def _descendants(tree: Mapping[int, int | None], value: int) -> list[int]:
    children = sorted(c for c, p in tree.items() if p == value)
    return [d for c in children for d in (c, *_descendants(tree, c))]


def _depth(tree: Mapping[int, int | None], value: int) -> int:
    depth, parent = 0, tree.get(value)
    while parent is not None:
        depth, parent = depth + 1, tree.get(parent)
    return depth


def regions_from_tree(tree: Mapping[int, int | None], labels: Mapping[int, str]) -> list[tuple[str, list[int]]] | None:
    """The regions nnU-Net's region-based training would learn for a containment tree.

    One region per foreground class: the class and everything it encloses (BraTS: whole tumour =
    edema + enhancing + necrosis, tumour core = enhancing + necrosis, then necrosis alone), ordered
    outermost first (by depth, then by value). A region of a class with descendants is named by its
    label names joined outermost first (``edema_enhancing_necrosis``), a single class's by its own
    name; names are valid metric keys (letters, digits, ``_``). Decoding (nnU-Net's
    ``regions_class_order``, medseg's ``region_paint_labels``) paints, in this order, the one label
    of each region that no later region holds: here each class in turn, after its ancestors, so
    every label comes back exactly.

    Args:
        tree: :func:`containment_tree`'s result.
        labels: label value -> name (a missing one is called ``class_<value>``).

    Returns:
        ``[(name, sorted values), ...]``, or None when no class has a parent: flat labels, for
        which plain softmax training is the right choice.
    """
    if all(parent is None for parent in tree.values()):
        return None
    order = sorted(tree, key=lambda v: (_depth(tree, v), v))
    regions: list[tuple[str, list[int]]] = []
    used: set[str] = set()
    for value in order:
        members = [value, *sorted(_descendants(tree, value), key=lambda v: (_depth(tree, v), v))]
        name = "_".join(_metric_name(labels.get(v, f"class_{v}")) for v in members)
        unique, n = name, 2
        while unique in used:  # names that differ only in punctuation
            unique, n = f"{name}_{n}", n + 1
        used.add(unique)
        regions.append((unique, sorted(members)))
    return regions


def _metric_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    return cleaned or "class"


def rare_against_image(voxel_fraction_of_image: Mapping[int, float],
                       median_component_voxels: Mapping[int, float] | None = None,
                       rare_fraction: float = RARE_IMAGE_FRACTION,
                       small_component: float = SMALL_COMPONENT_VOXELS) -> dict[int, str]:
    """Foreground classes a patch sampler must seek out, judged against the image.

    :func:`rare_classes` compares classes with each other, so a dataset whose classes are all
    small (hippocampus, BraTS' enhancing tumour) has no rare class by it, yet a random patch
    mostly misses them all. Here a class is rare when it fills under ``rare_fraction`` of the
    cropped images' voxels, or when its median connected component is under ``small_component``
    voxels (specks a random crop rarely hits, whatever the class's total).

    Args:
        voxel_fraction_of_image: foreground value -> share of the (cropped) image voxels
            (:meth:`Fingerprint.image_fractions`); background (0) is ignored.
        median_component_voxels: foreground value -> median component size in voxels.
        rare_fraction, small_component: the two limits.

    Returns:
        Rare value -> one-line reason, by value.
    """
    median_component_voxels = median_component_voxels or {}
    rare: dict[int, str] = {}
    for value in sorted(v for v in voxel_fraction_of_image if v != 0):
        fraction = voxel_fraction_of_image[value]
        size = median_component_voxels.get(value)
        reasons = []
        if fraction < rare_fraction:
            reasons.append(f"{fraction:.3%} of the image voxels (< {rare_fraction:.0%})")
        if size is not None and size < small_component:
            reasons.append(f"median component {size:g} voxels (< {small_component:g})")
        if reasons:
            rare[value] = f"class {value}: " + " and ".join(reasons) + ": sample patches per class"
    return rare


def min_component_size_candidates(component_sizes_voxels: Sequence[int],
                                  fractions: Sequence[float] = MIN_COMPONENT_FRACTIONS) -> list[int]:
    """Thresholds to try for removing small predicted components at post-processing.

    0 (keep everything) and each fraction of the 5th percentile of the true components' sizes: a
    predicted speck much smaller than almost any true component is likely noise. Which one to use
    is chosen later on validation (nnU-Net decides its connected-component post-processing there
    too). A threshold t removes components of fewer than t voxels, so 1 would remove nothing and
    is left out.

    Args:
        component_sizes_voxels: sizes of the reference components (one class, all training cases).
        fractions: of the 5th percentile.

    Returns:
        Ascending distinct thresholds, always starting with 0.
    """
    if not component_sizes_voxels:
        return [0]
    p05 = float(np.percentile(np.asarray(component_sizes_voxels, dtype=np.float64), 5))
    return sorted({0} | {int(math.floor(f * p05)) for f in fractions if math.floor(f * p05) >= 2})
