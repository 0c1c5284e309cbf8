"""Classification stages: train (whole images, selection by validation AUC), evaluate (per-case
CSV, ROC, confusion matrix, calibration, t-SNE), package.

The loop itself (budgets, checkpoints, exact resume, DDP) is :func:`medseg.engine.loop.fit`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from medseg.data.datasets import class_index
from medseg.engine import distributed
from medseg.engine.calibration import calibrate_split, expected_calibration_error
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.image_networks import with_auxiliary_heads
from medseg.engine.loop import Previewer, Validator, base_contract
from medseg.engine.runtime import autocast
from medseg.io.atomic import atomic_write_text
from medseg.plots import confusion_matrix_plot, embedding_map, image_grid, reliability_diagram, roc_curves
from medseg.tasks.classification.config import ClassificationConfig
from medseg.tasks.classification.metrics import (
    ClassificationPredictions,
    balanced_class_weights,
    class_probabilities,
    classification_scores,
    confusion_counts,
    create_classification_loss,
    output_count,
)
from medseg.tasks.classification.networks import create_classifier, head_prefix
from medseg.tasks.classification.transfer import freeze, initialise_from
from medseg.tracking import MlflowTracker

log = logging.getLogger(__name__)

__all__ = ["SELECTION_METRIC", "build_classifier", "head_kind", "model_contract", "per_case_rows", "predict_dataset",
           "score_split", "training_loss", "validation"]

SELECTION_METRIC = "val/auc"


def head_kind(cfg: ClassificationConfig) -> str:
    """How logits become probabilities: ``softmax``, or ``ordinal`` for the cumulative-link head."""
    return "ordinal" if str(cfg.loss.name) == "ordinal" else "softmax"


def build_classifier(cfg: ClassificationConfig, pretrained: bool = False) -> nn.Module:
    """The configured network; with ``pretrained``, initialised from ``model.init_from`` and with
    ``model.freeze`` applied (training); without, a bare architecture to load a checkpoint into."""
    net = create_classifier(cfg.model, len(cfg.data.channels), output_count(cfg.loss, len(cfg.data.labels)),
                            cfg.preprocess.resize)
    if pretrained and cfg.model.init_from:
        initialise_from(net, cfg.model.init_from, cfg.tracking.uri)
    if pretrained and cfg.model.freeze:
        frozen = freeze(net, cfg.model.freeze)
        log.info("model.freeze %s: %d of %d parameter tensors fixed", cfg.model.freeze, len(frozen),
                 len(list(net.parameters())))
    return net


@torch.no_grad()
def predict_dataset(net: nn.Module, dataset: Any, head: str, device: torch.device, amp_dtype: torch.dtype | None,
                    batch_size: int = 256, features: bool = False, progress: bool = False,
                    desc: str = "predict", keep_logits: bool = False) -> ClassificationPredictions:
    """Class probabilities for every item of ``dataset`` (and the head's input features, and the
    logits, if asked)."""
    net.eval()
    out = ClassificationPredictions()
    if len(dataset) == 0:
        return out
    captured: list[torch.Tensor] = []
    hook = None
    if features:
        # the input of the last linear layer: the penultimate representation
        hook = net.get_submodule(head_prefix(net)).register_forward_hook(
            lambda _m, inputs, _o: captured.append(inputs[0].detach().float().flatten(1)))
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            image = batch["image"].to(device)
            with autocast(amp_dtype, device):
                logits = net(image)
            probs = class_probabilities(logits, head)
            out.add(batch["case_id"], batch["label"], probs, captured.pop() if features else None,
                    logits if keep_logits else None)
    finally:
        if hook is not None:
            hook.remove()
    return out


def _score(predictions: ClassificationPredictions, cfg: ClassificationConfig, prefix: str) -> dict[str, float]:
    return classification_scores(predictions.prob_array(), predictions.label_array(), cfg.data.labels,
                                 ordinal=cfg.data.ordinal, calibration_bins=cfg.validation.calibration_bins,
                                 prefix=prefix)


# ----------------------------------------------------------------------------------- training pieces


def training_loss(cfg: ClassificationConfig, train_cases: list, tracker: MlflowTracker) -> nn.Module:
    """The loss with ``loss.class_weights: balanced`` resolved from the training cases (and logged),
    and the auxiliary heads' losses added when the network has them (GoogLeNet's ``model.aux_classifiers``)."""
    weights = cfg.loss.class_weights
    if weights == "balanced":
        weights = balanced_class_weights([class_index(c) for c in train_cases], len(cfg.data.labels))
        log.info("balanced class weights: %s", ", ".join(f"{cfg.data.labels[i]} {w:.3f}" for i, w in enumerate(weights)))
        tracker.log_params({"loss.class_weights_resolved": [round(w, 4) for w in weights]})
    loss = create_classification_loss(cfg.loss, weights if isinstance(weights, list) else None)
    return with_auxiliary_heads(loss, cfg.model)


def validation(cfg: ClassificationConfig) -> tuple[Validator, Previewer]:
    """Validation AUC, ACC... over every process's share, and a captioned grid of validation images."""
    head = head_kind(cfg)
    batch = max(cfg.train.batch_size, 64)

    def validate(net: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> dict[str, float]:
        mine = predict_dataset(net, dataset, head, device, amp_dtype, batch, progress=show, desc="val")
        return _score(mine.gather(distributed.current()), cfg, "val")

    return validate, _prediction_preview(cfg, head)


#: Validation images in the picture logged at every validation.
PREVIEW_IMAGES = 16


def _prediction_preview(cfg: ClassificationConfig, head: str) -> Previewer:
    """A grid of the first :data:`PREVIEW_IMAGES` validation images, each captioned with its true
    class and the probability the network gives it (green where the top class is right), for every
    validation: the same images each time, so the run page's slider shows the network learn."""
    names = cfg.data.labels

    def preview(net: nn.Module, dataset: Any, device: torch.device,
                amp_dtype: torch.dtype | None) -> dict[str, np.ndarray]:
        shown = Subset(dataset, range(min(PREVIEW_IMAGES, len(dataset))))
        predicted = predict_dataset(net, shown, head, device, amp_dtype, batch_size=PREVIEW_IMAGES)
        probs, labels = predicted.prob_array(), predicted.label_array()
        images = [_middle_slice(np.asarray(shown[i]["image"])[0]) for i in range(len(shown))]
        captions = [f"{predicted.case_ids[i]}\n{names[int(k)]}: p={probs[i, int(k)]:.2f}"
                    for i, k in enumerate(labels)]
        correct = [int(probs[i].argmax()) == int(k) for i, k in enumerate(labels)]
        title = "val: true class and its predicted probability (green: top class right)"
        return {"val/predictions": image_grid(images, captions, correct, title)}

    return preview


def _middle_slice(image: np.ndarray) -> np.ndarray:
    """A 2-D image as it is; a 3-D one's middle slice along its last axis."""
    return image if image.ndim == 2 else image[..., image.shape[-1] // 2]


# ----------------------------------------------------------------------------------- evaluate stage


def per_case_rows(predictions: ClassificationPredictions, names: dict[int, str]) -> tuple[list[str], list[dict]]:
    """Columns and rows of the per-case CSV: case id, label, predicted class and one probability per class."""
    probs = predictions.prob_array()
    fields = ["case_id", "label", "predicted", *[f"prob_{n}" for n in names.values()]]
    rows = []
    for i, case_id in enumerate(predictions.case_ids):
        row: dict[str, Any] = {"case_id": case_id, "label": predictions.labels[i],
                               "predicted": int(probs[i].argmax())}
        row.update({f"prob_{n}": f"{probs[i, k]:.6f}" for k, n in names.items()})
        rows.append(row)
    return fields, rows


def score_split(cfg: ClassificationConfig, ev: Evaluator, tsne: bool = False,
                fit_calibration: bool = False) -> SplitScores:
    """Score a checkpoint on a split: per-case rows, ROC / confusion / calibration figures and,
    with ``tsne``, a t-SNE map of the penultimate layer.

    Metric names are ``{prefix}/acc``, ``/auc``, ``/f1``, ``/sensitivity``, ... (see
    :func:`~medseg.tasks.classification.metrics.classification_scores`), scored on the probabilities
    predict gives (with the model's temperature), and ``{prefix}/ece_uncalibrated`` beside ``/ece``.

    Args:
        fit_calibration: fit the temperature on this split (the validation split; softmax heads) and
            write ``evaluation/calibration.json``, which later evaluations and the packaged model use.
    """
    split, prefix, out_dir = ev.split, ev.prefix, ev.out_dir
    head = head_kind(cfg)
    predictions = predict_dataset(ev.network, ev.dataset, head, ev.device, ev.amp_dtype, features=tsne,
                                  progress=ev.progress, desc=f"evaluate {split}", keep_logits=True)
    values: dict[str, float] = {}
    figures: list[Path] = []
    if head == "softmax":  # temperature scaling needs a softmax over logits; the ordinal head has none
        calibration = calibrate_split(cfg.validation.calibrate, fit_calibration, predictions.logit_tensor(),
                                      torch.as_tensor(predictions.label_array()), out_dir, split, prefix,
                                      cfg.validation.calibration_bins)
        values.update(calibration.metrics)
        figures += calibration.figures
    if head == "softmax" and calibration.temperature != 1.0:
        # the ranking of the cases, hence the AUC, must not move (exactly so for two classes)
        values[f"{prefix}/auc_uncalibrated"] = _score(predictions, cfg, prefix)[f"{prefix}/auc"]
        predictions.probs = [torch.softmax(predictions.logit_tensor() / calibration.temperature, 1).numpy()]
    values.update(_score(predictions, cfg, prefix))
    names = cfg.data.labels
    fields, rows = per_case_rows(predictions, names)
    probs, labels = predictions.prob_array(), predictions.label_array()
    plots = out_dir / "plots"
    matrix = confusion_counts(probs, labels, len(names))
    figures = [
        roc_curves(probs, labels, names, plots / f"roc_{split}.png", f"ROC, {split} ({len(labels)} cases)"),
        confusion_matrix_plot(matrix, list(names.values()), plots / f"confusion_{split}.png",
                              f"confusion, {split}: ACC {values[f'{prefix}/acc']:.3f}"),
        *figures,
    ]
    if head != "softmax":  # the ordinal head's reliability as it is (nothing to calibrate)
        ece, table = expected_calibration_error(probs, labels, cfg.validation.calibration_bins)
        figures.append(reliability_diagram(table, ece, plots / f"calibration_{split}.png", f"calibration, {split}"))
    atomic_write_text(out_dir / "evaluation" / f"{split}_confusion.json",
                      json.dumps({"labels": list(names.values()), "matrix": matrix.tolist()}, indent=2))
    features = predictions.feature_array()
    if tsne and features is not None and len(features) >= 5:
        from sklearn.manifold import TSNE

        points = TSNE(n_components=2, init="pca", random_state=cfg.seed,
                      perplexity=float(min(30.0, (len(features) - 1) / 3))).fit_transform(features)
        figures.append(embedding_map(points, labels, names, plots / f"tsne_{split}.png",
                                     f"t-SNE of the penultimate layer, {split} ({len(labels)} cases)"))
    return SplitScores(values, fields, rows, figures)


# ----------------------------------------------------------------------------------- package stage


def model_contract(cfg: ClassificationConfig) -> dict[str, Any]:
    """What inference needs to see images as training did, and to read the outputs."""
    return {
        **base_contract(cfg),
        "ordinal": cfg.data.ordinal,
        "resize": list(cfg.preprocess.resize) if cfg.preprocess.resize else None,
        "output_activation": head_kind(cfg),
        "model": cfg.model.model_dump(mode="json"),
    }
