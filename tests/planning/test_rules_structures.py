"""The rules for nested and small structures: containment tree, regions and their decoding,
image-relative rarity, small-component thresholds. Known answers, BraTS-like and awkward cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from medseg.planning import rules
from medseg.planning.fingerprint import class_shells
from medseg.tasks.segmentation.config import RegionConfig, check_regions, region_paint_labels

BRATS = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
# necrosis (1) inside an enhancing rim (3) inside edema (2): the rim's shell is edema outside and the
# core it holds inside; the edema's is background
BRATS_SHELL = {1: {3: 1.0}, 3: {2: 0.6, 1: 0.4}, 2: {0: 1.0}}


def _nested_brats_volume() -> np.ndarray:
    """Two tumours on an odd grid: edema balls, a rim ball inside each, a necrotic ball inside that."""
    z, y, x = np.ogrid[:23, :29, :17]
    label = np.zeros((23, 29, 17), dtype=np.int64)
    for (cz, cy, cx), radius in (((7, 8, 8), 6.0), ((15, 20, 8), 5.0)):
        rho = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
        label[rho < radius] = 2
    for (cz, cy, cx), radius in (((7, 8, 8), 3.5), ((15, 20, 8), 3.0)):
        rho = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2)
        label[rho < radius] = 3
        label[rho < radius - 2.0] = 1  # more than a corner step (1.73) inside the rim
    return label


def _decode(label: np.ndarray, regions: list[tuple[str, list[int]]], labels: dict[int, str]) -> np.ndarray:
    """The label map back from the region masks, by the trainer's own decoding rule (which the
    planned regions must also pass)."""
    configs = [RegionConfig(name=name, labels=tuple(members)) for name, members in regions]
    check_regions(configs, labels)
    decoded = np.zeros_like(label)
    for (_, members), paint in zip(regions, region_paint_labels(configs)):
        decoded[np.isin(label, members)] = paint
    return decoded


def _fractions(shells: dict[int, dict[int, int]]) -> dict[int, dict[int, float]]:
    return {v: {k: n / sum(s.values()) for k, n in s.items()} for v, s in shells.items()}


def test_brats_like_shells_give_the_nested_chain() -> None:
    assert rules.containment_tree(BRATS_SHELL) == {1: 3, 2: None, 3: 2}


def test_the_tree_is_found_from_a_real_nested_label_map() -> None:
    shells = _fractions(class_shells(_nested_brats_volume()))
    # the edema's shell holds the rim's outer layer too (its inner surface): the tree must see past it
    assert shells[1] == {3: 1.0} and set(shells[3]) == {1, 2} and set(shells[2]) == {0, 3}
    assert rules.containment_tree(shells) == {1: 3, 2: None, 3: 2}


def test_necrosis_touching_the_edema_hangs_under_the_edema_beside_the_rim() -> None:
    # an open rim: 30 % of the core's shell is edema, so the rim does not enclose it; the edema does
    shell = {1: {3: 0.7, 2: 0.3}, 3: {2: 0.65, 1: 0.35}, 2: {0: 1.0}}
    assert rules.containment_tree(shell) == {1: 2, 2: None, 3: 2}


def test_flat_interleaved_and_background_touching_classes_have_no_parent() -> None:
    assert rules.containment_tree({1: {0: 1.0}, 2: {0: 0.7, 1: 0.3}}) == {1: None, 2: None}
    # each is 95 % the other: they "enclose" each other, so neither encloses
    assert rules.containment_tree({1: {2: 0.95, 0: 0.05}, 2: {1: 0.95, 0: 0.05}}) == {1: None, 2: None}
    # 85 % enclosed: under the 0.9 threshold, over a 0.8 one
    assert rules.containment_tree({1: {2: 0.85, 0: 0.15}, 2: {0: 1.0}}) == {1: None, 2: None}
    assert rules.containment_tree({1: {2: 0.85, 0: 0.15}, 2: {0: 1.0}}, threshold=0.8) == {1: 2, 2: None}
    assert rules.containment_tree({}) == {}


def test_a_bad_threshold_is_named() -> None:
    with pytest.raises(ValueError, match=r"threshold=0\.3: expected a share in \(0\.5, 1\]"):
        rules.containment_tree(BRATS_SHELL, threshold=0.3)


def test_brats_regions_are_whole_core_enhancing_outermost_first() -> None:
    regions = rules.regions_from_tree({1: 3, 2: None, 3: 2}, BRATS)
    assert regions == [("edema_enhancing_necrosis", [1, 2, 3]), ("enhancing_necrosis", [1, 3]), ("necrosis", [1])]
    configs = [RegionConfig(name=name, labels=tuple(members)) for name, members in regions]
    assert region_paint_labels(configs) == [2, 3, 1]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", name) for name, _ in regions)


def test_flat_labels_give_no_regions() -> None:
    assert rules.regions_from_tree({1: None, 2: None}, {1: "a", 2: "b"}) is None


def test_sibling_regions_and_a_separate_flat_class_with_awkward_names() -> None:
    tree = {1: None, 2: 1, 3: 1, 4: None}  # two siblings inside class 1; class 4 elsewhere, on its own
    regions = rules.regions_from_tree(tree, {1: "liver", 2: "tumour (A)", 3: "cyst-B", 4: "vessel"})
    assert regions == [("liver_tumour_A_cyst_B", [1, 2, 3]), ("vessel", [4]), ("tumour_A", [2]), ("cyst_B", [3])]
    configs = [RegionConfig(name=name, labels=tuple(members)) for name, members in regions]
    assert region_paint_labels(configs) == [1, 4, 2, 3]


@pytest.mark.parametrize("tree", [{1: 3, 2: None, 3: 2}, {1: None, 2: 1, 3: 1, 4: None}, {1: 2, 2: None, 3: 2}])
def test_decoding_the_regions_gives_every_label_back(tree: dict[int, int | None]) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, max(tree) + 1, size=(7, 5, 3))  # every value, in every arrangement
    names = {v: f"class_{v}" for v in range(max(tree) + 1)}
    regions = rules.regions_from_tree(tree, {})
    assert regions is not None
    np.testing.assert_array_equal(_decode(label, regions, names), label)


def test_decoding_the_brats_volume_from_its_regions() -> None:
    label = _nested_brats_volume()
    regions = rules.regions_from_tree(rules.containment_tree(_fractions(class_shells(label))), BRATS)
    assert regions is not None
    np.testing.assert_array_equal(_decode(label, regions, BRATS), label)


def test_rarity_against_the_image() -> None:
    rare = rules.rare_against_image({0: 0.9, 1: 0.2, 2: 0.004, 3: 0.05}, {1: 50_000, 2: 900, 3: 12.0})
    assert list(rare) == [2, 3]
    assert "0.400% of the image voxels (< 1%)" in rare[2] and "median component 900 voxels" in rare[2]
    assert "of the image" not in rare[3] and "median component 12 voxels (< 1000)" in rare[3]
    assert rules.rare_against_image({1: 0.2}) == {}
    # the existing rule, relative to the median foreground class, still calls none of these rare
    assert rules.rare_classes({1: 0.004, 2: 0.005}, {1: 1.0, 2: 1.0}) == []
    assert list(rules.rare_against_image({1: 0.004, 2: 0.005})) == [1, 2]


def test_min_component_size_candidates() -> None:
    sizes = [100] * 19 + [1000]  # 5th percentile 100
    assert rules.min_component_size_candidates(sizes) == [0, 25, 50]
    assert rules.min_component_size_candidates([3, 5, 30]) == [0]  # specks: removing anything would hurt
    assert rules.min_component_size_candidates([]) == [0]
    assert rules.min_component_size_candidates([40], fractions=(0.1, 0.25, 0.5)) == [0, 4, 10, 20]


def test_class_shells_in_2d_with_corners_and_the_image_border() -> None:
    label = np.array([[1, 1, 0, 0],
                      [1, 1, 0, 0],
                      [0, 0, 2, 0]])
    # class 1's shell: (0,2), (1,2), (2,0), (2,1) background and the diagonal (2,2) class 2
    assert class_shells(label) == {1: {0: 4, 2: 1}, 2: {0: 4, 1: 1}}
    assert class_shells(np.zeros((3, 3), dtype=np.int64)) == {}
    assert ndimage.binary_dilation(label == 1, np.ones((3, 3))).sum() == 9
