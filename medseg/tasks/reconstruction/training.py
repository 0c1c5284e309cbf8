"""Reconstruction stages: train (2D slices, simulated measurements), evaluate (whole volumes,
fastMRI metrics beside the classical baseline, image grids), package.

The loop itself (budgets, checkpoints, exact resume, DDP) is :func:`medseg.engine.loop.fit`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from torch import nn
from tqdm import tqdm

from medseg.data.datasets import records
from medseg.data.manifest import read_manifest
from medseg.engine import distributed
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.loop import (
    EvalOutputs,
    ModelOutputs,
    Previewer,
    TrainOutputs,
    TrainTask,
    base_contract,
    fit,
    log_evaluation,
    package_model,
    split_cases,
    write_csv,
)
from medseg.engine.runtime import autocast, autocast_dtype, resolve_device
from medseg.errors import UsageError
from medseg.io.atomic import atomic_write_text
from medseg.plots import reconstruction_grid, reconstruction_image
from medseg.tasks.reconstruction.config import ReconstructionConfig
from medseg.tasks.reconstruction.networks import create_reconstruction_model
from medseg.tasks.reconstruction.operators import (
    Acquisition,
    case_seed,
    create_reconstruction_loss,
    summarise,
    volume_metrics,
)
from medseg.tasks.reconstruction.transforms import (
    reconstruction_eval_transforms,
    reconstruction_training_transforms,
)
from medseg.tracking import MlflowTracker

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


#: Simulating a measurement (masks and FFTs, or noise) for every slice is per-sample work of the
#: order of the training step: two loader workers overlap it with the step (benchmarks/results/recon.md
#: times this data path against a plain MONAI pipeline).
LOADER_WORKERS = 2


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
                       batch_size: int = 16) -> VolumeReconstruction:
    """Simulate the measurement of every slice of ``volume`` and reconstruct it.

    Args:
        net: the reconstruction network (eval mode is set here).
        volume: (1, H, W, S) ground truth in [0, 1], slices along the last axis.
        acquisition: the configured measurement.
        seed: one mask / noise draw for the whole volume (from the case id: reproducible).
        image_size: slices are padded to at least this (the grid the network was trained on).
    """
    net.eval()
    target = torch.as_tensor(volume).float()[0].permute(2, 0, 1)[:, None]  # (S, 1, H, W)
    h, w = target.shape[-2:]
    padded, (top, left) = pad_slices(target, *image_size)
    inputs = acquisition.degrade(padded, seed)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size].to(device)
        with autocast(amp_dtype, device):
            outputs.append(net(chunk).float().cpu())
    output = torch.cat(outputs)

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


# ----------------------------------------------------------------------------------- train stage


def train(cfg: ReconstructionConfig, manifest_path: Path, root: Path, out_dir: Path, tracker: MlflowTracker, *,
          resume: bool = False, progress: bool = True) -> TrainOutputs:
    """Train the reconstruction network on slices with freshly simulated measurements; the best
    validation SSIM (per volume, masks seeded from the case ids) is kept.

    Args:
        cfg: validated run config (``task: reconstruction``).
        manifest_path: manifest CSV of fully sampled images (already verified); labels are ignored.
        root: data root of the manifest's paths.
        out_dir: run directory.
        tracker: MLflow run (a no-op tracker off the main process).
        resume: continue from ``out_dir/checkpoints/last.safetensors``.
        progress: show progress bars.
    """
    manifest = read_manifest(manifest_path)
    acquisition = Acquisition(cfg.recon)
    baseline = acquisition.baseline_name

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

    task = TrainTask(
        build_network=lambda: build_network(cfg),
        train_items=records(split_cases(cfg, manifest, "train"), root, with_label=False),
        val_items=records(split_cases(cfg, manifest, "val"), root, with_label=False),
        train_transform=reconstruction_training_transforms(cfg.preprocess, cfg.recon, cfg.augment,
                                                           acquisition),
        val_transform=reconstruction_eval_transforms(cfg.preprocess, cfg.recon),
        loss=create_reconstruction_loss(cfg.loss),
        validate=validate,
        selection_metric=SELECTION_METRIC,
        default_num_workers=LOADER_WORKERS,
        preview=_slice_preview(cfg) if cfg.validation.overlays else None,
    )
    return fit(cfg, task, out_dir, tracker, resume=resume, progress=progress)


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


def evaluate(cfg: ReconstructionConfig, items: list[dict[str, Any]], checkpoint: Path, out_dir: Path, name: str,
             tracker: MlflowTracker | None = None, progress: bool = True, prefix: str | None = None) -> EvalOutputs:
    """Score a checkpoint on whole volumes: per-case CSV (network and baseline side by side),
    metrics JSON and image grids (input, output, target, error) of the first few cases.

    Metric names are ``{prefix}/psnr``, ``/ssim``, ``/nmse``, the baseline's ``{prefix}/<baseline>_psnr``...
    and the gains ``{prefix}/psnr_gain``...; ``prefix`` defaults to ``name``.
    """
    prefix = prefix or name
    device = resolve_device(cfg.train.device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    net = build_network(cfg).to(device)
    net.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    dataset = Dataset(items, reconstruction_eval_transforms(cfg.preprocess, cfg.recon))
    rows, kept = _score_dataset(net, dataset, cfg, device, amp_dtype, progress, f"evaluate {name}")
    baseline = Acquisition(cfg.recon).baseline_name
    values = summarise(rows, prefix, baseline)
    fields = ["case_id", "slices", *METRICS, *[f"{baseline}_{m}" for m in METRICS], *[f"{m}_gain" for m in METRICS]]
    per_case = write_csv(out_dir / "evaluation" / f"{name}_cases.csv", fields,
                         [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    metrics_file = atomic_write_text(out_dir / "evaluation" / f"{name}_metrics.json", json.dumps(values, indent=2))
    figures = []
    for case_id, rec in kept:
        row = next(r for r in rows if r["case_id"] == case_id)
        figures.append(reconstruction_grid(
            rec.baseline, rec.output, rec.target, out_dir / "plots" / f"recon_{name}_{case_id}.png",
            f"{name} {case_id}: {baseline} {row[f'{baseline}_psnr']:.2f} dB / SSIM {row[f'{baseline}_ssim']:.3f} -> "
            f"network {row['psnr']:.2f} dB / {row['ssim']:.3f}", baseline))
    log.info("%s: PSNR %.2f dB (%s %.2f), SSIM %.4f (%.4f), NMSE %.4f (%.4f) over %d volume(s)", name,
             values[f"{prefix}/psnr"], baseline, values[f"{prefix}/{baseline}_psnr"], values[f"{prefix}/ssim"],
             values[f"{prefix}/{baseline}_ssim"], values[f"{prefix}/nmse"], values[f"{prefix}/{baseline}_nmse"], len(rows))
    return log_evaluation(tracker, EvalOutputs(per_case, metrics_file, tuple(figures), values))


def split_items(cfg: ReconstructionConfig, manifest_path: Path, root: Path, split: str) -> list[dict[str, Any]]:
    return records(split_cases(cfg, read_manifest(manifest_path), split), root, with_label=False)


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


def package(cfg: ReconstructionConfig, checkpoint: Path, out_dir: Path, tracker: MlflowTracker) -> ModelOutputs:
    """Log the selected checkpoint's network as an MLflow PyTorch model with its I/O contract."""
    contract_path, uri = package_model(build_network(cfg), checkpoint, model_contract(cfg), out_dir, tracker, cfg)
    return ModelOutputs(contract_path, uri)


__all__ = ["EvalOutputs", "ModelOutputs", "VolumeReconstruction", "build_network", "evaluate", "model_contract",
           "package", "reconstruct_volume", "resolve_real_images", "score_volume", "split_items", "train"]
