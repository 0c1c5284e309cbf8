"""Batch translation with a model that carries its contrasts in its contract.

Each case lists its contrasts as channels (a list of files, ``_0000``, ``_0001``... in a folder),
in the order of the contract's ``channel_names``:

* **retrospective** (default): every contrast, the target included. The target is synthesised
  from the inputs and scored against the real one (PSNR / SSIM / MAE, and the baseline's); the
  outputs are written in the target's intensity units.
* **measured** (``--measured``): the input contrasts only (the contract's ``input_channels``);
  the synthesised contrast is written scaled to [0, 1], as the network was trained.

Four files per case on the input's own grid (orientation and slice-axis moves inverted with MONAI
``Invertd``, so the affine and the spacing are the input's): the synthesised contrast
(``_translation``), the histogram-matching baseline (``_histmatch``), the uncertainty map (the
standard deviation of the in-plane flips per voxel, ``_uncertainty``) and the trusted mask (1 where
the uncertainty is at most the threshold chosen on validation, ``_trusted``). ``Prediction``
carries the uncertainty as ``variance`` (its square) and the trusted mask as ``label_map``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg.config import Precision
from medseg.engine.case_io import mean_or_none, read_error, reader_source, shown_source, write_nifti
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.runtime import autocast_dtype
from medseg.errors import CaseError
from medseg.io.discovery import InputCase
from medseg.io.naming import output_paths
from medseg.tasks.reconstruction.predict import contract_recon, recon_preprocessing
from medseg.tasks.reconstruction.transforms import IMAGE
from medseg.tasks.reconstruction.translation import (
    BASELINE,
    METRICS,
    histogram_matched,
    translate_volume,
    volume_scores,
)

OUTPUT = "translation"
SUFFIXES = {"output": f"_{OUTPUT}.nii.gz", f"{BASELINE}_output": f"_{BASELINE}.nii.gz",
            "uncertainty": "_uncertainty.nii.gz", "trusted": "_trusted.nii.gz"}


class TranslationPredictor:
    """The synthesised contrast, its baseline, uncertainty and trusted mask for each case."""

    value_columns = ["slices", *METRICS, *(f"{BASELINE}_{m}" for m in METRICS), "uncertainty_mean",
                     "trusted_fraction"]

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        contract = model.contract
        self.model, self.options, self.device = model, options, device
        self.recon = contract_recon(contract)
        names = [str(c) for c in contract["channel_names"]]
        self.inputs = [str(c) for c in contract["input_channels"]]
        self.target = str(contract["target_channel"])
        self.expected = self.inputs if options.measured else names
        self.input_index = [self.expected.index(c) for c in self.inputs]
        self.target_index = None if options.measured else names.index(self.target)
        translation = self.recon.translation
        self.baseline_index = self.inputs.index(translation.baseline_input(names)) if translation else 0
        self.quantiles = contract.get("reference_quantiles")
        self.threshold = contract.get("trust_threshold")
        self.axes = [int(a) for a in contract.get("tta_axes") or (0, 1)]
        self.output_columns = tuple(k for k in SUFFIXES if self._writes(k))
        self.net = model.networks[0]
        self._chains = {load: recon_preprocessing(contract, load, options.allow_constant) for load in (True, False)}

    def _writes(self, column: str) -> bool:
        return {f"{BASELINE}_output": self.quantiles is not None, "trusted": self.threshold is not None}.get(column, True)

    def _load(self, image: str | Path | Sequence[str | Path] | MetaTensor,
              source: str) -> tuple[dict, MetaTensor, Compose]:
        loaded = isinstance(image, MetaTensor)
        chain = self._chains[not loaded]
        try:
            data = chain({IMAGE: image if loaded else reader_source(image)})
        except Exception as err:
            raise read_error(source, err) from err
        volume: MetaTensor = data[IMAGE]
        if volume.ndim != 4 or volume.shape[0] != len(self.expected):
            raise CaseError(f"{source}: Expected {len(self.expected)} contrast(s) {self.expected} as channels of one "
                            f"3D grid ({'--measured: the inputs only' if self.options.measured else 'the target too'}). "
                            f"Got shape {tuple(volume.shape)}. File: {source}. Fix: give one file per contrast in that "
                            f"order (case_0000, case_0001, ...){'' if self.options.measured else ', or use --measured'}")
        return data, volume, chain

    def predict(self, image: str | Path | Sequence[str | Path] | MetaTensor, case_id: str) -> Prediction:
        source = case_id if isinstance(image, MetaTensor) else shown_source(image)
        data, volume, chain = self._load(image, source)
        raw = volume.as_tensor().float()
        low, high = raw.flatten(1).min(1).values, raw.flatten(1).max(1).values
        if bool((high <= low).any()):
            flat = [self.expected[i] for i in torch.nonzero(high <= low).flatten().tolist()]
            raise CaseError(f"{source}: contrast(s) {flat} hold one value everywhere; Expected a scan, Got a constant "
                            "image. Check the files of that channel")
        scaled = (raw - low[:, None, None, None]) / (high - low)[:, None, None, None]
        inputs = scaled[self.input_index]
        out = translate_volume(self.net, inputs, self.recon.image_size, self.device,
                               autocast_dtype(Precision.AUTO, self.device), True, self.axes)
        baseline = None
        if self.quantiles is not None:
            matched = histogram_matched(inputs[self.baseline_index:self.baseline_index + 1], self.quantiles)
            baseline = torch.from_numpy(matched).permute(3, 0, 1, 2)
        metrics: dict[str, float] = {"slices": float(out.output.shape[0]), "uncertainty_mean": float(out.spread.mean())}
        unit_low, unit_span = 0.0, 1.0
        if self.target_index is not None:
            target = scaled[self.target_index:self.target_index + 1].permute(3, 0, 1, 2)
            metrics.update(volume_scores(out.output, target))
            if baseline is not None:
                metrics.update({f"{BASELINE}_{k}": v for k, v in volume_scores(baseline, target).items()})
            unit_low, unit_span = float(low[self.target_index]), float(high[self.target_index] - low[self.target_index])
        trusted = None
        if self.threshold is not None:
            trusted = (out.spread <= float(self.threshold)).float()
            metrics["trusted_fraction"] = float(trusted.mean())

        def to_native(slices: torch.Tensor, nearest: bool = False) -> np.ndarray:
            data[OUTPUT] = MetaTensor(slices[:, 0].permute(1, 2, 0)[None], meta=dict(volume.meta),
                                      applied_operations=list(volume.applied_operations))
            native = Invertd(keys=OUTPUT, transform=chain, orig_keys=IMAGE, nearest_interp=nearest)(data)[OUTPUT]
            return native.as_tensor()[0].numpy().astype(np.float32)

        affine = np.asarray(volume.meta["original_affine"], dtype=np.float64)
        return Prediction(case_id, "reconstruction", affine,
                          reconstruction=to_native(out.output * unit_span + unit_low),
                          baseline=None if baseline is None else to_native(baseline * unit_span + unit_low),
                          variance=to_native((out.spread * unit_span) ** 2),
                          label_map=None if trusted is None else to_native(trusted, nearest=True).astype(np.uint8),
                          metrics=metrics)

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return output_paths(output_dir, case.case_id, {k: v for k, v in SUFFIXES.items() if self._writes(k)})

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        paths = self.expected_outputs(case, output_dir)
        p = self.predict(case.source, case.case_id)
        arrays = {f"{BASELINE}_output": p.baseline, "trusted": p.label_map,
                  "uncertainty": None if p.variance is None else np.sqrt(p.variance)}
        outputs = {key: str(write_nifti(array, p.affine, paths[key])) for key, array in arrays.items()
                   if array is not None and key in paths}
        # last: its presence marks the case done
        outputs["output"] = str(write_nifti(cast(np.ndarray, p.reconstruction), p.affine, paths["output"]))
        values: dict[str, Any] = {"slices": int(p.metrics["slices"]),
                                  **{k: v for k, v in p.metrics.items() if k != "slices"}}
        return CaseResult(case.case_id, case.shown, "ok", outputs=outputs, values=values)

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        scored = [r.values for r in results if r.status == "ok"]
        keys = [k for k in self.value_columns if k != "slices"]
        means = {k: mean_or_none([float(v[k]) for v in scored if k in v]) for k in keys}
        return ({"mode": "measured" if self.options.measured else "retrospective", "mean_metrics": means},
                {f"predict/{k}": v for k, v in means.items() if v is not None})


__all__ = ["TranslationPredictor"]
