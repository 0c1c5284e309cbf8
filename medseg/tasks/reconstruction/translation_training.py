"""Translation's pieces of the engine's stages: validation during training, scoring a split (the
network with its uncertainty beside histogram matching), and the contract the package stage logs.

Two things are learnt from the run's own data and travel in the contract: the training targets'
quantiles (the histogram-matching baseline's reference) and the trusted mask's threshold, chosen
on the validation split (evaluated before the model is packaged). Both are written under the run's
``evaluation/`` folder as they are found.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medseg.engine import distributed
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.loop import Previewer, Validator, base_contract, trained_flip_axes
from medseg.errors import UsageError
from medseg.io.atomic import atomic_write_text
from medseg.plots import reconstruction_grid
from medseg.tasks.reconstruction.config import ReconstructionConfig
from medseg.tasks.reconstruction.transforms import IMAGE, TARGET
from medseg.tasks.reconstruction.translation import (
    BASELINE,
    METRICS,
    TranslationUNet,
    histogram_matched,
    target_quantiles,
    translate_volume,
    trust_threshold,
    trusted_scores,
    volume_scores,
)
from medseg.tasks.reconstruction.translation_config import TranslationConfig
from medseg.tasks.reconstruction.translation_transforms import channel_indices, translation_eval_transforms

log = logging.getLogger(__name__)

REFERENCE_FILE = "translation_reference.json"
TRUST_FILE = "translation_trust.json"


def build_translation_network(cfg: ReconstructionConfig) -> nn.Module:
    return TranslationUNet(cfg.model, len(channel_indices(cfg.recon, cfg.data.channels)[0]))


def flip_axes(cfg: ReconstructionConfig) -> list[int]:
    """The in-plane axes TTA flips: those the augmentation flipped, else both."""
    return trained_flip_axes(cfg) or [0, 1]


def translation_validation(cfg: ReconstructionConfig) -> tuple[Validator, Previewer | None]:
    """Per-volume PSNR / SSIM / MAE of the network (no TTA: validation runs often), all-reduced."""

    def validate(net: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> dict[str, float]:
        totals = torch.zeros(2 * len(METRICS), dtype=torch.float64)
        for item in tqdm(dataset, desc="val", disable=not show, leave=False, unit="volume"):
            out = translate_volume(net, torch.as_tensor(item[IMAGE]), cfg.recon.image_size, device, amp_dtype, False)
            scores = volume_scores(out.output, _slices(item[TARGET]))
            for i, key in enumerate(METRICS):
                if math.isfinite(scores[key]):
                    totals[2 * i] += scores[key]
                    totals[2 * i + 1] += 1
        distributed.current().sum_(totals)
        return {f"val/{k}": float(totals[2 * i] / totals[2 * i + 1]) if totals[2 * i + 1] else float("nan")
                for i, k in enumerate(METRICS)}

    return validate, None


def _slices(volume: Any) -> torch.Tensor:
    """(1, H, W, S) -> (S, 1, H, W)."""
    return torch.as_tensor(volume).float().permute(3, 0, 1, 2)


def reference_quantiles(cfg: ReconstructionConfig, train_items: list[dict[str, Any]], run_dir: Path) -> list[float]:
    """The training targets' quantiles (the baseline's reference), computed once per run."""
    path = run_dir / "evaluation" / REFERENCE_FILE
    if path.is_file():
        return [float(q) for q in json.loads(path.read_text())["quantiles"]]
    chain = translation_eval_transforms(cfg.preprocess, cfg.recon, cfg.data.channels)
    quantiles = target_quantiles([np.asarray(chain(item)[TARGET]) for item in train_items])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"cases": len(train_items), "quantiles": quantiles}))
    return quantiles


def score_translation_split(cfg: ReconstructionConfig, ev: Evaluator, train_items: list[dict[str, Any]]) -> SplitScores:
    """Score a checkpoint on whole volumes: the network (TTA mean) beside histogram matching, the
    mean uncertainty, and the trusted mask's share and error. On the validation split the trusted
    mask's threshold is chosen (``translation.trusted_error`` or ``trusted_coverage``) and kept for the
    package stage.

    Metric names: ``{prefix}/psnr``, ``/ssim``, ``/mae``, ``{prefix}/histmatch_psnr``..., the gains
    ``{prefix}/psnr_gain``..., ``{prefix}/uncertainty_mean``, ``/trusted_fraction``, ``/trusted_mae``,
    ``/untrusted_mae`` and (validation) ``{prefix}/trust_threshold``.
    """
    translation = _translation(cfg)
    quantiles = reference_quantiles(cfg, train_items, ev.out_dir)
    base_channel = translation.input_channels(cfg.data.channels).index(translation.baseline_input(cfg.data.channels))
    cases: list[tuple[str, Any, Any, np.ndarray, np.ndarray]] = []
    rows: list[dict[str, Any]] = []
    for item in tqdm(ev.dataset, desc=f"evaluate {ev.split}", disable=not ev.progress, leave=False, unit="volume"):
        case_id, target = str(item["case_id"]), _slices(item[TARGET])
        out = translate_volume(ev.network, torch.as_tensor(item[IMAGE]), cfg.recon.image_size, ev.device,
                               ev.amp_dtype, translation.tta, flip_axes(cfg))
        baseline = _slices(histogram_matched(np.asarray(item[IMAGE])[base_channel:base_channel + 1], quantiles))
        model, base = volume_scores(out.output, target), volume_scores(baseline, target)
        rows.append({"case_id": case_id, "slices": int(target.shape[0]), **model,
                     **{f"{BASELINE}_{k}": v for k, v in base.items()},
                     **{f"{k}_gain": model[k] - base[k] for k in METRICS},
                     "uncertainty_mean": float(out.spread.mean())})
        cases.append((case_id, out.output, baseline, out.spread.numpy(), (out.output - target).abs().numpy()))
        if len(cases) <= cfg.validation.overlays:
            reconstruction_grid(baseline, out.output, target, ev.out_dir / "plots" / f"translation_{ev.split}_{case_id}.png",
                                f"{ev.split} {case_id}: {BASELINE} SSIM {base['ssim']:.3f} -> network {model['ssim']:.3f}",
                                BASELINE)
    threshold = _threshold(translation, cases, ev.out_dir, ev.split == "val")
    for row, (_, _, _, spread, error) in zip(rows, cases):
        row.update(trusted_scores(spread, error, threshold) if threshold is not None else {})
    return SplitScores(_means(rows, ev.prefix, threshold), list(rows[0]) if rows else [],
                       [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                       sorted((ev.out_dir / "plots").glob(f"translation_{ev.split}_*.png")))


def _threshold(translation: TranslationConfig, cases: list[tuple[Any, ...]], run_dir: Path,
               choose: bool) -> float | None:
    """Choose the trusted mask's threshold on these cases (validation) or read the chosen one (None: not yet)."""
    path = run_dir / "evaluation" / TRUST_FILE
    if not choose:
        return float(json.loads(path.read_text())["threshold"]) if path.is_file() else None
    spread = np.concatenate([c[3].ravel() for c in cases])
    error = np.concatenate([c[4].ravel() for c in cases])
    tolerance, coverage = translation.trusted_error, translation.trusted_coverage
    threshold = trust_threshold(spread, error, tolerance, coverage)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = spread <= threshold
    atomic_write_text(path, json.dumps({"threshold": threshold, "trusted_error": tolerance, "trusted_coverage": coverage,
                                        "voxels": int(spread.size), "kept": float(kept.mean()),
                                        "kept_mae": float(error[kept].mean()) if kept.any() else None}))
    log.info("trusted mask: uncertainty <= %.4g keeps %.1f%% of the validation voxels", threshold, 100 * float(kept.mean()))
    return threshold


def _means(rows: list[dict[str, Any]], prefix: str, threshold: float | None) -> dict[str, float]:
    keys = [k for k in (rows[0] if rows else {}) if k not in ("case_id", "slices")]
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows if math.isfinite(float(r[key]))]
        out[f"{prefix}/{key}"] = float(np.mean(values)) if values else float("nan")
    if threshold is not None:
        out[f"{prefix}/trust_threshold"] = threshold
    return out


def translation_contract(cfg: ReconstructionConfig) -> dict[str, Any]:
    """What inference needs: the contrasts (the network sees the inputs only; every contrast is
    scaled to [0, 1] on its own), the slice geometry and the flips of its uncertainty."""
    translation = _translation(cfg)
    inputs = translation.input_channels(cfg.data.channels)
    return {**base_contract(cfg), "intensity": {"mode": "minmax", "per_channel": True},
            "recon": cfg.recon.model_dump(mode="json", exclude={"phantoms", "real_images"}),
            "input_channels": inputs, "target_channel": translation.target,
            "baseline": BASELINE, "tta_axes": flip_axes(cfg), "output_activation": "image",
            "model": cfg.model.model_dump(mode="json")}


def _translation(cfg: ReconstructionConfig) -> TranslationConfig:
    if cfg.recon.translation is None:  # the config validator refuses this; a hand-built config may not
        raise UsageError("recon.problem: translation needs recon.translation (the target contrast)")
    return cfg.recon.translation


def packaged_translation_contract(cfg: ReconstructionConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`translation_contract` with the reference quantiles and the trusted threshold the
    evaluation found (none without a validation split: the predictor then writes no trusted mask)."""
    contract = translation_contract(cfg)
    for name, key, field in ((REFERENCE_FILE, "reference_quantiles", "quantiles"), (TRUST_FILE, "trust_threshold",
                                                                                   "threshold")):
        path = run_dir / "evaluation" / name
        if path.is_file():
            contract[key] = json.loads(path.read_text())[field]
    return contract


__all__ = ["build_translation_network", "packaged_translation_contract", "score_translation_split",
           "translation_contract", "translation_validation"]
