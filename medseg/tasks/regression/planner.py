"""Plan a regression config from a fingerprint and a time budget (``medseg plan --task regression``).

Rules only, no probe. What the data decide: the targets (the manifest's ``target*`` columns), the
input (every case padded at its own voxel size when the grid is shared and the sizes are close, so a
size or volume stays readable; else resized to the median size), the intensity normalisation
(nnU-Net's rule by channel name) and the flips (left-right only; no scaling, which would change a
size without changing its target). What the budget decides: training runs until it is spent.
"""

from __future__ import annotations

import csv
import math
from typing import Any

import numpy as np

from medseg.data.targets import TARGET_PREFIX
from medseg.errors import UsageError
from medseg.planning import rules
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import ExplainRow, Plan, PlanRequest

#: Padding is kept while no case is more than this times the median along an axis.
MAX_SIZE_SPREAD = 1.5
#: ... and while the padded input stays below these voxels (3D) / pixels (2D).
MAX_INPUT_VOXELS = {3: 128**3, 2: 512**2}


def target_columns(request: PlanRequest) -> list[str]:
    """The manifest's ``target*`` columns.

    Raises:
        UsageError: it has none (with how to add them).
    """
    with open(request.manifest, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    columns = [c for c in header if c.startswith(TARGET_PREFIX)]
    if not columns:
        raise UsageError(f"{request.manifest}: no regression targets to plan for. Expected: columns named "
                         f"{TARGET_PREFIX} or {TARGET_PREFIX}_<name>. Got: {header}. Add them, or write the config "
                         "by hand with data.targets.file (see docs/how-to/regression.md; `medseg manifest volumes` "
                         "measures structure volumes)")
    return columns


def input_fit(fp: Fingerprint) -> tuple[list[int], str, str]:
    """The input size, how images reach it, and why."""
    shapes = np.asarray([c.shape for c in fp.training_cases()], dtype=float)
    spacings = np.asarray([c.spacing for c in fp.training_cases()], dtype=float)
    median = np.median(shapes, axis=0)
    shared_grid = bool(np.allclose(spacings, spacings[0], rtol=0.01))
    padded = [int(8 * math.ceil(s / 8)) for s in shapes.max(axis=0)]
    if shared_grid and (shapes.max(axis=0) <= MAX_SIZE_SPREAD * median).all() \
            and math.prod(padded) <= MAX_INPUT_VOXELS[fp.spatial_dims]:
        return padded, "pad_or_crop", ("one voxel grid and close sizes: padded to the largest case (rounded up to "
                                       "8) at its own voxel size, so sizes and volumes stay readable")
    size = [int(round(s)) for s in median]
    return size, "resize", "median image size (the grids or sizes differ too much to pad)"


def plan(task: Any, request: PlanRequest, fp: Fingerprint) -> Plan:
    """The regression plan (see the module docstring)."""
    dims = fp.spatial_dims
    columns = target_columns(request)
    size, fit, fit_why = input_fit(fp)
    stats = fp.channels[0]
    ratios = [c.crop_ratio for c in fp.training_cases()]
    norm = rules.normalisation(stats.name, stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std,
                               float(np.median(ratios)) if ratios else 1.0)
    n_train = sum(1 for c in fp.cases if c.split == "train")
    batch = int(2 ** math.floor(math.log2(max(2, min(64 if dims == 2 else 8, n_train // 8)))))
    stem = "small" if max(size) <= 64 and dims == 2 else "strided" if max(size) <= 160 else "imagenet"
    width = 0.25 if dims == 3 else 0.5
    config: dict[str, Any] = {
        "task": "regression", "seed": 0, "output_dir": f"runs/{request.name}",
        "data": {"manifest": str(request.manifest), "root": str(request.root), "channels": list(fp.channel_names),
                 "cache": "memory", "targets": {"columns": columns, "normalisation": "zscore"}},
        "preprocess": {"orientation": "RAS" if dims == 3 else None, "intensity": norm.intensity,
                       "crop_foreground": norm.crop_foreground, "size": size, "fit": fit},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0]}, {"name": "contrast", "prob": 0.3, "scale": 0.15,
                                                                 "shift": 0.05}],
        "model": {"name": "resnet18", "spatial_dims": dims, "widen_factor": width,
                  "stem": stem, "norm": "batch"},
        "loss": {"name": "huber"},
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001, "schedule": "cosine", "warmup_fraction": 0.05},
        "train": {"max_epochs": None, "max_minutes": request.budget_minutes, "batch_size": batch, "val_interval": 2},
        "tracking": {"uri": "sqlite:///runs/mlflow.db", "experiment": request.name},
    }
    why = {
        "data.targets": f"the manifest's {TARGET_PREFIX}* columns, z-scored with the training split's statistics",
        "preprocess.size": fit_why, "preprocess.intensity": norm.reason,
        "augment": "left-right flips and contrast only: scaling would change a size without changing its target",
        "model": "ResNet-18 with one linear output per target" + (", a quarter wide (3D)" if dims == 3 else ""),
        "loss": "Huber: L2 near the target, L1 for outlying cases",
        "train.max_epochs": "no epoch cap: the budget alone ends training", "train.max_minutes": "--budget",
        "train.batch_size": f"{'64 images' if dims == 2 else '8 volumes'} a step, at least 8 steps an epoch",
    }
    explain = [ExplainRow("targets", ", ".join(columns), "n/a (segmentation only)", why["data.targets"]),
               ExplainRow("input size", f"{size} ({fit})", "n/a", fit_why),
               ExplainRow("network", f"resnet18 x{width}, {stem} stem", "n/a", why["model"])]
    return Plan(request=request, config=config, why=why, fingerprint=fp, explain_rows=explain,
                notes=["regression plans from rules alone (no probe): check train.batch_size fits your device"])
