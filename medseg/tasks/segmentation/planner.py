"""Plan a segmentation config from a fingerprint, a time budget and the device (``medseg plan``).

nnU-Net's rules choose what the data decide (:mod:`medseg.planning.rules`): target spacing with
the anisotropy rule, normalisation per channel, patch shape and the per-axis pooling/kernel
topology. What nnU-Net fixes for a reference GPU, medseg fits to the budget and the machine by
measuring (:mod:`medseg.planning.probe`): which network (nnU-Net's DynUNet, or the lean MONAI
U-Net whose first stage is already strided, ~5x cheaper per step on a CPU), its width, the patch
scale and the precision. The rule: take the richest candidate that still gets
:data:`MIN_ITERATIONS` training steps into the budget (nnU-Net itself trains 250,000); when
none does, the one that gets the most.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medseg.config import Precision
from medseg.planning import rules
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import Candidate as RaceCandidate
from medseg.planning.plan import ExplainRow, Plan, PlanRequest
from medseg.planning.probe import (
    ProbeClock,
    ProbeResult,
    crowded,
    crowded_probe_notes,
    pick_within_budget,
    reduced_precisions,
    same_loss_curve,
    time_steps,
    with_overrides,
)
from medseg.planning.race import RACE_SHARE, combine_candidates
from medseg.tasks.segmentation.scoring_plan import decide as decide_scoring
from medseg.tasks.segmentation.slice_plan import slice_candidate
from medseg.tasks.segmentation.structures import decide as decide_structures

#: Training steps a plan should fit into its budget. The hand-tuned hippocampus config reached
#: Dice 0.885 with ~34,000 steps in 30 CPU-minutes; far below 20,000 a U-Net is still learning
#: fast, so more steps beat a richer network. nnU-Net's schedule is 250,000.
MIN_ITERATIONS = 20_000
#: Share of the budget that is training steps (the rest: data loading, validation, checkpoints);
#: measured on the hippocampus runs (benchmarks/results/hippocampus.md: 9.6 s/epoch of 182 steps
#: whose network step alone takes ~0.03 s).
STEP_SHARE = 0.55
#: A budget of at least this buys nnU-Net's full augmentation; below it the light set converges faster.
FULL_AUGMENTATION_MINUTES = 120.0
#: A reduced precision or another memory layout must take at most this share of the time: 15 % faster
#: is beyond the probe's run-to-run noise; a 5 % gain is not worth a numerics risk.
CLEARLY_FASTER = 0.85
#: Patch scales tried after nnU-Net's patch, for budgets too tight for it.
PATCH_SCALES = (0.8, 0.6)
#: The next richer candidate than the rules' pick is raced against it when it still gets this share of
#: :data:`MIN_ITERATIONS` steps: near the goal, whether more steps or a richer network win is a question
#: for the data, and a slower machine moves the rules' pick to a smaller patch.
RICHER_RACE_FLOOR = 0.5
BATCH_SIZE = 2  # nnU-Net's minimum; on a CPU a step's time grows with the batch, so more steps win


def _synthetic_batch(patch: list[int], channels: int, classes: int, batch: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                          torch.Tensor]:
    """Blobs of every class with class-dependent intensities: a batch whose loss can fall, so the
    precision check compares two learning curves, not two noise floors."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.avg_pool3d if len(patch) == 3 else torch.nn.functional.avg_pool2d
    noise = field(torch.randn(batch, 1, *patch, generator=generator), 5, stride=1, padding=2)
    edges = torch.quantile(noise.flatten(), torch.linspace(0, 1, classes + 1)[1:-1])
    label = torch.bucketize(noise, edges)
    image = label.float().repeat(1, channels, *([1] * len(patch))) + 0.3 * torch.randn(batch, channels, *patch,
                                                                                     generator=generator)
    return image, label


def _network(family: str, topology: rules.Topology, base: int, dims: int) -> dict[str, Any]:
    features = [min(base * 2**i, rules.NNUNET_MAX_FEATURES[dims]) for i in range(topology.stages)]
    strides = [s[0] if len(set(s)) == 1 else list(s) for s in topology.strides[1:]]
    if family == "dynunet":
        return {"name": "dynunet", "spatial_dims": dims, "channels": features, "strides": strides,
                "kernels": topology.kernels, "num_res_units": 0, "norm": "instance"}
    return {"name": "unet", "spatial_dims": dims, "channels": features, "strides": strides, "num_res_units": 1,
            "norm": "instance"}


def _augmentation(dims: int, budget_minutes: float, anisotropic_axis: int | None, is_ct: bool) -> tuple[list, str]:
    full = budget_minutes >= FULL_AUGMENTATION_MINUTES
    rotate = 15 if anisotropic_axis is None else 10
    items: list[dict[str, Any]] = [{"name": "affine", "prob": 0.2, "rotate_deg": rotate if not full else 30,
                                    "scale": 0.1 if not full else 0.3}]
    # nnU-Net mirrors every axis in every configuration, and predicts with the same mirrors (TTA)
    items.append({"name": "flip", "prob": 0.5})
    items += [{"name": "contrast", "prob": 0.3 if not full else 0.15, "scale": 0.2, "shift": 0.1},
              {"name": "gamma", "prob": 0.2 if not full else 0.3, "gamma": [0.8, 1.25] if not full else [0.7, 1.5]},
              {"name": "noise", "prob": 0.1, "std": 0.05 if not is_ct else 0.1}]
    why = (f"{'nnU-Net' if full else 'light'} augmentation for a {budget_minutes:g}-minute budget"
           + ("" if full else f" (nnU-Net's full set pays off after ~1000 epochs; plans of >= {FULL_AUGMENTATION_MINUTES:g} min use it)")
           + "; mirroring along every axis, as nnU-Net, so predict --tta can mirror the same axes (validation.tta says how val and test are scored)"
           + (f"; rotations kept small: axis {anisotropic_axis} is anisotropic" if anisotropic_axis is not None else ""))
    return items, why


Candidate = tuple[str, rules.Topology, int, str]  # network family, topology, base width, label


@dataclass
class _Choice:
    """What the probe picked: a candidate, its precision and memory layout, and its measured step."""

    candidate: Candidate
    precision: Precision
    channels_last: bool
    step_seconds: float | None = None
    probe: list[ProbeResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    richer: tuple[Candidate, Precision, float] | None = None  # the next richer candidate near the goal, raced


@dataclass
class _Decisions:
    """Every decision of a plan, in the order nnU-Net's ExperimentPlanner makes them."""

    spacing_rule: rules.SpacingDecision
    spacing: list[float]
    all_there: bool
    norm: rules.NormalisationDecision
    nnunet: rules.NnunetPlan
    full: rules.Topology
    choice: _Choice
    batch_size: int
    iterations: int | None
    epochs: int | None


def plan(task: Any, request: PlanRequest, fp: Fingerprint) -> Plan:
    """The segmentation plan (see the module docstring): geometry, normalisation, the candidates the
    probe times, the training length, then the structure rules; each with its reason."""
    dims = fp.spatial_dims
    training = fp.training_cases()
    spacings = [c.spacing for c in training]
    shapes = [c.shape for c in training]
    # geometry: nnU-Net's target spacing; no resampling when every case is already there
    spacing_rule = rules.target_spacing(spacings, shapes)
    spacing = [round(s, 4) for s in spacing_rule.spacing]
    all_there = all(np.allclose(c.spacing, spacing, rtol=1e-3) for c in fp.cases)
    norm, notes = _normalisation(fp)
    nnunet = rules.nnunet_default_plan(spacings, shapes, len(fp.channel_names), len(request.labels))
    full, candidates = _candidates(spacing, spacings, shapes, nnunet)
    base = _base_config(request, fp, spacing if not all_there else None, norm, dims)
    # a GPU step costs little more for a bigger batch (nnU-Net's batch); on a CPU it costs proportionally more
    batch_size = max(BATCH_SIZE, nnunet.batch_size) if request.device.type == "cuda" else BATCH_SIZE
    choice = _choose(task, request, fp, base, candidates, batch_size)
    iterations = int(request.budget_minutes * 60 * STEP_SHARE / choice.step_seconds) if choice.step_seconds else None
    per_epoch = max(1, math.ceil(sum(1 for c in fp.cases if c.split == "train") * 2 / batch_size))
    epochs = max(1, iterations // per_epoch) if iterations else None
    decisions = _Decisions(spacing_rule, spacing, all_there, norm, nnunet, full, choice, batch_size, iterations, epochs)
    return _assemble(request, fp, base, decisions, notes + choice.notes + _thread_notes(request.device))


def _normalisation(fp: Fingerprint) -> tuple[rules.NormalisationDecision, list[str]]:
    """One rule for all channels (medseg normalises channel-wise), from the first channel's statistics."""
    stats = fp.channels[0]
    norm = rules.normalisation(stats.name, stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std,
                               fp.median_crop_ratio())
    notes = []
    if len(fp.channel_names) > 1 and len({rules.is_ct(c.name) for c in fp.channels}) > 1:
        notes.append("channels mix CT and other modalities; the first channel's rule is applied to all")
    return norm, notes


def _candidates(spacing: list[float], spacings: list[Any], shapes: list[Any],
                nnunet: rules.NnunetPlan) -> tuple[rules.Topology, list[Candidate]]:
    """nnU-Net's patch and topology (fitted to its 8 GB GPU reference, kept below the median image),
    then the networks and smaller patches the probe times for tight budgets, richest first."""
    median_shape = list(np.median(np.asarray(shapes) * np.asarray(spacings) / np.asarray(spacing), axis=0))
    full = rules.leave_crop_room(spacing, rules.pool_and_conv(spacing, nnunet.patch), median_shape)
    candidates: list[Candidate] = [("dynunet", full, 32, "nnU-Net DynUNet, 32 base features"),
                                   ("dynunet", full, 16, "nnU-Net DynUNet, 16 base features"),
                                   ("unet", full, 16, "lean U-Net, 16 base features")]
    seen = [full.patch]
    for scale in PATCH_SCALES:  # smaller patches: more steps in a tight budget
        smaller = rules.pool_and_conv(spacing, [max(8, int(round(p * scale))) for p in full.patch])
        if smaller.patch not in seen:
            seen.append(smaller.patch)
            candidates.append(("unet", smaller, 16, f"lean U-Net, 16 base features, {scale:g}x patch"))
    return full, candidates


def _choose(task: Any, request: PlanRequest, fp: Fingerprint, base: dict[str, Any], candidates: list[Candidate],
            batch_size: int) -> _Choice:
    """The richest candidate that fits :data:`MIN_ITERATIONS` steps into the budget, at the fastest
    precision whose loss curve matches fp32 and the faster memory layout; without a probe, the lean
    U-Net at medseg's default precision (fp16 autocast on a GPU, fp32 on a CPU)."""
    dims = fp.spatial_dims
    if not request.probe:
        return _Choice(candidates[2], Precision.AUTO, dims == 3)
    clock = ProbeClock()
    step_budget = request.budget_minutes * 60 * STEP_SHARE
    probe: list[ProbeResult] = []
    measured = _time_candidates(task, request, fp, base, candidates, batch_size, step_budget, clock, probe)
    picked = pick_within_budget([m[1].seconds_per_step for m in measured], step_budget, MIN_ITERATIONS)
    if picked is None:
        return _Choice(candidates[2], Precision.FP32, dims == 3, None, probe,
                       ["no candidate could be timed; the lean U-Net was chosen without a probe"])
    chosen, best, cfg, batch = measured[picked.index]
    precision, channels_last = Precision(best.precision), dims == 3
    if precision != Precision.FP32:
        same, gap, _, _ = same_loss_curve(task, cfg, batch, request.device, precision, channels_last)
        probe.append(ProbeResult(f"{chosen[3]}: {precision} vs fp32 loss curve", str(precision), channels_last,
                                 None, None, note=f"{CURVE_STEPS_NOTE}: worst gap {gap:.2%} -> "
                                 + ("same curve, kept" if same else "differs, fp32 used")))
        if not same:
            precision = Precision.FP32
            best = next((r for r in probe if r.name == chosen[3] and r.precision == "fp32" and r.seconds_per_step),
                        best)
    if dims == 3 and clock.left > 5:  # channels-last is the default for 3D; check it is not slower here
        plain = time_steps(task, cfg, batch, request.device, precision, False, chosen[3], clock)
        probe.append(plain)
        if plain.seconds_per_step is not None and not crowded(plain) and \
                plain.seconds_per_step < CLEARLY_FASTER * (best.seconds_per_step or math.inf):
            channels_last, best = False, plain
    return _Choice(chosen, precision, channels_last, best.seconds_per_step, probe, crowded_probe_notes(probe),
                   _richer_alternative(measured, picked, step_budget, precision, probe))


def _richer_alternative(measured: list[tuple[Candidate, ProbeResult, Any, Any]], picked: Any, step_budget: float,
                        precision: Precision, probe: list[ProbeResult]) -> tuple[Candidate, Precision, float] | None:
    """The next richer candidate than the pick, at the pick's precision (fp32 when it was not timed at
    it), when it still gets :data:`RICHER_RACE_FLOOR` of the steps goal into the budget."""
    if picked.index == 0 or not picked.reaches_goal:  # nothing richer, or nothing reaches the goal anyway
        return None
    candidate = measured[picked.index - 1][0]
    timed = {r.precision: r.seconds_per_step for r in probe if r.name == candidate[3] and r.seconds_per_step}
    used = precision if str(precision) in timed else Precision.FP32
    seconds = timed.get(str(used))
    if not seconds or step_budget / seconds < RICHER_RACE_FLOOR * MIN_ITERATIONS:
        return None
    return candidate, used, seconds


def _time_candidates(task: Any, request: PlanRequest, fp: Fingerprint, base: dict[str, Any],
                     candidates: list[Candidate], batch_size: int, step_budget: float, clock: ProbeClock,
                     probe: list[ProbeResult]) -> list[tuple[Candidate, ProbeResult, Any, Any]]:
    """Each candidate's step time at fp32 and at each reduced precision (the fastest kept), richest first."""
    dims, channels, classes = fp.spatial_dims, len(fp.channel_names), len(request.labels)
    measured: list[tuple[Candidate, ProbeResult, Any, Any]] = []
    # cheapest first: once a candidate cannot fit the goal into the budget, the richer (slower) ones cannot
    # either, and the probe's 60 s are not spent timing them
    for candidate in reversed(candidates):
        family, topology, width, label = candidate
        if measured and step_budget / (measured[-1][1].seconds_per_step or math.inf) < MIN_ITERATIONS:
            probe.append(ProbeResult(label, "-", dims == 3, None, None,
                                     note="not timed: a cheaper candidate already misses the goal"))
            continue
        cfg = _validated(task, base, family, topology, width, dims)
        batch = _synthetic_batch(topology.patch, channels, classes, batch_size)
        best = time_steps(task, cfg, batch, request.device, Precision.FP32, dims == 3, label, clock)
        probe.append(best)
        for reduced in reduced_precisions(request.device):
            timed = time_steps(task, cfg, batch, request.device, reduced, dims == 3, label, clock)
            probe.append(timed)
            if timed.seconds_per_step is not None and not crowded(timed) and not crowded(best) and (
                    best.seconds_per_step is None or timed.seconds_per_step < CLEARLY_FASTER * best.seconds_per_step):
                best = timed
        if best.seconds_per_step is not None:
            measured.append((candidate, best, cfg, batch))
    measured.reverse()  # richest first again, as the budget rule reads them
    return measured


def _thread_notes(device: torch.device) -> list[str]:
    if device.type != "cpu":
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [f"threads: all {cores} cores in one process (processes on one CPU would split the same cores; "
            "benchmarks/results/ddp.md)"]


def _assemble(request: PlanRequest, fp: Fingerprint, config: dict[str, Any], d: _Decisions, notes: list[str]) -> Plan:
    """The config's sections, the structure rules (regions, rare classes, post-processing), and the reasons."""
    family, topology, width, _ = d.choice.candidate
    why: dict[str, str] = {}
    structures = decide_structures(fp, request.labels)
    config["patch"] = _patch_section(fp, topology.patch, request.labels, why, structures.rare)
    if structures.regions:
        config["regions"] = structures.regions
    if structures.min_component_search:
        config["postprocess"] = {"search_min_component_size": structures.min_component_search}
    config["model"] = _network(family, topology, width, fp.spatial_dims)
    config["train"] = {"max_epochs": None, "max_minutes": request.budget_minutes, "batch_size": d.batch_size,
                       "val_interval": max(1, round((d.epochs or 200) / 25)), "device": "auto",
                       "precision": str(d.choice.precision), "channels_last": d.choice.channels_last}
    config["augment"], why["augment"] = _augmentation(fp.spatial_dims, request.budget_minutes,
                                                      d.spacing_rule.anisotropic_axis, rules.is_ct(fp.channels[0].name))
    why.update(_reasons(request, fp, config, d))
    why.update(structures.why)
    scoring = decide_scoring(fp, d.spacing, topology.patch, config["validation"]["overlap"], d.choice.step_seconds,
                             d.batch_size, request.budget_minutes)
    if scoring.tta is not None:
        config["validation"]["tta"] = scoring.tta
    why["validation.tta"] = scoring.why
    explain = [*_explain_rows(request, config, d, why), *_predict_memory_rows(fp, config), *structures.explain,
               ExplainRow("scoring val/test", "mirrored (TTA)" if scoring.tta is None else "once per case",
                          "mirrored (TTA)", scoring.why)]
    candidates = combine_candidates(structures.candidates, _topology_candidates(request, fp, d),
                                    request.budget_minutes * RACE_SHARE)
    return Plan(request=request, config=config, why=why, fingerprint=fp, probe=[p.as_dict() for p in d.choice.probe],
                explain_rows=explain, notes=notes, candidates=candidates, steps_in_budget=d.iterations,
                step_goal=MIN_ITERATIONS)


def _topology_candidates(request: PlanRequest, fp: Fingerprint, d: _Decisions) -> list[RaceCandidate]:
    """The rules' network and patch against the next richer one the probe found near the steps goal
    and, on thick-slice scans, against nnU-Net's 2D configuration."""
    training = fp.training_cases()
    alternatives = [c for c in (_richer_candidate(request, d, fp.spatial_dims),
                                slice_candidate(d.spacing, [c.shape for c in training], [c.spacing for c in training],
                                                d.spacing_rule.anisotropic_axis)) if c is not None]
    if not alternatives:
        return []
    picked_steps = f"~{d.iterations:,} steps" if d.iterations else "the rules' pick"
    return [RaceCandidate(_candidate_name(d.choice.candidate),
                          f"{d.choice.candidate[3]} ({picked_steps}: the richest that fits {MIN_ITERATIONS:,})"),
            *alternatives]


def _richer_candidate(request: PlanRequest, d: _Decisions, dims: int) -> RaceCandidate | None:
    if d.choice.richer is None:
        return None
    richer, precision, seconds = d.choice.richer
    family, topology, width, label = richer
    steps = int(request.budget_minutes * 60 * STEP_SHARE / seconds)
    return RaceCandidate(_candidate_name(richer), f"{label} (~{steps:,} steps at {precision})",
                         {"model": _network(family, topology, width, dims), "patch.size": topology.patch,
                          "train.precision": str(precision)},
                         {"model": f"{label}: {_network(family, topology, width, dims)['name']} - it beat the rules' "
                                   f"choice ({d.choice.candidate[3]}) on the held-out fold",
                          "train.precision": f"{precision}: probe: {seconds:.3f} s/step, ~{steps:,} steps in the "
                                             "budget"})


def _candidate_name(candidate: Candidate) -> str:
    """A short, path-safe name for a race run: ``unet16-28x40x28``."""
    family, topology, width, _ = candidate
    return f"{family}{width}-{'x'.join(str(p) for p in topology.patch)}"


def _reasons(request: PlanRequest, fp: Fingerprint, config: dict[str, Any], d: _Decisions) -> dict[str, str]:
    """Why each config entry is what it is (``medseg plan --explain`` and the run's logged plan)."""
    family, topology, width, label = d.choice.candidate
    dims, model, iterations = fp.spatial_dims, config["model"], d.iterations
    orientations = sorted({c.orientation for c in fp.cases if c.orientation})
    step_note = f"probe: {d.choice.step_seconds:.3f} s/step" if d.choice.step_seconds else \
        "not probed (auto: fp16 autocast on a GPU, fp32 on a CPU)"
    return {
        "preprocess.spacing": (d.spacing_rule.reason + (f": every case is already at {d.spacing}, so no resampling"
                                                        if d.all_there else "")),
        "preprocess.orientation": "3D volumes are trained in RAS (read as " + (", ".join(orientations) or "?") + ")"
        if dims == 3 else "2D images: no orientation",
        "preprocess.intensity": d.norm.reason,
        "preprocess.crop_foreground": "crop to nonzero: it removes more than a quarter (nnU-Net)"
        if d.norm.crop_foreground else f"cropping to nonzero keeps {fp.median_crop_ratio():.0%} of the image: not worth it",
        "model": f"{label}: {model['name']} - " + (
            f"the richest candidate that fits {MIN_ITERATIONS:,} steps into the budget" if iterations and
            iterations >= MIN_ITERATIONS else "the most steps of the candidates (none fits "
            f"{MIN_ITERATIONS:,})" if iterations else "rules only (no probe)"),
        "model.channels": f"{width} base features doubling per stage (nnU-Net: 32, capped at "
                          f"{rules.NNUNET_MAX_FEATURES[dims]})",
        "model.strides": f"nnU-Net pooling: {topology.pools_per_axis} pools per axis (an axis pools while >= 8 voxels "
                         "and within 2x of the finest spacing)",
        "model.kernels": "3 where the spacing is within 2x of the finest, else 1 (in-plane first)",
        "train.max_minutes": "--budget",
        "train.max_epochs": "no epoch cap: the budget alone ends training (its last validation foreseen) and the LR schedule follows the clock",
        "train.batch_size": "nnU-Net's minimum; on a CPU a bigger batch costs proportionally more time"
        if d.batch_size == BATCH_SIZE else "nnU-Net's batch: a GPU step costs little more for it",
        "train.precision": (f"{d.choice.precision}: " + step_note + (f", ~{iterations:,} steps in the budget"
                                                                     if iterations else "")),
        "train.channels_last": "probe: channels-last " + ("was not slower" if d.choice.channels_last else "was slower here")
        if dims == 3 and request.probe else "2D network" if dims == 2 else "3D default",
        "train.val_interval": f"about 25 validations over ~{d.epochs or '?'} epochs",
        **_FIXED_REASONS,
        "model.num_res_units": "one residual unit per level" if family == "unet" else "nnU-Net: two plain convolutions",
    }


#: Reasons for the entries every segmentation plan sets the same way.
_FIXED_REASONS = {
    "validation.overlap": "nnU-Net's sliding-window overlap, Gaussian-weighted",
    "validation.sw_batch_size": "windows per forward pass at validation and predict",
    "model.norm": "instance norm (nnU-Net): batch 2 is too small for batch statistics",
    "data.cache": "preprocessed volumes kept in memory (the dataset is read once)",
    "data.fingerprint": "what this plan was made from (logged with the run)",
    "data.channels": "from the dataset's description (dataset.json / the layout)",
    "data.labels": "from the dataset's description, consecutive from 0",
    "loss": "Dice + cross-entropy (nnU-Net)",
    "optim": "AdamW with a cosine schedule: converges in the few thousand steps a budget buys "
             "(nnU-Net's SGD + poly schedule is tuned for 250,000)",
}


def _explain_rows(request: PlanRequest, config: dict[str, Any], d: _Decisions, why: dict[str, str]) -> list[ExplainRow]:
    """medseg's choice beside nnU-Net's default, row by row (``medseg plan --explain``)."""
    topology, label = d.choice.candidate[1], d.choice.candidate[3]
    model, nnunet, norm = config["model"], d.nnunet, d.norm
    normalised = str(norm.intensity["mode"]) + (" nonzero" if norm.intensity.get("nonzero") else "")
    return [
        ExplainRow("target spacing", str(d.spacing), str([round(s, 4) for s in nnunet.spacing]), d.spacing_rule.reason),
        ExplainRow("patch", str(topology.patch), str(nnunet.patch),
                   "nnU-Net's patch, below the median image" + (
                       "" if topology is d.full else f", scaled down for the budget ({label})")),
        ExplainRow("batch", str(d.batch_size), str(nnunet.batch_size), why["train.batch_size"]),
        ExplainRow("pooling per axis", str(topology.pools_per_axis), str(nnunet.pools_per_axis), why["model.strides"]),
        ExplainRow("network", f"{model['name']} {model['channels']}", f"dynunet {nnunet.features}", why["model"]),
        ExplainRow("normalisation", normalised, normalised, norm.reason),
        ExplainRow("precision", str(d.choice.precision), "fp16 (GPU AMP)", why["train.precision"]),
        ExplainRow("training length", f"{request.budget_minutes:g} min (~{d.iterations or '?'} steps)",
                   "1000 epochs x 250 steps", "the budget"),
        ExplainRow("sampler", config["patch"]["sampler"], "1/3 of patches forced on foreground", why["patch.sampler"]),
    ]


def _predict_memory_rows(fp: Fingerprint, config: dict[str, Any]) -> list[ExplainRow]:
    """What predicting the dataset's largest scan needs for its class scores: slab by slab (medseg)
    beside the whole volume at once (nnU-Net keeps every class's logits of the scan)."""
    from medseg.io.preflight import human_bytes
    from medseg.tasks.segmentation.bounded import prediction_memory

    if not fp.cases or fp.spatial_dims != 3:
        return []
    largest = max(fp.cases, key=lambda c: math.prod(c.shape))
    contract = {"patch_size": config["patch"]["size"], "sliding_window": config["validation"],
                "spacing": config["preprocess"]["spacing"], "labels": config["data"]["labels"],
                "regions": config.get("regions")}
    need = prediction_memory(largest.shape, largest.spacing, contract)
    shape = "x".join(str(n) for n in largest.shape)
    return [ExplainRow("predict memory (scores)", f"{human_bytes(need.bounded_bytes)} slab by slab",
                       f"{human_bytes(need.full_bytes)} whole volume",
                       f"the largest scan ({shape}); estimated, beside reading it; "
                       "medseg.tasks.segmentation.bounded.prediction_memory gives it for any size")]


CURVE_STEPS_NOTE = "8 steps from one initialisation"


def _validated(task: Any, base: dict[str, Any], family: str, topology: rules.Topology, width: int, dims: int) -> Any:
    raw = with_overrides(base, {"model": _network(family, topology, width, dims),
                                "patch": {"size": topology.patch}})
    return task.config_type.model_validate(raw)


def _patch_section(fp: Fingerprint, patch: list[int], labels: dict[int, str], why: dict[str, str],
                   rare_in_image: dict[int, str]) -> dict[str, Any]:
    planning = {c.value: c for c in fp.classes}
    labelled = max(1, sum(1 for c in fp.training_cases() if c.class_voxels))
    fractions = {v: (planning[v].voxel_fraction or 0.0) if v in planning else 0.0 for v in labels}
    presence = {v: (planning[v].cases_with / labelled) if v in planning else 0.0 for v in labels}
    absent = [v for v in labels if v != 0 and presence[v] == 0]
    rare = rules.rare_classes({v: f for v, f in fractions.items() if v not in absent},
                              {v: p for v, p in presence.items() if v not in absent})
    # rarity against the image too: classes that are all small are each rare, though none is rarer than the others
    rare = sorted(set(rare) | {v for v in rare_in_image if v in labels and v not in absent})
    why["patch.size"] = ("nnU-Net's patch (edges proportional to 1/spacing, clipped to the median shape, fitted to "
                         "its GPU reference, divisible by the pooling), kept below the median image so crops move")
    why["patch.samples_per_volume"] = "two patches per cached volume and visit"
    section: dict[str, Any] = {"size": patch, "samples_per_volume": 2}
    if rare:
        names = ", ".join(f"{labels[v]} ({fractions[v]:.3%} of voxels, in {presence[v]:.0%} of cases"
                          + (", small against the image" if v in rare_in_image else "") + ")" for v in rare)
        section["sampler"] = "per_class"
        why["patch.sampler"] = f"rare class(es) {names}: centre patches on every class equally often"
        if absent:
            section["class_ratios"] = [0.0 if v in absent else 1.0 for v in sorted(labels)]
            why["patch.class_ratios"] = ("no training case holds " + ", ".join(labels[v] for v in absent)
                                         + ": no patch is centred on them")
    else:
        section["sampler"] = "pos_neg"
        section["pos_fraction"] = 0.67
        why["patch.sampler"] = "no rare class: two thirds of the patches centred on foreground"
        why["patch.pos_fraction"] = "small structures in a large background"
    return section


def _base_config(request: PlanRequest, fp: Fingerprint, spacing: list[float] | None,
                 norm: rules.NormalisationDecision, dims: int) -> dict[str, Any]:
    return {
        "task": "segmentation",
        "seed": 0,
        "output_dir": f"runs/{request.name}",
        "data": {"manifest": str(request.manifest), "root": str(request.root), "labels": dict(request.labels),
                 "channels": list(fp.channel_names), "cache": "memory",
                 "fingerprint": _fingerprint_path(fp) if fp.manifest else None},
        "preprocess": {"orientation": "RAS" if dims == 3 else None, "spacing": spacing,
                       "intensity": dict(norm.intensity), "crop_foreground": norm.crop_foreground},
        "loss": {"name": "dice_ce"},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.00001, "schedule": "cosine", "warmup_fraction": 0.02},
        "validation": {"overlap": 0.5, "sw_batch_size": 4, "blend": "gaussian", "hd95": True, "overlays": 4},
        "tracking": {"uri": "sqlite:///runs/mlflow.db", "experiment": request.name},
    }


def _fingerprint_path(fp: Fingerprint) -> str:
    from pathlib import Path

    from medseg.planning.fingerprint import fingerprint_cache_path

    return str(fingerprint_cache_path(Path(fp.manifest)))
