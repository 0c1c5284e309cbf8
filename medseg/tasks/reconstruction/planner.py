"""Plan a reconstruction config from a fingerprint and a time budget (``medseg plan``).

What the data decide: the slice axis (the coarsest-spacing axis: slices are taken across the
thick direction, so each slice is a full-resolution image) and the slice size (the largest
in-plane size of the training volumes, rounded up to what the U-Net's pooling divides: every
slice fits, zero-padded and centred). What the budget decides: the U-Net's width (32 base
features from :data:`FULL_WIDTH_MINUTES` minutes on, else 16). The acquisition to simulate
(``recon.problem``: mri, ct, denoise) is the user's question, not the data's; MRI 4x is planned and
the comment says how to change it. Not probed: a reconstruction step's cost depends on the
simulated acquisition, which the planner does not choose.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import ExplainRow, Plan, PlanRequest

LEVELS = 4  # U-Net levels: three poolings, so slices are padded to a multiple of 8
FULL_WIDTH_MINUTES = 20.0


def plan(task: Any, request: PlanRequest, fp: Fingerprint) -> Plan:
    """The reconstruction plan (see the module docstring)."""
    training = fp.training_cases()
    if fp.spatial_dims != 3:
        slice_axis = None
        in_plane = np.asarray([c.shape for c in training])
    else:
        spacing = np.median([c.spacing for c in training], axis=0)
        slice_axis = int(np.argmax(spacing)) if spacing.max() > 1.5 * spacing.min() else 2
        in_plane = np.asarray([[s for a, s in enumerate(c.shape) if a != slice_axis] for c in training])
    factor = 2 ** (LEVELS - 1)
    size = [int(math.ceil(v / factor) * factor) for v in in_plane.max(axis=0)]
    base = 32 if request.budget_minutes >= FULL_WIDTH_MINUTES else 16
    recon: dict[str, Any] = {"problem": "mri", "image_size": size, "slices_per_volume": 4, "mask": "equispaced",
                             "acceleration": 4, "center_fraction": 0.08, "input": "complex"}
    if slice_axis is not None:
        recon["slice_axis"] = slice_axis
    config: dict[str, Any] = {
        "task": "reconstruction", "seed": 0, "output_dir": f"runs/{request.name}",
        "data": {"manifest": str(request.manifest), "root": str(request.root), "cache": "memory"},
        "preprocess": {"orientation": "RAS" if fp.spatial_dims == 3 else None, "spacing": None},
        "recon": recon,
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]}],
        "model": {"name": "unet_dc", "spatial_dims": 2, "channels": [base * 2**i for i in range(LEVELS)],
                  "strides": [2] * (LEVELS - 1), "num_res_units": 1, "norm": "instance"},
        "loss": {"name": "l1_ssim", "ssim_weight": 0.84},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.00001, "schedule": "cosine",
                  "warmup_fraction": 0.02},
        "train": {"max_epochs": None, "max_minutes": request.budget_minutes, "batch_size": 4,
                  "iterations_per_epoch": 150, "val_interval": 1},
        "tracking": {"uri": "sqlite:///runs/mlflow.db", "experiment": request.name},
    }
    why = {
        "recon.problem": "the acquisition to simulate is your choice: mri (k-space undersampling), ct (sparse views) "
                         "or denoise; MRI 4x planned",
        "recon.image_size": f"the largest in-plane size of the training volumes, rounded up to a multiple of {factor}: "
                            "every slice fits",
        "recon.slice_axis": "the coarsest axis: each slice is a full-resolution image",
        "model.channels": f"{base} base features: " + ("a budget of 20 min or more" if base == 32 else
                                                       f"a budget under {FULL_WIDTH_MINUTES:g} min"),
        "train.max_minutes": "--budget",
        "train.max_epochs": "no epoch cap: the budget alone ends training (its last validation foreseen) and the LR schedule follows the clock",
    }
    explain = [ExplainRow("slice size", str(size), "n/a (segmentation only)", why["recon.image_size"]),
               ExplainRow("width", str(config["model"]["channels"]), "n/a", why["model.channels"])]
    return Plan(request=request, config=config, why=why, fingerprint=fp, explain_rows=explain,
                notes=["reconstruction plans are not probed (a step's cost depends on the simulated acquisition)"])
