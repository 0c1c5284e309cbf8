"""Segmentation stages: train (patches, budgets, checkpoints), evaluate (whole volumes), package.

Each stage is a function whose inputs and outputs are files, so a run can be stopped, inspected
and resumed between stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from torch import nn
from tqdm import tqdm

from medseg.data.manifest import read_manifest
from medseg.engine import distributed
from medseg.engine.calibration import SplitCalibration, VoxelSample, calibrate_split
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.loop import Previewer, Validator, base_contract, split_cases, trained_flip_axes
from medseg.engine.sliding import label_map, predict_logits
from medseg.engine.tta import average_predictions, flip_combinations
from medseg.engine.uncertainty import voxel_entropy
from medseg.io.readers import load_volume
from medseg.plots import contour_overlay_image, overlay
from medseg.tasks.segmentation.config import SegmentationConfig
from medseg.tasks.segmentation.metrics import SegmentationMetrics
from medseg.tasks.segmentation.networks import create_segmentation_network
from medseg.tasks.segmentation.postprocess import (
    POSTPROCESS_FILE,
    read_chosen_sizes,
    remove_small_components,
    search_min_sizes,
    sizes_by_value,
    write_search,
)
from medseg.tasks.segmentation.regions import SIGMOID, Regions, decode_regions
from medseg.tracking import MlflowTracker

log = logging.getLogger(__name__)

__all__ = ["build_network", "label_volume_stats", "model_contract", "packaged_contract", "score_split", "validate",
           "validation"]


# ----------------------------------------------------------------------------------- helpers


def build_network(cfg: SegmentationConfig) -> nn.Module:
    """The configured network: one output per label (softmax), or one per region (sigmoid)."""
    outputs = len(cfg.regions) if cfg.regions else len(cfg.data.labels)
    return create_segmentation_network(cfg.model, len(cfg.data.channels), outputs, cfg.patch.size)


def scores_to_labels(logits: torch.Tensor, regions: Regions | None) -> torch.Tensor:
    """Label map (*spatial) from (K, *spatial) logits: the arg-max, or with regions their decoding."""
    return label_map(logits) if regions is None else decode_regions(logits, regions, logits=True)


def _case_spacing(item: dict[str, Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in item["image"].pixdim)


# ----------------------------------------------------------------------------------- validation in training


def validation(cfg: SegmentationConfig) -> tuple[Validator, Previewer | None]:
    """Sliding-window validation of whole volumes (Dice, HD95), and overlays of the first
    ``validation.overlays`` cases as that validation predicted them (None without overlays)."""
    metrics = SegmentationMetrics(cfg.data.labels, hd95=cfg.validation.hd95, regions=Regions.from_config(cfg.regions))
    shown: list[_Shown] = []  # the first validation cases as the last validation predicted them

    def validate_hook(net: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                      show: bool) -> dict[str, float]:
        return validate(net, dataset, cfg, metrics, device, amp_dtype, show, keep=(cfg.validation.overlays, shown))

    return validate_hook, _overlay_preview(cfg, shown) if cfg.validation.overlays else None


@dataclass(frozen=True)
class _Shown:
    """One validation case as validation predicted it, kept for its picture."""

    case_id: str
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    dice: dict[str, float]


def _overlay_preview(cfg: SegmentationConfig, shown: list[_Shown]) -> Previewer:
    """Overlays of the first ``validation.overlays`` validation cases, for every validation: the
    same cases on the same slice each time, so the run page's slider shows the prediction change.

    The predictions are the ones :func:`validate` just made (``shown``), not made again.
    """
    def preview(net: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, np.ndarray]:
        pictures: dict[str, np.ndarray] = {}
        for case in shown:
            title = f"{case.case_id}\nDice " + ", ".join(f"{k} {v:.2f}" for k, v in case.dice.items())
            pictures[f"val/overlay/{case.case_id}"] = contour_overlay_image(case.image, case.truth, case.pred, title,
                                                                            len(cfg.data.labels))
        return pictures

    return preview


@torch.no_grad()
def validate(model: nn.Module, dataset: Any, cfg: SegmentationConfig, metrics: SegmentationMetrics,
             device: torch.device, amp_dtype: torch.dtype | None, progress: bool = False,
             prefix: str = "val", keep: tuple[int, list[_Shown]] | None = None) -> dict[str, float]:
    """Sliding-window prediction of whole volumes and Dice/HD95 against their labels.

    In a distributed run each process scores its share of the cases and the counts are summed
    across processes, so every process returns the single-process value.

    Args:
        keep: ``(count, shown)``: replace ``shown``'s contents with the first ``count`` cases'
            image, label and prediction (the pictures logged with each validation).
    """
    model.eval()
    metrics.reset()
    if keep is not None:
        keep[1].clear()
    for index, item in enumerate(tqdm(dataset, desc=prefix, disable=not progress, leave=False, unit="case")):
        pred = predict_segmentation(model, item["image"], cfg, device, amp_dtype)
        truth = item["label"].as_tensor()[0]
        dice = metrics.update(pred, truth, _case_spacing(item), item["case_id"])
        if keep is not None and index < keep[0]:
            keep[1].append(_Shown(str(item["case_id"]), item["image"].as_tensor()[0].numpy(), truth.numpy(),
                                  pred.cpu().numpy(), dice))
    metrics.reduce(distributed.current())
    model.train()
    return metrics.aggregate(prefix)


def segmentation_logits(model: nn.Module, image: torch.Tensor, cfg: SegmentationConfig, device: torch.device,
                        amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Sliding-window logits (K, *spatial) for one preprocessed channel-first volume."""
    v = cfg.validation
    return predict_logits(model, image.as_tensor() if hasattr(image, "as_tensor") else image, cfg.patch.size,
                          overlap=v.overlap, sw_batch_size=v.sw_batch_size, blend=v.blend, device=device,
                          amp_dtype=amp_dtype)


def evaluation_mirror_axes(cfg: SegmentationConfig) -> list[int]:
    """The axes the evaluate stage mirrors over (``validation.tta``): those training flipped, when
    on; auto turns it on when training flipped every spatial axis, as nnU-Net's plans do."""
    axes = trained_flip_axes(cfg)
    on = cfg.validation.tta if cfg.validation.tta is not None else len(axes) == cfg.model.spatial_dims
    return axes if on else []


def mirrored_logits(model: nn.Module, image: torch.Tensor, cfg: SegmentationConfig, device: torch.device,
                    amp_dtype: torch.dtype | None, axes: list[int]) -> torch.Tensor:
    """Sliding-window logits (K, *spatial); with ``axes``, the probabilities averaged over every
    mirroring of them (nnU-Net's test-time mirroring), returned as their logits (log for a softmax,
    logit for sigmoids) so that decoding, calibration and entropy read them as any other logits."""
    if not axes:
        return segmentation_logits(model, image, cfg, device, amp_dtype).float()
    sigmoid = cfg.regions is not None

    def probabilities(_: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = segmentation_logits(model, x, cfg, device, amp_dtype).float()
        return torch.sigmoid(logits) if sigmoid else torch.softmax(logits, 0)

    plain = image.as_tensor() if hasattr(image, "as_tensor") else image
    mean = average_predictions([model], plain, cfg.model.spatial_dims, True, probabilities, axes=axes)
    p = mean.clamp(1e-7, 1 - 1e-7)
    return torch.log(p / (1 - p)) if sigmoid else torch.log(p)


def predict_segmentation(model: nn.Module, image: torch.Tensor, cfg: SegmentationConfig, device: torch.device,
                         amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Label map (*spatial) for one preprocessed channel-first volume."""
    return scores_to_labels(segmentation_logits(model, image, cfg, device, amp_dtype), Regions.from_config(cfg.regions))


# ----------------------------------------------------------------------------------- evaluate stage


def score_split(cfg: SegmentationConfig, ev: Evaluator, tracker: MlflowTracker | None = None,
                fit_calibration: bool = False) -> SplitScores:
    """Score a checkpoint on a whole split: per-case rows, overlay PNGs and calibration.

    Metric names are ``{prefix}/dice/<label>``, ``{prefix}/dice_mean``, ``{prefix}/dice_mean_per_case``,
    ``{prefix}/hd95/<label>``, and the voxel ECE ``{prefix}/ece`` (with the model's temperature) and
    ``{prefix}/ece_uncalibrated``. With ``regions`` also ``{prefix}/dice_region/<region>`` and
    ``{prefix}/dice_region_mean``, and no calibration (see :func:`_calibration`).

    The scores are of the label maps predict would write: after ``postprocess.keep_largest_component``
    and the removal of small components (the sizes the validation split chose, else the config's).
    On the validation split with ``postprocess.search_min_component_size``, they are scored without
    removal and the sizes are searched on the same label maps: ``postprocess.json`` and
    ``val/postprocess/dice_mean_before`` / ``..._after`` (see :mod:`~medseg.tasks.segmentation.postprocess`).

    Args:
        fit_calibration: fit the temperature on this split (the validation split) and write it to
            ``evaluation/calibration.json``, which later evaluations and the packaged model use.
    """
    split, prefix, out_dir = ev.split, ev.prefix, ev.out_dir
    regions = Regions.from_config(cfg.regions)
    metrics = SegmentationMetrics(cfg.data.labels, hd95=cfg.validation.hd95, regions=regions)
    post = _split_postprocess(cfg, out_dir, split)
    kept: list[tuple[np.ndarray, np.ndarray]] = []  # the search's label maps: predicted once, scored many times
    overlays: list[Path] = []
    voxels = VoxelSample.empty(seed=cfg.seed)
    entropy_logits: list[torch.Tensor] = []
    mirror = evaluation_mirror_axes(cfg)
    for index, item in enumerate(tqdm(ev.dataset, desc=f"evaluate {split}", disable=not ev.progress, unit="case")):
        logits = mirrored_logits(ev.network, item["image"], cfg, ev.device, ev.amp_dtype, mirror)
        raw = scores_to_labels(logits, regions)
        pred = post.apply(raw)
        truth = item["label"].as_tensor()[0]
        dice = metrics.update(pred, truth, _case_spacing(item), item["case_id"])
        if post.search is not None:
            kept.append((_compact(pred), _compact(truth)))
        # the model's own view, as predict measures it: calibration and entropy before post-processing
        if regions is None:  # the temperature's samples: softmax logits and their classes
            voxels.add_case(logits, truth, raw)
        entropy_logits.append(_entropy_region_logits(logits, raw, voxels.generator))
        if index < cfg.validation.overlays:
            title = f"{split} {item['case_id']}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
            overlays.append(overlay(item["image"].as_tensor()[0].numpy(), truth.numpy(), pred.cpu().numpy(),
                                    out_dir / "plots" / f"overlay_{split}_{item['case_id']}.png", title,
                                    len(cfg.data.labels)))
    values = metrics.aggregate(prefix)
    calibration = _calibration(cfg, regions, voxels, fit_calibration, out_dir, split, prefix)
    values.update(calibration.metrics)
    for row, sample in zip(metrics.per_case, entropy_logits):
        # what predict reports as mean_entropy (with the model's temperature; mirrored as the split
        # was, hence as predict --tta for a model evaluated with TTA): the validation split's range
        # sets the QC threshold
        probabilities = torch.sigmoid(sample) if regions else torch.softmax(sample / calibration.temperature, 0)
        row["mean_entropy"] = float(voxel_entropy(probabilities, sigmoid=regions is not None).mean())
    case_means = [np.nanmean([float(r[f"dice/{n}"]) for n in metrics.names]) for r in metrics.per_case]
    values[f"{prefix}/dice_mean_per_case"] = float(np.nanmean(case_means)) if case_means else float("nan")
    values[f"{prefix}/predictions_per_case"] = float(len(flip_combinations(cfg.model.spatial_dims, bool(mirror), mirror)))
    if post.search is not None:
        values.update(_search_sizes(cfg, kept, post.search, out_dir, split, tracker))
    return SplitScores(values, list(metrics.per_case[0]) if metrics.per_case else ["case_id"], metrics.per_case,
                       (*overlays, *calibration.figures))


@dataclass(frozen=True)
class _SplitPostprocess:
    """How the evaluate stage post-processes a split's decoded label maps, as predict does.

    Attributes:
        foreground: the foreground label values (what keep-largest applies to).
        keep_largest: keep each label's largest component.
        min_sizes: label value -> components smaller than this many voxels are removed.
        search: the sizes to try on this split (the validation split, when it chooses them), or None.
    """

    foreground: tuple[int, ...]
    keep_largest: bool
    min_sizes: dict[int, int]
    search: list[int] | None

    def apply(self, pred: torch.Tensor) -> torch.Tensor:
        if self.keep_largest:
            pred = KeepLargestConnectedComponent(applied_labels=list(self.foreground), independent=True)(pred[None])[0]
        if self.min_sizes:
            pred = torch.from_numpy(remove_small_components(pred.cpu().numpy(), self.min_sizes)).to(pred.device)
        return pred


def _compact(labels: torch.Tensor) -> np.ndarray:
    """A label map as the smallest unsigned integers that hold it (the search keeps every case's)."""
    array = labels.cpu().numpy()
    return np.rint(array).astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)


def _split_postprocess(cfg: SegmentationConfig, out_dir: Path, split: str) -> _SplitPostprocess:
    """The validation split searches the sizes (scored on predictions without removal) unless it is
    trained on; later splits use what it chose (``postprocess.json``), else the config's sizes."""
    post = cfg.postprocess
    search = post.search_min_component_size if split == "val" else None
    if search is not None and cfg.data.seen_validation():
        log.info("postprocess.search_min_component_size: not searched; the validation fold %s is trained on too "
                 "(data.train_folds: all), so its Dice cannot tell which removal generalises; using "
                 "postprocess.min_component_size %s", cfg.data.fold, dict(post.min_component_size))
        search = None
    if split == "val":  # this split decides afresh: an earlier search's choice must not outlive it
        (out_dir / POSTPROCESS_FILE).unlink(missing_ok=True)
    chosen = read_chosen_sizes(out_dir)
    sizes = {} if search is not None else chosen if chosen is not None else post.min_component_size
    return _SplitPostprocess(tuple(v for v in sorted(cfg.data.labels) if v != 0), post.keep_largest_component,
                             sizes_by_value(sizes, cfg.data.labels), search)


def _search_sizes(cfg: SegmentationConfig, cases: list[tuple[np.ndarray, np.ndarray]], candidates: list[int],
                  out_dir: Path, split: str, tracker: MlflowTracker | None) -> dict[str, float]:
    """Choose the removal sizes on ``cases`` (see :func:`search_min_sizes`), write ``postprocess.json``
    for the test split and the package stage, and return the mean per-case Dice before and after."""
    names = cfg.data.labels
    search = search_min_sizes(cases, [v for v in sorted(names) if v != 0], candidates)
    path = write_search(out_dir / POSTPROCESS_FILE, search, names, candidates)
    if tracker is not None:
        tracker.log_artifact(path)
    log.info("postprocess: min_component_size %s chosen on %d %s cases (mean per-case Dice %.4f -> %.4f)",
             {names[v]: s for v, s in search.min_sizes.items()}, len(cases), split, search.before, search.after)
    return {f"{split}/postprocess/dice_mean_before": search.before,
            f"{split}/postprocess/dice_mean_after": search.after}


def _calibration(cfg: SegmentationConfig, regions: Regions | None, voxels: VoxelSample, fit: bool, out_dir: Path,
                 split: str, prefix: str) -> SplitCalibration:
    """The split's temperature scaling; none for a region model, whose sigmoids are not one
    distribution over classes that a single temperature and the softmax ECE describe."""
    if regions is None:
        return calibrate_split(cfg.validation.calibrate, fit, *voxels.tensors(), out_dir, split, prefix,
                               unit="voxels near structures")
    if cfg.validation.calibrate and fit:
        log.info("validation.calibrate: no temperature fitted; a region model's outputs are independent sigmoids, "
                 "which softmax temperature scaling does not apply to (predict uses T = 1)")
    return SplitCalibration(1.0, {}, ())


#: At most this many voxels of a case (a random sample) enter its mean entropy.
_ENTROPY_SAMPLE = 100_000


def _entropy_region_logits(logits: torch.Tensor, pred: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The (K, M) logits :func:`mean_foreground_entropy` averages over: the predicted foreground's
    voxels, or all voxels when there is none, at most ``_ENTROPY_SAMPLE`` of them (kept until the
    temperature is known)."""
    flat = logits.reshape(logits.shape[0], -1)
    inside = (pred != 0).reshape(-1)
    if bool(inside.any()):
        flat = flat[:, inside]  # a large organ: a sample estimates its mean as well, in bounded memory
    if flat.shape[1] > _ENTROPY_SAMPLE:
        flat = flat[:, torch.randperm(flat.shape[1], generator=generator)[:_ENTROPY_SAMPLE]]
    return flat.cpu()


# ----------------------------------------------------------------------------------- package stage


def model_contract(cfg: SegmentationConfig) -> dict[str, Any]:
    """What inference needs to reproduce training's view of the data (MONAI bundle ``metadata.json``);
    a region model's also names its regions (name, labels, paint value, in paint order)."""
    regions = Regions.from_config(cfg.regions)
    return {
        **base_contract(cfg),
        "patch_size": list(cfg.patch.size),
        "sliding_window": {"overlap": cfg.validation.overlap, "blend": cfg.validation.blend,
                           "sw_batch_size": cfg.validation.sw_batch_size},
        "output_activation": "softmax" if regions is None else SIGMOID,
        **({} if regions is None else {"regions": regions.to_contract()}),
        "postprocess": cfg.postprocess.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
    }


def packaged_contract(cfg: SegmentationConfig, contract: dict[str, Any], out_dir: Path, manifest_path: Path,
                      root: Path) -> dict[str, Any]:
    """``contract`` with what the run measured: the removal sizes the validation split chose, the
    training split's label volumes and the QC thresholds predict checks against."""
    chosen = read_chosen_sizes(out_dir)
    if chosen is not None:  # what the validation split chose replaces the config's sizes
        contract["postprocess"]["min_component_size"] = chosen
    contract["label_volumes_ml"] = label_volume_stats(cfg, manifest_path, root)
    contract["qc"] = {**DEFAULT_QC, **entropy_threshold(out_dir / "evaluation" / "val_cases.csv")}
    contract["evaluated_with_tta"] = bool(evaluation_mirror_axes(cfg))  # predict says so when --tta is left out
    return contract


#: QC thresholds a packaged model's contract starts with (``predict --qc KEY=VALUE`` overrides them):
#: a predicted volume more than 3 standard deviations from the training split's is flagged.
DEFAULT_QC = {"max_abs_volume_z": 3.0}


#: The entropy threshold is this quantile of the validation cases' mean entropies.
ENTROPY_QUANTILE = 0.9


def entropy_threshold(val_cases: Path) -> dict[str, float]:
    """``max_mean_entropy``: the 90th percentile of the validation cases' mean foreground entropy
    (from the evaluate stage's per-case CSV; {} without one). It flags the tenth of cases like the
    validation ones that the model is least sure of, and whatever lies beyond: on MSD hippocampus
    the flagged test cases had a lower Dice than the rest, and harmed inputs scored up to three
    times the clean ones (benchmarks/results/uncertainty.md)."""
    import csv

    if not val_cases.is_file():
        return {}
    with open(val_cases, newline="") as fh:
        values = [float(row["mean_entropy"]) for row in csv.DictReader(fh) if row.get("mean_entropy")]
    return {"max_mean_entropy": round(float(np.quantile(values, ENTROPY_QUANTILE)), 4)} if values else {}


def label_volume_stats(cfg: SegmentationConfig, manifest_path: Path, root: Path) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each foreground label's volume (mL) over the training split's
    labels: what a predicted volume is compared with (``volume_z_<label>`` in predict's report)."""
    manifest = read_manifest(manifest_path)
    names = {int(k): v for k, v in cfg.data.labels.items() if int(k) != 0}
    volumes: dict[str, list[float]] = {name: [] for name in names.values()}
    for case in split_cases(cfg, manifest, "train"):
        path = case.label_path(root)
        if path is None or not path.exists():
            continue
        label = load_volume(path)  # any format the registry reads: NRRD, DICOM SEG, ... not only NIfTI
        data = np.rint(np.asarray(label)[0])
        voxel_ml = abs(float(np.linalg.det(np.asarray(label.affine, dtype=np.float64)[:3, :3]))) / 1000.0
        for value, name in names.items():
            volumes[name].append(float((data == value).sum()) * voxel_ml)
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "cases": len(v)}
            for name, v in volumes.items() if v}
