"""Reconstruction stages: train (2D slices, simulated measurements), evaluate (whole volumes,
fastMRI metrics beside the classical baseline, image grids), package.

The loop itself (budgets, checkpoints, exact resume, DDP) is :func:`medseg.engine.loop.fit`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medseg.engine import distributed
from medseg.engine.evaluation import Evaluator, SplitScores
from medseg.engine.loop import Previewer, Validator, base_contract
from medseg.engine.runtime import autocast
from medseg.engine.tta import average_predictions
from medseg.errors import UsageError
from medseg.plots import reconstruction_grid, reconstruction_image
from medseg.tasks.reconstruction.config import ReconstructionConfig
from medseg.tasks.reconstruction.networks import create_reconstruction_model
from medseg.tasks.reconstruction.operators import (
    Acquisition,
    case_seed,
    summarise,
    volume_metrics,
)

log = logging.getLogger(__name__)

SELECTION_METRIC = "val/ssim"  # fastMRI's leaderboard metric
METRICS = ("psnr", "ssim", "nmse")


@dataclass(frozen=True)
class VolumeReconstruction:
    """Slices (N, 1, H, W) of one volume, cropped back to its own in-plane size."""

    output: torch.Tensor
    baseline: torch.Tensor
    target: torch.Tensor
    inputs: torch.Tensor


def build_network(cfg: ReconstructionConfig) -> nn.Module:
    return create_reconstruction_model(cfg.model, cfg.recon)


# ----------------------------------------------------------------------------------- one volume


def pad_slices(slices: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (N, 1, h, w) slices, centred, to at least (height, width); returns the offsets."""
    h, w = slices.shape[-2:]
    top, left = max(0, height - h) // 2, max(0, width - w) // 2
    padded = torch.nn.functional.pad(slices, (left, max(0, width - w) - left, top, max(0, height - h) - top))
    return padded, (top, left)


@torch.no_grad()
def reconstruct_volume(net: nn.Module, volume: torch.Tensor, acquisition: Acquisition, seed: int,
                       image_size: tuple[int, int], device: torch.device, amp_dtype: torch.dtype | None,
                       batch_size: int = 16, tta: bool = False,
                       axes: Sequence[int] | None = None) -> VolumeReconstruction:
    """Simulate the measurement of every slice of ``volume`` and reconstruct it.

    Args:
        net: the reconstruction network (eval mode is set here).
        volume: (1, H, W, S) ground truth in [0, 1], slices along the last axis.
        acquisition: the configured measurement.
        seed: one mask / noise draw for the whole volume (from the case id: reproducible).
        image_size: slices are padded to at least this (the grid the network was trained on).
        tta: average the network's output over in-plane flips of its input (``axes``; None: both;
            :mod:`medseg.engine.tta`). Only where a mirrored input is a measurement the network
            learned (super-resolution: its thick slices flip with the truth in training);
            ``medseg predict`` refuses it for the other problems.
    """
    net.eval()
    target = torch.as_tensor(volume).float()[0].permute(2, 0, 1)[:, None]  # (S, 1, H, W)
    h, w = target.shape[-2:]
    padded, (top, left) = pad_slices(target, *image_size)
    if acquisition.degrades_before_padding:
        inputs, _ = pad_slices(acquisition.degrade(target, seed), *image_size)
    else:
        inputs = acquisition.degrade(padded, seed)

    def run(member: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
        with autocast(amp_dtype, device):
            return member(chunk).float()

    output = torch.cat([average_predictions([net], inputs[start:start + batch_size].to(device), 2, tta, run,
                                            axes=axes).cpu() for start in range(0, len(inputs), batch_size)])

    def crop(x: torch.Tensor) -> torch.Tensor:
        return x[..., top:top + h, left:left + w]

    return VolumeReconstruction(crop(output), crop(acquisition.baseline(inputs)), target, crop(inputs))


def score_volume(rec: VolumeReconstruction, baseline_name: str) -> dict[str, float]:
    """fastMRI metrics of the network and of the baseline for one volume, and the gains."""
    model, base = volume_metrics(rec.output, rec.target), volume_metrics(rec.baseline, rec.target)
    row: dict[str, float] = dict(model)
    row.update({f"{baseline_name}_{k}": v for k, v in base.items()})
    row.update({f"{k}_gain": model[k] - base[k] for k in METRICS})
    return row


def _score_dataset(net: nn.Module, dataset: Any, cfg: ReconstructionConfig, device: torch.device,
                   amp_dtype: torch.dtype | None, progress: bool,
                   desc: str) -> tuple[list[dict[str, Any]], list[tuple[str, VolumeReconstruction]]]:
    acquisition = Acquisition(cfg.recon)
    rows: list[dict[str, Any]] = []
    kept: list[tuple[str, VolumeReconstruction]] = []
    for item in tqdm(dataset, desc=desc, disable=not progress, leave=False, unit="volume"):
        case_id = str(item["case_id"])
        rec = reconstruct_volume(net, item["image"], acquisition, case_seed(case_id), cfg.recon.image_size,
                                 device, amp_dtype)
        rows.append({"case_id": case_id, "slices": int(rec.target.shape[0]),
                     **score_volume(rec, acquisition.baseline_name)})
        if len(kept) < cfg.validation.overlays:
            kept.append((case_id, rec))
    return rows, kept


# ----------------------------------------------------------------------------------- validation in training


def validation(cfg: ReconstructionConfig) -> tuple[Validator, Previewer | None]:
    """Per-volume PSNR / SSIM / NMSE of the network and the baseline (masks seeded from the case ids),
    all-reduced across processes; and pictures of the middle slices (None without overlays)."""
    baseline = Acquisition(cfg.recon).baseline_name

    def validate(net: nn.Module, dataset: Any, device: torch.device, amp_dtype: torch.dtype | None,
                 show: bool) -> dict[str, float]:
        rows, _ = _score_dataset(net, dataset, cfg, device, amp_dtype, show, "val")
        # sums and counts of finite values, all-reduced: every process returns the all-case means
        keys = [*METRICS, *[f"{baseline}_{m}" for m in METRICS]]
        totals = torch.zeros(2 * len(keys), dtype=torch.float64)
        for row in rows:
            for i, key in enumerate(keys):
                if math.isfinite(row[key]):
                    totals[2 * i] += row[key]
                    totals[2 * i + 1] += 1
        distributed.current().sum_(totals)
        out = {f"val/{k}": float(totals[2 * i] / totals[2 * i + 1]) if totals[2 * i + 1] else float("nan")
               for i, k in enumerate(keys)}
        out.update({f"val/{m}_gain": out[f"val/{m}"] - out[f"val/{baseline}_{m}"] for m in METRICS})
        return out

    return validate, _slice_preview(cfg) if cfg.validation.overlays else None


def _slice_preview(cfg: ReconstructionConfig) -> Previewer:
    """Input, network output, target and the network's error on the middle slice of the first
    ``validation.overlays`` validation volumes, for every validation: the same slices, with the
    same simulated measurement, each time, so the run page's slider shows the network learn.

    Only that slice is reconstructed again, so a picture costs one slice, not a volume.
    """
    acquisition = Acquisition(cfg.recon)
    baseline = acquisition.baseline_name

    def preview(net: nn.Module, dataset: Any, device: torch.device,
                amp_dtype: torch.dtype | None) -> dict[str, np.ndarray]:
        pictures: dict[str, np.ndarray] = {}
        for index in range(min(cfg.validation.overlays, len(dataset))):
            item = dataset[index]
            case_id = str(item["case_id"])
            volume = torch.as_tensor(item["image"])
            middle = volume.shape[-1] // 2
            rec = reconstruct_volume(net, volume[..., middle:middle + 1], acquisition, case_seed(case_id),
                                     cfg.recon.image_size, device, amp_dtype)
            scores = score_volume(rec, baseline)
            title = (f"{case_id}, slice {middle}\n{baseline} {scores[f'{baseline}_psnr']:.1f} dB, "
                     f"network {scores['psnr']:.1f} dB")
            pictures[f"val/reconstruction/{case_id}"] = reconstruction_image(rec.baseline, rec.output, rec.target,
                                                                             title, baseline)
        return pictures

    return preview


# ----------------------------------------------------------------------------------- evaluate stage


def resolve_real_images(cfg: ReconstructionConfig, root: Path) -> list[dict[str, Any]]:
    """Records for ``recon.real_images``: paths under the data root, or ``pydicom:<file>`` test images.

    Raises:
        UsageError: a listed image does not exist (named, with the fix).
    """
    out = []
    for entry in cfg.recon.real_images:
        if entry.startswith("pydicom:"):
            from pydicom.data import get_testdata_file

            name = entry.split(":", 1)[1]
            found = get_testdata_file(name)
            if not found:
                raise UsageError(f"recon.real_images: {entry}: pydicom ships no test file {name!r}; "
                                 "list pydicom.data.get_testdata_files() for the names")
            path = Path(str(found))
        else:
            path = Path(entry) if Path(entry).is_absolute() else root / entry
        if not path.exists():
            raise UsageError(f"recon.real_images: {path} does not exist; fix the path (relative to data.root "
                             f"{root}) or remove it from the list")
        case_id = path.name.split(".")[0] if path.is_file() else path.name
        out.append({"image": str(path), "case_id": case_id})
    return out


def score_split(cfg: ReconstructionConfig, ev: Evaluator) -> SplitScores:
    """Score a checkpoint on whole volumes: per-case rows (network and baseline side by side) and
    image grids (input, output, target, error) of the first few cases.

    Metric names are ``{prefix}/psnr``, ``/ssim``, ``/nmse``, the baseline's ``{prefix}/<baseline>_psnr``...
    and the gains ``{prefix}/psnr_gain``...
    """
    name, prefix = ev.split, ev.prefix
    rows, kept = _score_dataset(ev.network, ev.dataset, cfg, ev.device, ev.amp_dtype, ev.progress, f"evaluate {name}")
    baseline = Acquisition(cfg.recon).baseline_name
    values = summarise(rows, prefix, baseline)
    fields = ["case_id", "slices", *METRICS, *[f"{baseline}_{m}" for m in METRICS], *[f"{m}_gain" for m in METRICS]]
    figures = []
    for case_id, rec in kept:
        row = next(r for r in rows if r["case_id"] == case_id)
        figures.append(reconstruction_grid(
            rec.baseline, rec.output, rec.target, ev.out_dir / "plots" / f"recon_{name}_{case_id}.png",
            f"{name} {case_id}: {baseline} {row[f'{baseline}_psnr']:.2f} dB / SSIM {row[f'{baseline}_ssim']:.3f} -> "
            f"network {row['psnr']:.2f} dB / {row['ssim']:.3f}", baseline))
    log.info("%s: PSNR %.2f dB (%s %.2f), SSIM %.4f (%.4f), NMSE %.4f (%.4f) over %d volume(s)", name,
             values[f"{prefix}/psnr"], baseline, values[f"{prefix}/{baseline}_psnr"], values[f"{prefix}/ssim"],
             values[f"{prefix}/{baseline}_ssim"], values[f"{prefix}/nmse"], values[f"{prefix}/{baseline}_nmse"], len(rows))
    return SplitScores(values, fields, [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                                        for r in rows], figures)


# ----------------------------------------------------------------------------------- package stage


def model_contract(cfg: ReconstructionConfig) -> dict[str, Any]:
    """What inference needs to simulate the same measurement and read the network's output."""
    recon = cfg.recon
    return {
        **base_contract(cfg),
        "intensity": {"mode": "minmax"},  # every volume is scaled to [0, 1] and back
        "recon": {**recon.model_dump(mode="json", exclude={"phantoms", "real_images"}),
                  "center_fraction": recon.resolved_center_fraction(),
                  "baseline": Acquisition(recon).baseline_name},
        "output_activation": "image",
        "model": cfg.model.model_dump(mode="json"),
    }


__all__ = ["VolumeReconstruction", "build_network", "model_contract", "reconstruct_volume", "resolve_real_images",
           "score_split", "score_volume", "validation"]
