"""Plan a classification config from a fingerprint, a time budget and the device (``medseg plan``).

What the data decide: the input size (the median image size), the intensity scaling (CT: nnU-Net's
clip + z-score; anything else: one dataset-wide linear map of the fingerprint's range to [0, 1], so
brightness differences between images survive), class weights (balanced when the classes are
imbalanced), flips (3D shape data only: a 2D X-ray or ultrasound has a left and a right), the stem
(small images keep their resolution) and whether the official split's cross-split duplicates
are kept. What the budget and the machine decide, by probing: the ResNet-18 width and the
number of epochs. The rule: the widest network that still sees :data:`MIN_SAMPLES` training
images within the budget, then as many epochs as the budget holds (capped at :data:`MAX_EPOCHS`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from medseg.config import Precision
from medseg.planning import rules
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import ExplainRow, Plan, PlanRequest
from medseg.planning.probe import (
    ProbeClock,
    ProbeResult,
    crowded_probe_notes,
    pick_within_budget,
    time_steps,
    with_overrides,
)

#: Training images a classifier should see: the hand-tuned MedMNIST configs (10 epochs of 4,708
#: images, 80 of 546, 30 of 1,188) all reach their AUC after 36,000-47,000.
MIN_SAMPLES = 40_000
MAX_EPOCHS = 100
MIN_EPOCHS = 5
#: Share of a budget that is optimiser steps (the rest: augmentation, validation every epoch,
#: checkpoints). Measured on the MedMNIST runs: a network step is about half of an epoch's time.
STEP_SHARE = 0.5
WIDTHS = (1.0, 0.5, 0.25)


def _batch_size(n_train: int, dims: int) -> int:
    """64 images (3D: 32 volumes) - a CPU step's cost per image falls until about there - but at
    least 8 steps per epoch on small sets; a power of two, at least 8."""
    target = max(8, min(64 if dims == 2 else 32, n_train // 8))
    return int(2 ** math.floor(math.log2(target)))


def _synthetic_batch(size: list[int], channels: int, classes: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(batch) % classes
    images = torch.randn(batch, channels, *size, generator=generator) + labels.view(-1, *([1] * (len(size) + 1)))
    return images, labels


def plan(task: Any, request: PlanRequest, fp: Fingerprint) -> Plan:
    """The classification plan (see the module docstring)."""
    dims = fp.spatial_dims
    training = fp.training_cases()
    why: dict[str, str] = {}
    notes: list[str] = []
    n_train = sum(1 for c in fp.cases if c.split == "train")
    sizes = np.asarray([c.shape for c in training])
    size = [int(round(v)) for v in np.median(sizes, axis=0)]
    varies = bool((sizes != sizes[0]).any())
    intensity, why["preprocess.intensity"] = _intensity(fp)
    counts = Counter(c.label for c in training if c.label is not None)
    imbalance = max(counts.values()) / max(1, min(counts.values())) if counts else 1.0
    batch = _batch_size(n_train, dims)
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    stem = "small" if max(size) <= 64 else "strided" if max(size) <= 160 else "imagenet"
    if dims == 3 and stem == "small":
        stem = "strided"  # a 3D ResNet at full resolution costs 8x a strided stem for the same receptive field
    base = _base_config(request, fp, size, intensity, dims, stem, imbalance, batch)

    step_seconds = request.budget_minutes * 60 * STEP_SHARE
    chosen_width, step_time, probe = _choose_width(task, request, fp, base, size, batch, step_seconds, notes)
    steps = int(step_seconds / step_time) if step_time else None
    epochs = int(min(MAX_EPOCHS, max(MIN_EPOCHS, steps // steps_per_epoch))) if steps else \
        int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_SAMPLES / max(1, n_train)))))
    config = base
    config["model"]["widen_factor"] = chosen_width
    config["train"]["max_epochs"] = None  # the budget binds: an epoch cap below it would leave time unspent
    config["train"]["val_interval"] = 1 if epochs <= 40 else 2

    why.update({
        "preprocess.resize": f"median image size{' (sizes vary)' if varies else ' (every image)'}",
        "preprocess.orientation": "whole images, as stored" if dims == 2 else "as stored (shape data)",
        "model.widen_factor": (f"probe: {step_time:.3f} s/step at batch {batch}, ~{steps * batch:,} images in the "
                               "budget: " + (f"the widest that sees {MIN_SAMPLES:,}" if steps * batch >= MIN_SAMPLES
                                             else f"none sees {MIN_SAMPLES:,}, so the one that sees the most")
                               if step_time and steps else "rules only (no probe)"),
        "model.stem": {"small": "small images: no downsampling in the stem",
                       "strided": "halves the resolution first (" + ("3D: an eighth of the FLOPs)" if dims == 3
                                                                      else "mid-sized images)"),
                       "imagenet": "large images: ImageNet stem"}[stem],
        "model.dropout": "small dataset" if n_train < 2000 else "regularises the head",
        "loss": ("balanced class weights: the classes are imbalanced "
                 f"({imbalance:.1f}:1)" if imbalance > 1.5 else "classes are balanced") + "; label smoothing 0.05",
        "train.batch_size": f"{'64 images' if dims == 2 else '32 volumes'} a step, at least 8 steps an epoch of "
                            f"{n_train}",
        "train.max_epochs": ("no epoch cap: the budget alone ends training and the LR schedule follows the clock "
                             + (f"(~{epochs} epochs of {steps_per_epoch} steps expected)" if steps
                                else "(not probed)")),
        "train.max_minutes": "--budget",
        "model.norm": "batch norm: batches of 32-64 images give stable statistics",
        "train.grad_clip": "clip gradient norms: label smoothing and class weights make early steps large",
        "validation.tsne": "a map of the penultimate layer on the test split, logged as an image",
        "data.fingerprint": "what this plan was made from (logged with the run)",
        "data.labels": "from the dataset's description (class folders, medmnist_import.json, ...)",
        "augment": _augmentation_reason(dims, n_train, list(fp.channel_names)),
        "optim": "AdamW with a cosine schedule" + (", lr 1e-3 for 3D" if dims == 3 else ""),
    })
    if config["data"].get("cross_split_duplicates") == "warning":
        why["data.cross_split_duplicates"] = "the manifest's split repeats identical images across splits " \
                                             "(kept as published; verify lists them)"
    explain = [
        ExplainRow("input size", str(size), "n/a (segmentation only)", why["preprocess.resize"]),
        ExplainRow("network", f"resnet18 x{chosen_width}, {stem} stem", "n/a", why["model.widen_factor"]),
        ExplainRow("batch", str(batch), "n/a", why["train.batch_size"]),
        ExplainRow("epochs", str(epochs), "n/a", why["train.max_epochs"]),
        ExplainRow("class weights", config["loss"]["class_weights"] or "none", "n/a", why["loss"]),
    ]
    return Plan(request=request, config=config, why=why, fingerprint=fp, probe=[p.as_dict() for p in probe],
                explain_rows=explain, notes=notes, steps_in_budget=steps, step_goal=math.ceil(MIN_SAMPLES / batch))


def _intensity(fp: Fingerprint) -> tuple[dict[str, Any], str]:
    """CT: nnU-Net's clip + z-score; anything else: one linear map of the dataset's range to [0, 1]."""
    stats = fp.channels[0]
    if rules.is_ct(stats.name):
        return ({"mode": "clip_zscore", "clip": [round(stats.percentile_00_5, 2), round(stats.percentile_99_5, 2)],
                 "mean": round(stats.mean, 3), "std": round(max(stats.std, 1e-6), 3)},
                "CT: clip to p0.5-p99.5, z-score with the dataset's mean/std (nnU-Net)")
    low, high = min(c.min for c in fp.channels), max(c.max for c in fp.channels)
    return ({"mode": "ct_window", "window": [round(low, 4), round(high if high > low else low + 1, 4)]},
            f"one linear map of the dataset's range [{low:g}, {high:g}] to [0, 1] for every image: brightness "
            "differences between images are kept")


def _choose_width(task: Any, request: PlanRequest, fp: Fingerprint, base: dict[str, Any], size: list[int], batch: int,
                  step_seconds: float, notes: list[str]) -> tuple[float, float | None, list[ProbeResult]]:
    """The widest ResNet-18 that sees :data:`MIN_SAMPLES` images in the budget (probed at fp32), its
    step time and the probe's rows; without a probe, medseg's default width."""
    dims = fp.spatial_dims
    probe: list[ProbeResult] = []
    if not request.probe:
        return (0.5 if dims == 2 else 0.25), None, probe
    clock = ProbeClock()
    images = _synthetic_batch(size, len(fp.channel_names), len(request.labels), batch)
    timed: list[tuple[float, float]] = []
    for width in reversed(WIDTHS):  # narrowest first; stop once one misses the goal (wider ones are slower)
        if timed and step_seconds / timed[-1][1] * batch < MIN_SAMPLES:
            probe.append(ProbeResult(f"resnet18 x{width}, batch {batch}", "-", dims == 3, None, None,
                                     note="not timed: a narrower network already misses the goal"))
            continue
        cfg = task.config_type.model_validate(with_overrides(base, {"model.widen_factor": width}))
        result = time_steps(task, cfg, images, request.device, Precision.FP32, dims == 3,
                            f"resnet18 x{width}, batch {batch}", clock)
        probe.append(result)
        if result.seconds_per_step is not None:
            timed.append((width, result.seconds_per_step))
    timed.reverse()  # widest first, as the budget rule reads them
    picked = pick_within_budget([t for _, t in timed], step_seconds, MIN_SAMPLES / batch)
    if picked is None:
        return (0.5 if dims == 2 else 0.25), None, probe
    if not picked.reaches_goal:
        notes.append(f"no width sees {MIN_SAMPLES:,} images within {request.budget_minutes:g} min; the "
                     "narrowest was taken: give a bigger budget")
    width, step_time = timed[picked.index]
    notes.extend(crowded_probe_notes(probe))
    return width, step_time, probe


def _base_config(request: PlanRequest, fp: Fingerprint, size: list[int], intensity: dict[str, Any], dims: int,
                 stem: str, imbalance: float, batch: int) -> dict[str, Any]:
    from medseg.data.manifest import read_manifest

    data: dict[str, Any] = {"manifest": str(request.manifest), "root": str(request.root),
                            "labels": dict(request.labels), "channels": list(fp.channel_names), "cache": "memory"}
    if fp.manifest:
        from medseg.planning.fingerprint import fingerprint_cache_path

        data["fingerprint"] = str(fingerprint_cache_path(request.manifest))
    if _cross_split_duplicates(read_manifest(request.manifest)):
        data["cross_split_duplicates"] = "warning"
    augment = _augmentation(dims, sum(1 for c in fp.cases if c.split == "train"), list(fp.channel_names))
    return {
        "task": "classification",
        "seed": 0,
        "output_dir": f"runs/{request.name}",
        "data": data,
        "preprocess": {"orientation": None, "intensity": intensity, "resize": size},
        "augment": augment,
        "model": {"name": "resnet18", "spatial_dims": dims, "widen_factor": 0.5, "stem": stem, "norm": "batch",
                  "dropout": 0.3 if len(fp.cases) < 2000 else 0.2},
        "loss": {"name": "ce", "class_weights": "balanced" if imbalance > 1.5 else None, "label_smoothing": 0.05},
        "optim": {"name": "adamw", "lr": 0.001 if dims == 3 else 0.002, "weight_decay": 0.05, "schedule": "cosine",
                  "warmup_fraction": 0.03},
        "train": {"max_epochs": 30, "max_minutes": request.budget_minutes, "batch_size": batch, "val_interval": 1,
                  "grad_clip": 5.0},
        "validation": {"calibration_bins": 10, "tsne": True},
        "tracking": {"uri": "sqlite:///runs/mlflow.db", "experiment": request.name},
    }


#: Modalities whose 2D images have no left and right (a mirrored image is just as real).
NO_HANDEDNESS = {"ultrasound", "us", "pathology", "histology", "microscopy", "dermoscopy", "fundus"}
#: Fewer training images than this get stronger augmentation (each image is seen many times).
SMALL_DATASET = 1000


def _augmentation(dims: int, n_train: int, channel_names: list[str]) -> list[dict[str, Any]]:
    small = n_train < SMALL_DATASET
    augment: list[dict[str, Any]] = [
        {"name": "affine", "prob": 0.7 if small else 0.5, "rotate_deg": 15 if small else 10,
         "scale": 0.15 if small else 0.1, "translate": 0.08 if small else 0.05}]
    if dims == 3 or any(name.strip().lower() in NO_HANDEDNESS for name in channel_names):
        augment.insert(0, {"name": "flip", "prob": 0.5, "axes": [0]} if dims == 2 else {"name": "flip", "prob": 0.5})
    if dims == 2:
        augment.append({"name": "contrast", "prob": 0.4 if small else 0.3, "scale": 0.2 if small else 0.15,
                        "shift": 0.08 if small else 0.05})
    if small:
        augment.append({"name": "noise", "prob": 0.2, "std": 0.03})
    return augment


def _augmentation_reason(dims: int, n_train: int, channel_names: list[str]) -> str:
    flips = ("flips on every axis (3D shape data has no handedness)" if dims == 3 else
             f"left-right flips ({', '.join(channel_names)} images have no handedness)"
             if any(n.strip().lower() in NO_HANDEDNESS for n in channel_names) else
             f"no flips ({', '.join(channel_names)}: a 2D image may have a left and a right, e.g. a chest X-ray)")
    size = (f"stronger affine, contrast and noise: {n_train} training images are each seen many times"
            if n_train < SMALL_DATASET else "light affine and contrast moves")
    return f"{flips}; {size}"


def _cross_split_duplicates(manifest: Any) -> bool:
    """Whether one image's content hash occurs in two splits (an official split may have a few)."""
    seen: dict[str, str] = {}
    for case in manifest.cases:
        for digest in case.image_sha256:
            if digest in seen and seen[digest] != case.split:
                return True
            seen.setdefault(digest, case.split)
    return False
