"""Batch reconstruction of a folder of images with a model that carries its acquisition contract.

Two modes:

* **retrospective** (default): each input is a fully sampled image. The measurement the model
  was trained for (k-space mask, sparse views, noise) is simulated from it, seeded by the case id
  as in evaluation, and the network's reconstruction *and* the classical baseline are written,
  with NMSE / PSNR / SSIM against the input in the report.
* **measured** (``--measured``): each input already is the degraded image (an FBP, a noisy
  scan); the network's output is written. MRI models need k-space, which a magnitude image does
  not hold, so they take the retrospective mode only. A super-resolution model's input is a
  thick-slice scan: it is interpolated onto its thin grid first
  (:mod:`~medseg.tasks.reconstruction.super_resolution`), and the outputs (the network's and the
  linear interpolation, its baseline) are written on that thin grid.

``--tta`` (super-resolution models only): the network's output is averaged over the in-plane flips
its training augmentation made (the contract's ``tta_axes``), in either mode.

Outputs are NIfTI on the input's own grid and in its intensity units (the [0, 1] scaling is
undone; orientation and slice-axis moves are inverted with MONAI ``Invertd``), written atomically.
A case that fails is reported and the batch goes on; a rerun skips finished cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch import nn

from medseg.config import IntensityConfig, IntensityMode, Precision, PreprocessConfig
from medseg.engine.case_io import mean_or_none, read_error, reader_source, shown_source, write_nifti
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.runtime import autocast, autocast_dtype
from medseg.engine.tta import average_predictions, tta_axes
from medseg.errors import CaseError, PredictOptionError, UsageError
from medseg.io.discovery import InputCase
from medseg.io.naming import output_paths
from medseg.io.readers import load_volume
from medseg.tasks.reconstruction.config import ReconConfig, ReconProblem
from medseg.tasks.reconstruction.operators import Acquisition, case_seed, volume_metrics
from medseg.tasks.reconstruction.super_resolution import restore_slices, to_thin_grid
from medseg.tasks.reconstruction.training import METRICS, VolumeReconstruction, pad_slices, reconstruct_volume
from medseg.tasks.reconstruction.transforms import IMAGE, reconstruction_prefix

OUTPUT = "reconstruction"


def contract_recon(contract: dict[str, Any]) -> ReconConfig:
    """The acquisition the model was trained for, from its contract."""
    fields = {k: v for k, v in contract["recon"].items() if k in ReconConfig.model_fields}
    return ReconConfig(**fields)


def recon_preprocessing(contract: dict[str, Any], load: bool = True, allow_constant: bool = False) -> Compose:
    """Load, orient, resample and move the slice axis last, as training did (without the scaling)."""
    pre = PreprocessConfig(orientation=contract["orientation"],
                           spacing=tuple(contract["spacing"]) if contract.get("spacing") else None,
                           intensity=IntensityConfig(mode=IntensityMode.NONE),
                           allow_constant=bool(contract.get("allow_constant", False)) or allow_constant)
    return Compose(reconstruction_prefix(pre, contract_recon(contract), load=load, scale=False))


class _Ensemble(nn.Module):
    """The mean image of several networks (folds, seeds)."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return average_predictions(list(self.networks), x, 2, False, lambda network, image: network(image))


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


def _sr_tta_axes(model: LoadedModel, options: PredictOptions, problem: ReconProblem) -> list[int] | None:
    """The in-plane flips ``--tta`` averages over: the contract's ``tta_axes`` (those the training
    augmentation flipped; :func:`~medseg.engine.tta.tta_axes` refuses a model trained without flips).

    Raises:
        PredictOptionError: ``--tta`` for a reconstruction problem other than super-resolution.
    """
    if options.tta and problem != ReconProblem.SR:
        raise PredictOptionError(
            f"--tta: model {model.uri} reconstructs recon.problem {problem.value}; among reconstruction models "
            "only super-resolution (recon.problem: sr) averages over flips: an MRI network takes the undersampled "
            "k-space with its mask, which a mirrored image does not keep, a CT network's FBP input is never flipped "
            "in training, and denoising has not been measured with it. Leave --tta out")
    return tta_axes(model.contract, options.tta, f"model {model.uri}")


class ReconstructionPredictor:
    """Reconstructions (and their baselines) for the images of a folder or in memory."""

    output_columns: tuple[str, ...]

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model = model
        self.options = options
        self.device = device
        self.recon = contract_recon(model.contract)
        self.acquisition = Acquisition(self.recon)
        if options.measured and ReconProblem(self.recon.problem) == ReconProblem.MRI:
            raise UsageError("--measured: an MRI model needs the measured k-space, which a magnitude image does not "
                             "hold; give fully sampled images (the retrospective mode, without --measured)")
        self.baseline = self.acquisition.baseline_name
        #: a thick-slice scan, super-resolved on its thin grid (with the interpolation written beside it)
        self.thin_grid = options.measured and ReconProblem(self.recon.problem) == ReconProblem.SR
        with_baseline = not options.measured or self.thin_grid
        self.output_columns = ("output", f"{self.baseline}_output") if with_baseline else ("output",)
        self.value_columns = ["slices", *METRICS, *(f"{self.baseline}_{m}" for m in METRICS)]
        self.net = model.networks[0] if len(model.networks) == 1 else _Ensemble(model.networks)
        self.flip_axes = _sr_tta_axes(model, options, ReconProblem(self.recon.problem))
        self._chains = {load: recon_preprocessing(model.contract, load, options.allow_constant) for load in (True, False)}

    def _on_thin_grid(self, image: str | Path | Sequence[str | Path] | MetaTensor, source: str) -> MetaTensor:
        """A thick-slice scan interpolated onto its thin grid (super-resolution, measured)."""
        try:
            volume = image if isinstance(image, MetaTensor) else load_volume(reader_source(image))
        except Exception as err:
            raise read_error(source, err) from err
        return to_thin_grid(volume, self.model.contract.get("orientation"), self.recon.sr, source)

    def predict(self, image: str | Path | Sequence[str | Path] | MetaTensor, case_id: str) -> Prediction:
        loaded = isinstance(image, MetaTensor)
        source = case_id if loaded else shown_source(image)
        if self.thin_grid:
            image, loaded = self._on_thin_grid(image, source), True
        chain = self._chains[not loaded]
        try:
            data = chain({IMAGE: image if loaded else reader_source(image)})
        except Exception as err:
            raise read_error(source, err) from err
        volume: MetaTensor = data[IMAGE]
        if volume.shape[0] != 1 or volume.ndim not in (3, 4):
            raise CaseError(f"{source}: reconstruction takes single-channel 2D or 3D images; got shape "
                            f"{tuple(volume.shape)}. Give one grey image (or DICOM series) per file; split "
                            "multi-channel or 4D files into one file per channel or time point")
        flat = volume.ndim == 3  # a 2D image: one slice
        raw = volume.as_tensor().float()
        if flat:
            raw = raw[..., None]
        low, high = float(raw.min()), float(raw.max())
        if high <= low:
            raise CaseError(f"{source}: every voxel has the value {low}, so there is nothing to reconstruct; "
                            "check that the file is the intended scan (not an empty mask or a blank export) "
                            "or remove it from the input folder")
        scaled = (raw - low) / (high - low)
        metrics: dict[str, float] = {}
        baseline_slices = None
        if self.thin_grid:
            output = restore_slices(self.net, scaled, self.recon.image_size, self.device,
                                    autocast_dtype(Precision.AUTO, self.device), context=self.recon.sr.context,
                                    tta=self.options.tta, axes=self.flip_axes)
            baseline_slices = scaled[0].permute(2, 0, 1)[:, None]  # the interpolated thick slices it started from
        elif self.options.measured:
            output = _restore_measured(self.net, scaled, self.recon.image_size, self.device)
        else:
            rec: VolumeReconstruction = reconstruct_volume(self.net, scaled, self.acquisition, case_seed(case_id),
                                                           self.recon.image_size, self.device,
                                                           autocast_dtype(Precision.AUTO, self.device),
                                                           tta=self.options.tta, axes=self.flip_axes)
            output, baseline_slices = rec.output, rec.baseline
            scores, base_scores = volume_metrics(rec.output, rec.target), volume_metrics(rec.baseline, rec.target)
            metrics = {**scores, **{f"{self.baseline}_{k}": v for k, v in base_scores.items()}}
        affine = np.asarray(volume.meta["original_affine"], dtype=np.float64)

        def to_native(slices: torch.Tensor) -> np.ndarray:
            restored = slices[:, 0].permute(1, 2, 0)[None] * (high - low) + low  # back to (1, H, W, S), input units
            if flat:
                restored = restored[..., 0]
            data[OUTPUT] = MetaTensor(restored, meta=dict(volume.meta), applied_operations=list(volume.applied_operations))
            native = Invertd(keys=OUTPUT, transform=chain, orig_keys=IMAGE, nearest_interp=False)(data)[OUTPUT]
            return native.as_tensor()[0].numpy().astype(np.float32)

        return Prediction(case_id, "reconstruction", affine, reconstruction=to_native(output),
                          baseline=None if baseline_slices is None else to_native(baseline_slices),
                          metrics={"slices": float(output.shape[0]), **metrics})

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        suffixes = {"output": f"_{OUTPUT}.nii.gz"}
        if not self.options.measured or self.thin_grid:
            suffixes[f"{self.baseline}_output"] = f"_{self.baseline}.nii.gz"
        return output_paths(output_dir, case.case_id, suffixes)  # a long case name shortened, with its hash

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        paths = self.expected_outputs(case, output_dir)
        prediction = self.predict(case.source, case.case_id)
        outputs: dict[str, str] = {}
        if prediction.baseline is not None:
            key = f"{self.baseline}_output"
            outputs[key] = str(write_nifti(prediction.baseline, prediction.affine, paths[key]))
        # last: its presence marks the case done
        outputs["output"] = str(write_nifti(cast(np.ndarray, prediction.reconstruction), prediction.affine,
                                            paths["output"]))
        metrics = dict(prediction.metrics)
        values: dict[str, Any] = {"slices": int(metrics.pop("slices")), **metrics}
        return CaseResult(case.case_id, case.shown, "ok", outputs=outputs, values=values)

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        scored = [r.values for r in results if r.status == "ok" and METRICS[0] in r.values]
        keys = [*METRICS, *(f"{self.baseline}_{m}" for m in METRICS)]
        means = {k: mean_or_none([float(v[k]) for v in scored if k in v]) for k in keys} if scored else {}
        return ({"mode": "measured" if self.options.measured else "retrospective", "mean_metrics": means},
                {f"predict/{k}": v for k, v in means.items() if v is not None})
