"""The evaluate stage mirrors as nnU-Net's final validation does: over the axes training flipped,
by default only when training flipped every axis (planned configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medseg
from medseg.tasks.segmentation.training import (
    build_network,
    evaluation_mirror_axes,
    mirrored_logits,
    segmentation_logits,
)
from tests.conftest import tiny_config, train_run

CPU = torch.device("cpu")
EVERY_AXIS = [{"name": "flip", "prob": 0.5, "axes": [0]}, {"name": "flip", "prob": 0.5, "axes": [1]},
              {"name": "flip", "prob": 0.5, "axes": [2]}]


def _cfg(tmp_path: Path, inputs: tuple[Path, Path], **sections: dict) -> medseg.RunConfig:
    dataset, manifest = inputs
    return medseg.load_config(tiny_config(tmp_path, dataset, manifest, f"sqlite:///{tmp_path / 'm.db'}", **sections))


@pytest.mark.parametrize(("augment", "tta", "expected"), [
    (EVERY_AXIS, None, [0, 1, 2]),          # auto: every axis flipped -> mirror over them
    (EVERY_AXIS[:1], None, []),             # auto: one axis flipped (a hand config) -> plain
    (EVERY_AXIS[:1], True, [0]),            # asked: only the axis training flipped
    (EVERY_AXIS, False, []),                # refused
    ([{"name": "noise", "prob": 0.2, "std": 0.05}], True, []),  # nothing flipped: nothing to mirror
])
def test_which_axes_the_evaluate_stage_mirrors(tmp_path: Path, tiny_run_inputs: tuple[Path, Path], augment: list,
                                               tta: bool | None, expected: list[int]) -> None:
    cfg = _cfg(tmp_path, tiny_run_inputs, augment=augment, validation={"tta": tta})
    assert evaluation_mirror_axes(cfg) == expected


def test_mirrored_logits_are_the_log_of_the_mean_probabilities(tmp_path: Path,
                                                                tiny_run_inputs: tuple[Path, Path]) -> None:
    cfg = _cfg(tmp_path, tiny_run_inputs, augment=EVERY_AXIS)
    torch.manual_seed(0)
    network = build_network(cfg).eval()
    image = torch.randn(1, 19, 23, 11, generator=torch.Generator().manual_seed(1))  # odd, not a patch multiple

    plain = mirrored_logits(network, image, cfg, CPU, None, [])
    mirrored = mirrored_logits(network, image, cfg, CPU, None, [0, 2])

    assert torch.equal(plain, segmentation_logits(network, image, cfg, CPU, None).float())
    expected = torch.zeros_like(plain)
    for axes in ([], [0], [2], [0, 2]):  # each mirrored prediction flipped back, probabilities averaged
        flipped = image.flip([1 + a for a in axes]) if axes else image
        out = segmentation_logits(network, flipped, cfg, CPU, None).float()
        expected += torch.softmax(out.flip([1 + a for a in axes]) if axes else out, 0) / 4
    assert torch.allclose(torch.softmax(mirrored, 0), expected, atol=1e-5)
    assert not torch.allclose(torch.softmax(plain, 0), expected, atol=1e-3)  # the mirrorings changed something


def test_a_run_that_flips_every_axis_is_scored_mirrored_and_its_model_says_so(
        tmp_path: Path, tiny_run_inputs: tuple[Path, Path]) -> None:
    dataset, manifest = tiny_run_inputs
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mirrored = train_run(tiny_config(tmp_path / "a", dataset, manifest, f"sqlite:///{tmp_path / 'm.db'}",
                                     augment=EVERY_AXIS, train={"max_epochs": 1}))
    plain = train_run(tiny_config(tmp_path / "b", dataset, manifest, f"sqlite:///{tmp_path / 'm.db'}",
                                  train={"max_epochs": 1}))

    assert mirrored.metrics["best_val/predictions_per_case"] == 8.0  # 2^3 mirrorings of a 3D volume
    assert plain.metrics["best_val/predictions_per_case"] == 1.0
    assert json.loads((mirrored.run_dir / "contract.json").read_text())["evaluated_with_tta"] is True
    assert json.loads((plain.run_dir / "contract.json").read_text())["evaluated_with_tta"] is False
