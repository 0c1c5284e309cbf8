"""A plan's pretraining stage: the ``task: pretraining`` config of the planned network, and the budget
split between it and the fine-tuning (:mod:`medseg.planning.pretraining_budget` decides the split).

The pretraining config is built from the plan itself, so that every tensor of the pretrained encoder
matches the fine-tuning network: the same model section, patch size, channels and preprocessing. The
plan keeps it in :attr:`medseg.planning.plan.Plan.pretraining`; writing the plan writes it beside the
fine-tuning config, whose ``pretrain`` key names it (``medseg run`` pretrains first, then starts the
fine-tuning from the weights through ``model.init_from``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from medseg.planning.plan import ExplainRow, Plan
from medseg.planning.pretraining_budget import PretrainingDecision, choose_pretraining

#: The masked-autoencoder block edge in voxels (the pretraining default), cut to the patch.
MASK_BLOCK = 8


def pretraining_config(plan: Plan, manifest: Path, minutes: float) -> dict[str, Any]:
    """The ``task: pretraining`` config that pretrains the plan's network on every image of ``manifest``."""
    config = plan.config
    patch = list(config["patch"]["size"])
    train = {key: config["train"][key] for key in ("batch_size", "device", "precision", "channels_last")
             if key in config["train"]}
    return {"task": "pretraining", "seed": config.get("seed", 0),
            "output_dir": str(Path(config["output_dir"]) / "pretraining"),
            "data": {"manifest": str(manifest), "root": str(manifest.parent),
                     "channels": list(config["data"]["channels"]), "cache": config["data"].get("cache", "memory")},
            "preprocess": copy.deepcopy(config["preprocess"]),
            "patch": {"size": patch, "samples_per_volume": config["patch"].get("samples_per_volume", 2)},
            "masking": {"block": [min(MASK_BLOCK, p) for p in patch]},
            "model": copy.deepcopy(config["model"]),
            "train": {"max_epochs": None, "max_minutes": minutes, **train},
            "tracking": copy.deepcopy(config["tracking"])}


def budget_pretraining(plan: Plan, manifest: Path, unlabelled: int, labelled: int) -> PretrainingDecision:
    """Decide whether the plan pretrains on ``manifest`` (every image: the unlabelled scans and the
    labelled training cases) and, if so, give it its share of the budget and the fine-tuning the rest.

    The race (:mod:`medseg.planning.race`) is dropped when pretraining is taken: its winner would start
    from its own race run instead of the pretrained weights, and both would spend the same surplus.
    """
    members = plan.ensemble_folds or 1
    decision = choose_pretraining(unlabelled, labelled, plan.steps_in_budget, plan.step_goal, members)
    budget = plan.request.budget_minutes
    if not decision.pretrains:
        plan.explain_rows.insert(0, ExplainRow("pretraining", "none", "none (nnU-Net trains from scratch)",
                                               decision.why))
        plan.notes.append(decision.why)
        return decision
    pretrain_minutes = round(decision.share * budget, 2)
    plan.pretraining = pretraining_config(plan, manifest, pretrain_minutes)
    plan.pretraining_why = {
        "train.max_minutes": decision.why,
        "data.manifest": f"every image: {unlabelled} unlabelled scan(s) and the {labelled} labelled training case(s) "
                         "(test images left out, so the test scores stay those of unseen scans)",
        "model": "the fine-tuning network's model section, so that every pretrained tensor matches it"}
    plan.set_budget(budget - pretrain_minutes)
    plan.why["train.max_minutes"] = (f"{budget - pretrain_minutes:g} min of the {budget:g}-minute budget: the rest "
                                     f"pretrains first ({pretrain_minutes:g} min)"
                                     + (f", shared by the {members} fold members" if members > 1 else ""))
    plan.why["pretrain"] = ("run first by `medseg run`; its weights start this run (model.init_from): "
                            + decision.why)
    if plan.candidates:
        plan.notes.append("no race: the budget's surplus goes to pretraining, and a race's winner would start from "
                          "its race run instead of the pretrained weights")
        plan.candidates = []
    for row in plan.explain_rows:
        if row.setting == "training length":
            row.medseg = f"{budget - pretrain_minutes:g} min after {pretrain_minutes:g} min of pretraining"
    plan.explain_rows.insert(0, ExplainRow("pretraining", f"{pretrain_minutes:g} of {budget:g} min",
                                           "none (nnU-Net trains from scratch)", decision.why))
    plan.notes.append(decision.why)
    return decision
