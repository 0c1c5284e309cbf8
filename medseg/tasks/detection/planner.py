"""Plan a detection config from a fingerprint, the boxes and a time budget (``medseg plan --task detection``).

Rules only, no probe. What the data decide: the spacing (the training cases' median when their grids
differ), the first convolution's stride (1 along a thick-slice axis), the intensity normalisation
(nnU-Net's rule by channel name), and from the distribution of the training cases' box sizes (their
label maps' connected components, on the planned grid) the anchors and the patch. What the budget
decides: training runs until it is spent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.errors import UsageError
from medseg.planning import rules
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import ExplainRow, Plan, PlanRequest

#: Box-size percentiles the three anchor shapes of the finest level sit at; the two coarser levels
#: double and quadruple them, so together they span the 10th percentile to about 4x the median.
ANCHOR_PERCENTILES = (10, 30, 50)
#: The patch holds at least this many times the 90th-percentile box on every axis.
PATCH_BOX_MARGIN = 2.0
#: A slice this many times thicker than the in-plane spacing is not strided by the first convolution.
THICK_SLICE_RATIO = 2.0


def box_sizes(request: PlanRequest, spacing: Sequence[float] | None) -> np.ndarray:
    """``(N, dims)`` sizes in voxels of the planned grid (RAS axis order in 3D) of every component of
    every foreground label of the training and validation cases.

    Raises:
        UsageError: no training case has a component.
    """
    from monai.transforms import Orientation, Spacing

    from medseg.data.manifest import read_manifest
    from medseg.io.readers import load_volume
    from medseg.tasks.detection.boxes import boxes_from_label

    sizes = []
    for case in read_manifest(request.manifest).cases:
        path = case.label_path(request.root)
        if case.split == "test" or path is None:
            continue
        label: Any = load_volume(path)
        if label.ndim == 4:
            label = Orientation(axcodes="RAS")(label)
        if spacing is not None:
            label = Spacing(pixdim=list(spacing), mode="nearest")(label)
        boxes = boxes_from_label(np.rint(np.asarray(label[0])), 1.0, 0.0, source=str(case.label))
        sizes.extend(boxes.corners[:, boxes.dims:] - boxes.corners[:, :boxes.dims])
    if not sizes:
        raise UsageError(f"{request.manifest}: no boxes to plan detection for. Expected label maps with at least one "
                         "connected component in the training cases. Got none. Check the label column, or write the "
                         "config by hand with data.boxes.file (see docs/how-to/detection.md)")
    return np.asarray(sizes, dtype=float)


def _divisor(stride: Sequence[int]) -> list[int]:
    return [s * 2 * 2**2 for s in stride]  # stem, max pool, layers 1-2 and the pooled level (returned [1, 2])


def patch_size(sizes: np.ndarray, median_shape: Sequence[float], divisor: Sequence[int]) -> list[int]:
    """Twice the 90th-percentile box on every axis, rounded up to the divisor, within the median scan."""
    wanted = PATCH_BOX_MARGIN * np.percentile(sizes, 90, axis=0)
    out = []
    for want, shape, d in zip(wanted, median_shape, divisor):
        cap = max(d, int(shape // d) * d)
        out.append(int(min(cap, max(2 * d, d * math.ceil(want / d)))))
    return out


def plan(task: Any, request: PlanRequest, fp: Fingerprint) -> Plan:
    """The detection plan (see the module docstring)."""
    dims = fp.spatial_dims
    spacings = np.asarray([c.spacing for c in fp.training_cases()], dtype=float)
    shared = bool(np.allclose(spacings, spacings[0], rtol=0.01))
    spacing = None if shared else [round(s, 3) for s in fp.median_spacing()]
    grid = spacings[0] if shared else np.asarray(spacing)
    stride = [2] * dims
    if dims == 3 and grid[2] >= THICK_SLICE_RATIO * min(grid[:2]):
        stride[2] = 1
    sizes = box_sizes(request, spacing)
    anchors = [[round(float(v), 1) for v in np.maximum(np.percentile(sizes, p, axis=0), 1.0)]
               for p in ANCHOR_PERCENTILES]
    patch = patch_size(sizes, fp.median_shape(), _divisor(stride))
    stats = fp.channels[0]
    norm = rules.normalisation(stats.name, stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std,
                               fp.median_crop_ratio())
    labels = {int(k): v for k, v in request.labels.items()}
    config = _config(request, fp, dims, spacing, norm, patch, stride, anchors, labels)
    median = [round(float(v), 1) for v in np.median(sizes, axis=0)]
    why = {
        "preprocess.spacing": "every case on one grid: kept" if shared else "median spacing of the training cases",
        "preprocess.intensity": norm.reason,
        "model.stem_stride": "1 along the thick slices (no downsampling of the coarse axis)" if 1 in stride
        else "2 on every axis",
        "model.anchor_shapes": f"the {', '.join(map(str, ANCHOR_PERCENTILES))}th percentiles of {len(sizes)} "
                               f"training boxes (median {median} voxels); coarser levels double them",
        "patch.size": f"{PATCH_BOX_MARGIN:g}x the 90th-percentile box, a multiple of the network's divisor, within the "
                      "median scan",
        "train.max_minutes": "--budget", "train.max_epochs": "no epoch cap: the budget alone ends training",
    }
    explain = [ExplainRow("boxes", f"{len(sizes)}, median {median} voxels", "n/a (nnU-Net detects nothing)",
                          "connected components of the training label maps"),
               ExplainRow("anchors", str(anchors), "n/a", why["model.anchor_shapes"]),
               ExplainRow("patch", str(patch), "n/a", why["patch.size"])]
    return Plan(request=request, config=config, why=why, fingerprint=fp, explain_rows=explain,
                notes=["detection plans from rules alone (no probe): check train.batch_size fits your device"])


def _config(request: PlanRequest, fp: Fingerprint, dims: int, spacing: list[float] | None, norm: Any,
            patch: list[int], stride: list[int], anchors: list[list[float]], labels: dict[int, str]) -> dict[str, Any]:
    n_train = sum(1 for c in fp.cases if c.split == "train")
    return {
        "task": "detection", "seed": 0, "output_dir": f"runs/{request.name}",
        "data": {"manifest": str(request.manifest), "root": str(request.root), "channels": list(fp.channel_names),
                 "labels": labels, "cache": "memory"},
        "preprocess": {"orientation": "RAS" if dims == 3 else None, "spacing": spacing, "intensity": norm.intensity,
                       "crop_foreground": norm.crop_foreground},
        "augment": [{"name": "flip", "prob": 0.5}, {"name": "contrast", "prob": 0.2, "scale": 0.1, "shift": 0.05}],
        "patch": {"size": patch, "samples_per_volume": 2, "pos_fraction": 0.7},
        "model": {"name": "retinanet", "spatial_dims": dims, "stem_stride": stride, "anchor_shapes": anchors},
        "optim": {"name": "adamw", "lr": 0.001, "weight_decay": 0.00001, "schedule": "cosine", "warmup_fraction": 0.05},
        "train": {"max_epochs": None, "max_minutes": request.budget_minutes,
                  "batch_size": max(1, min(4 if dims == 3 else 16, n_train // 4)), "val_interval": 5},
        "tracking": {"uri": "sqlite:///runs/mlflow.db", "experiment": request.name},
    }
