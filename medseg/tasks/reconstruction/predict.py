"""Batch reconstruction of a folder of images with a model that carries its acquisition contract.

Two modes:

* **retrospective** (default): each input is a fully sampled image. The measurement the model
  was trained for (k-space mask, sparse views, noise) is simulated from it, seeded by the case id
  as in evaluation, and the network's reconstruction *and* the classical baseline are written,
  with NMSE / PSNR / SSIM against the input in the report.
* **measured** (``--measured``): each input already is the degraded image (an FBP, a noisy
  scan); the network's output is written. MRI models need k-space, which a magnitude image does
  not hold, so they take the retrospective mode only.

Outputs are NIfTI on the input's own grid and in its intensity units (the [0, 1] scaling is
undone; orientation and slice-axis moves are inverted with MONAI ``Invertd``), written atomically.
A case that fails is reported and the batch goes on; a rerun skips finished cases.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch import nn

from medseg.config import IntensityConfig, Precision, PreprocessConfig, ReconConfig, ReconProblem
from medseg.engine.runtime import autocast, autocast_dtype
from medseg.errors import MedsegError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import InputCase
from medseg.tasks.reconstruction.operators import Acquisition, case_seed, volume_metrics
from medseg.tasks.reconstruction.training import VolumeReconstruction, pad_slices, reconstruct_volume
from medseg.tasks.reconstruction.transforms import IMAGE, reconstruction_prefix

log = logging.getLogger(__name__)

OUTPUT = "reconstruction"
METRICS = ("psnr", "ssim", "nmse")


@dataclass
class ReconstructedCase:
    case_id: str
    input: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    output: str = ""
    baseline_output: str = ""
    slices: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def contract_recon(contract: dict[str, Any]) -> ReconConfig:
    """The acquisition the model was trained for, from its contract."""
    fields = {k: v for k, v in contract["recon"].items() if k in ReconConfig.model_fields}
    return ReconConfig(**fields)


def recon_preprocessing(contract: dict[str, Any]) -> Compose:
    """Load, orient, resample and move the slice axis last, as training did (without the scaling)."""
    pre = PreprocessConfig(orientation=contract["orientation"],
                           spacing=tuple(contract["spacing"]) if contract.get("spacing") else None,
                           intensity=IntensityConfig(mode="none"))
    return Compose(reconstruction_prefix(pre, contract_recon(contract), scale=False))


class _Ensemble(nn.Module):
    """The mean image of several networks (folds, seeds)."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x) for n in self.networks]).mean(0)


@torch.no_grad()
def _restore_measured(net: nn.Module, volume: torch.Tensor, image_size: tuple[int, int], device: torch.device,
                      batch_size: int = 16) -> torch.Tensor:
    """Network output (S, 1, H, W) for slices that already are the degraded images."""
    net.eval()
    slices = volume.float()[0].permute(2, 0, 1)[:, None]
    h, w = slices.shape[-2:]
    padded, (top, left) = pad_slices(slices, *image_size)
    amp = autocast_dtype(Precision.AUTO, device)
    outputs = []
    for start in range(0, len(padded), batch_size):
        with autocast(amp, device):
            outputs.append(net(padded[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(outputs)[..., top:top + h, left:left + w]


def reconstruct_cases(model: Any, cases: Sequence[InputCase], output_dir: Path, device: torch.device,
                      report_path: Path, measured: bool, overwrite: bool, progress_bar: Any,
                      write_nifti: Any) -> list[ReconstructedCase]:
    """Reconstruct every case; one report row each, the report rewritten after each case."""
    contract = model.contract
    recon = contract_recon(contract)
    acquisition = Acquisition(recon)
    if measured and ReconProblem(recon.problem) == ReconProblem.MRI:
        raise UsageError("--measured: an MRI model needs the measured k-space, which a magnitude image does not "
                         "hold; give fully sampled images (the retrospective mode, without --measured)")
    pre = recon_preprocessing(contract)
    net = model.networks[0] if len(model.networks) == 1 else _Ensemble(model.networks)
    baseline = acquisition.baseline_name
    results: list[ReconstructedCase] = []
    for case in progress_bar(cases):
        started = time.monotonic()
        out_path = output_dir / f"{case.case_id}_{OUTPUT}.nii.gz"
        base_path = output_dir / f"{case.case_id}_{baseline}.nii.gz"
        expected = [out_path] if measured else [out_path, base_path]
        result = ReconstructedCase(case.case_id, str(case.path), "ok", output=str(out_path),
                                   baseline_output="" if measured else str(base_path))
        try:
            if all(p.exists() for p in expected) and not overwrite:
                result.status, result.error = "skipped", "output exists (use --overwrite to redo)"
            else:
                if case.problem:
                    raise MedsegError(case.problem)
                _reconstruct_case(case, pre, net, acquisition, recon, measured, device, out_path, base_path,
                                  write_nifti, result)
        except Exception as err:  # one bad image must not stop the batch
            message = str(err) if isinstance(err, MedsegError) else f"{case.path}: {type(err).__name__}: {err}"
            log.warning("case %s failed: %s", case.case_id, message)
            result = ReconstructedCase(case.case_id, str(case.path), "failed", message)
        result.seconds = time.monotonic() - started
        results.append(result)
        write_report(results, baseline, report_path)
    return results


def _reconstruct_case(case: InputCase, pre: Compose, net: nn.Module, acquisition: Acquisition, recon: ReconConfig,
                      measured: bool, device: torch.device, out_path: Path, base_path: Path, write_nifti: Any,
                      result: ReconstructedCase) -> None:
    try:
        data = pre({IMAGE: str(case.path)})
    except Exception as err:
        from medseg.tasks.classification.predict import _root_cause

        root = _root_cause(err)
        text = str(root).strip().splitlines()[-1][:300] if str(root).strip() else ""
        raise MedsegError(f"{case.path}: could not be read or preprocessed ({type(root).__name__}: {text}). "
                          "Check that it is a complete NIfTI/DICOM/MHA/NRRD image") from err
    image: MetaTensor = data[IMAGE]
    if image.shape[0] != 1 or image.ndim not in (3, 4):
        raise MedsegError(f"{case.path}: reconstruction takes single-channel 2D or 3D images; got shape "
                          f"{tuple(image.shape)}. Give one grey image (or DICOM series) per file; split "
                          "multi-channel or 4D files into one file per channel or time point")
    flat = image.ndim == 3  # a 2D image: one slice
    raw = image.as_tensor().float()
    if flat:
        raw = raw[..., None]
    low, high = float(raw.min()), float(raw.max())
    if high <= low:
        raise MedsegError(f"{case.path}: every voxel has the value {low}, so there is nothing to reconstruct; "
                          "check that the file is the intended scan (not an empty mask or a blank export) "
                          "or remove it from the input folder")
    scaled = (raw - low) / (high - low)
    if measured:
        output = _restore_measured(net, scaled, recon.image_size, device)
        baseline_slices = None
    else:
        rec: VolumeReconstruction = reconstruct_volume(net, scaled, acquisition, case_seed(case.case_id),
                                                       recon.image_size, device, autocast_dtype(Precision.AUTO, device))
        output, baseline_slices = rec.output, rec.baseline
        model_scores, base_scores = volume_metrics(rec.output, rec.target), volume_metrics(rec.baseline, rec.target)
        result.metrics = {**model_scores, **{f"baseline_{k}": v for k, v in base_scores.items()}}
    result.slices = int(output.shape[0])
    original_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)

    def to_native(slices: torch.Tensor) -> np.ndarray:
        volume = slices[:, 0].permute(1, 2, 0)[None] * (high - low) + low  # back to (1, H, W, S), input units
        if flat:
            volume = volume[..., 0]
        data[OUTPUT] = MetaTensor(volume, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        native = Invertd(keys=OUTPUT, transform=pre, orig_keys=IMAGE, nearest_interp=False)(data)[OUTPUT]
        return native.as_tensor()[0].numpy().astype(np.float32)

    if baseline_slices is not None:
        write_nifti(to_native(baseline_slices), original_affine, base_path)
    write_nifti(to_native(output), original_affine, out_path)  # last: its presence marks the case done


def write_report(results: Sequence[ReconstructedCase], baseline: str, path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "input", "status", "error", "seconds", "output", f"{baseline}_output", "slices",
                     *METRICS, *[f"{baseline}_{m}" for m in METRICS]])
    for r in results:
        writer.writerow([r.case_id, r.input, r.status, r.error, f"{r.seconds:.3f}", r.output if r.status == "ok" else "",
                         r.baseline_output if r.status == "ok" else "", r.slices or "",
                         *[f"{r.metrics[m]:.6g}" if m in r.metrics else "" for m in METRICS],
                         *[f"{r.metrics[f'baseline_{m}']:.6g}" if f"baseline_{m}" in r.metrics else "" for m in METRICS]])
    return atomic_write_text(path, buffer.getvalue())
