"""Regression of one image with a loaded model: every target in its own units, averaged over
the ensemble's members and (with TTA) the axis flips the model trained with; where there are
several such predictions, their spread gives a prediction interval.

A batch's report has, per target, ``predicted_<column>`` and, with TTA or an ensemble,
``<column>_sd``, ``<column>_low`` and ``<column>_high`` (mean ± 1.96 SD over the predictions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import Precision
from medseg.engine.case_io import preprocess_case
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import Prediction, PredictOptions
from medseg.engine.runtime import autocast, autocast_dtype
from medseg.engine.tta import flip_combinations, flip_spatial, tta_axes
from medseg.engine.value_predictor import ValuePredictor
from medseg.tasks.regression.normalisation import TargetNormaliser
from medseg.tasks.regression.transforms import regression_preprocessing

#: How many standard deviations either side of the mean the prediction interval reaches (95% if normal).
INTERVAL_Z = 1.96


class RegressionPredictor(ValuePredictor):
    """The targets of the images of a folder or in memory."""

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model, self.options, self.device = model, options, device
        self.members = [(net, TargetNormaliser.from_contract(contract.get("targets"), f"model {uri}"))
                        for (net, contract), uri in zip(model.members(), model.uris)]
        self.columns = self.members[0][1].columns
        self.flips = flip_combinations(int(model.contract["spatial_dims"]), options.tta,
                                       tta_axes(model.contract, options.tta, f"model {model.uri}"))
        self.with_interval = len(self.flips) * len(self.members) > 1
        spread = [f"{c}_{k}" for c in self.columns for k in ("sd", "low", "high")] if self.with_interval else []
        self.value_columns = (*(f"predicted_{c}" for c in self.columns), *spread)
        self._chains = {load: regression_preprocessing(model.contract, load, options.allow_constant)
                        for load in (True, False)}

    @torch.no_grad()
    def samples(self, image: torch.Tensor) -> np.ndarray:
        """``(members x flips, targets)``: every prediction in the targets' units."""
        dims = int(self.model.contract["spatial_dims"])
        amp = autocast_dtype(Precision.AUTO, self.device)
        x = image[None].to(self.device)
        out = []
        for network, targets in self.members:
            for flip in self.flips:
                with autocast(amp, self.device):
                    y = network(flip_spatial(x, flip, dims))
                out.append(targets.denormalise(y[0].float().cpu().numpy()))
        return np.stack(out)

    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        volume, _ = preprocess_case(self._chains, image, case_id, self.model.contract)
        samples = self.samples(torch.as_tensor(volume))
        values: dict[str, float] = {}
        for j, column in enumerate(self.columns):
            mean = float(samples[:, j].mean())
            values[f"predicted_{column}"] = mean
            if self.with_interval:
                sd = float(samples[:, j].std(ddof=1))
                values.update({f"{column}_sd": sd, f"{column}_low": mean - INTERVAL_Z * sd,
                               f"{column}_high": mean + INTERVAL_Z * sd})
        affine = np.asarray(volume.meta.get("original_affine", volume.affine), dtype=np.float64)
        return Prediction(case_id, "regression", affine, metrics=values)
