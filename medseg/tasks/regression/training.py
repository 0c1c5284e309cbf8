"""Regression stages' pieces: the targets attached to the records (normalised by the training
split's statistics), validation, the evaluate stage's per-case predictions and Bland-Altman
plots, and the contract that carries the normalisation.

The loop itself (budgets, checkpoints, exact resume, DDP) is :func:`medseg.engine.loop.fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn
from tqdm import tqdm

from medseg.data.manifest import read_manifest
from medseg.data.targets import TargetTable, read_targets
from medseg.engine import distributed
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.loop import Validator, base_contract, split_cases
from medseg.engine.runtime import autocast
from medseg.plots import bland_altman_plot
from medseg.tasks.regression.config import RegressionConfig
from medseg.tasks.regression.metrics import regression_scores
from medseg.tasks.regression.normalisation import TargetNormaliser

log = logging.getLogger(__name__)


def target_table(cfg: RegressionConfig) -> TargetTable:
    """The config's targets: ``data.targets.file``, or the manifest's own target columns."""
    targets = cfg.data.targets
    return read_targets(targets.file or cfg.data.manifest, targets.columns)


def fit_normaliser(cfg: RegressionConfig, manifest: Path, table: TargetTable | None = None) -> TargetNormaliser:
    """The normalisation fitted on the training split's targets (every training case must have them).

    Raises:
        ManifestError: a training case without targets, or a bad target cell.
    """
    table = table or target_table(cfg)
    train = split_cases(cfg, read_manifest(manifest), "train")
    targets = cfg.data.targets
    return TargetNormaliser.fit(table.array([c.case_id for c in train]), targets.columns, str(targets.normalisation),
                                targets.ordinal, targets.units)


def with_targets(items: Sequence[dict[str, Any]], table: TargetTable, normaliser: TargetNormaliser,
                 require: bool = True) -> list[dict[str, Any]]:
    """``items`` with ``label``: their normalised targets (float32, one per column).

    Args:
        require: every item must have targets (training, validation); False drops those without
            (an evaluated split may hold unmeasured cases).
    """
    kept = list(items) if require else [item for item in items if item["case_id"] in table.values]
    values = normaliser.normalise(table.array([item["case_id"] for item in kept]))
    return [{**item, "label": values[k]} for k, item in enumerate(kept)]


@torch.no_grad()
def predict_dataset(network: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                    batch_size: int = 64, progress: bool = False,
                    desc: str = "predict") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Case ids, normalised outputs and normalised targets ``(cases, targets)`` of every item."""
    was_training = network.training
    network.eval()
    case_ids: list[str] = []
    outputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            with autocast(amp_dtype, device):
                out = network(batch["image"].to(device))
            case_ids.extend(batch["case_id"])
            outputs.append(out.float().cpu().numpy())
            labels.append(torch.as_tensor(batch["label"]).float().cpu().numpy())
    finally:
        network.train(was_training)
    width = len(outputs[0][0]) if outputs else 0
    return case_ids, np.concatenate(outputs).reshape(-1, width), np.concatenate(labels).reshape(-1, width)


def _gathered(case_ids: list[str], outputs: np.ndarray, labels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every process's share of a split, sorted by case id (every process gets the same)."""
    parts = [p for p in distributed.current().gather((case_ids, outputs, labels)) if p[0]]
    if not parts:
        return [], outputs, labels
    ids = [c for p in parts for c in p[0]]
    order = np.argsort(ids, kind="stable")
    return [ids[i] for i in order], np.concatenate([p[1] for p in parts])[order], \
        np.concatenate([p[2] for p in parts])[order]


def validation(cfg: RegressionConfig, normaliser: TargetNormaliser) -> tuple[Validator, None]:
    """MAE, RMSE, R²... of the validation split in the targets' units, over every process's share."""
    batch = max(cfg.train.batch_size, 32)

    def validate(network: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> dict[str, float]:
        _, outputs, labels = _gathered(*predict_dataset(network, dataset, device, amp_dtype, batch, show, "val"))
        return regression_scores(normaliser.denormalise(outputs), normaliser.denormalise(labels), normaliser, "val")

    return validate, None


def per_case_rows(case_ids: Sequence[str], predicted: np.ndarray, true: np.ndarray,
                  columns: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``<split>_cases.csv``: per target its true and predicted value and the error."""
    fields = ["case_id", *(f"{kind}_{c}" for c in columns for kind in ("true", "predicted", "error"))]
    rows = []
    for i, case_id in enumerate(case_ids):
        row: dict[str, Any] = {"case_id": case_id}
        for j, column in enumerate(columns):
            row.update({f"true_{column}": f"{true[i, j]:.6g}", f"predicted_{column}": f"{predicted[i, j]:.6g}",
                        f"error_{column}": f"{predicted[i, j] - true[i, j]:.6g}"})
        rows.append(row)
    return fields, rows


def score_split(normaliser: TargetNormaliser, ev: Evaluator) -> SplitScores:
    """A checkpoint scored on a split: the metrics, a per-case row each and a Bland-Altman plot per target."""
    case_ids, outputs, labels = predict_dataset(ev.network, ev.dataset, ev.device, ev.amp_dtype,
                                                progress=ev.progress, desc=f"evaluate {ev.split}")
    predicted, true = normaliser.denormalise(outputs), normaliser.denormalise(labels)
    metrics = regression_scores(predicted, true, normaliser, ev.prefix)
    fields, rows = per_case_rows(case_ids, predicted, true, normaliser.columns)
    units = f" ({normaliser.units})" if normaliser.units else ""
    figures = [bland_altman_plot(true[:, j], predicted[:, j], ev.out_dir / "plots" / f"bland_altman_{ev.split}_{c}.png",
                                 f"{c}, {ev.split}: MAE {metrics[f'{ev.prefix}/mae/{c}']:.3g}{units}, "
                                 f"R² {metrics[f'{ev.prefix}/r2/{c}']:.3f}", units.strip(" ()"))
               for j, c in enumerate(normaliser.columns)] if len(true) else []
    return SplitScores(metrics, fields, rows, figures)


def model_contract(cfg: RegressionConfig) -> dict[str, Any]:
    """What inference needs to see images as training did (the targets' statistics are added at packaging)."""
    return {
        **base_contract(cfg),
        "size": list(cfg.preprocess.size),
        "fit": str(cfg.preprocess.fit),
        "output_activation": "identity",
        "target_columns": list(cfg.data.targets.columns),
        "model": cfg.model.model_dump(mode="json"),
    }
