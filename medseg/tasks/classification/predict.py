"""Classification of one image with a loaded model: class probabilities, TTA/ensemble averaged.

A batch's report has the evaluation stage's per-case columns (``label, predicted,
predicted_name, prob_<class>...``; ``label`` stays empty here) beside the driver's common ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Resized
from torch import nn

from medseg.config import Precision
from medseg.data.transforms import IMAGE, preprocessing_from_contract
from medseg.engine.calibration import contract_temperature
from medseg.engine.case_io import preprocess_case
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CaseResult, Prediction, PredictOptions
from medseg.engine.runtime import autocast, autocast_dtype
from medseg.engine.tta import average_predictions, tta_axes
from medseg.engine.uncertainty import normalised_entropy
from medseg.io.discovery import InputCase
from medseg.tasks.classification.metrics import class_probabilities


def classification_preprocessing(contract: dict[str, Any], load: bool = True, allow_constant: bool = False) -> Compose:
    """The contract's deterministic chain followed by the resize to the network input."""
    chain = list(preprocessing_from_contract(contract, load=load, allow_constant=allow_constant).transforms)
    if contract.get("resize"):
        chain.append(Resized(keys=IMAGE, spatial_size=list(contract["resize"]), mode="area"))
    return Compose(chain)


class ClassificationPredictor:
    """Class probabilities for the images of a folder or in memory."""

    output_columns: tuple[str, ...] = ()

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model = model
        self.options = options
        self.device = device
        self.names = model.label_names
        self.flip_axes = tta_axes(model.contract, options.tta, f"model {model.uri}")
        self.value_columns = ["label", "predicted", "predicted_name", *(f"prob_{n}" for n in self.names.values()),
                              "entropy", "max_probability"]
        self._chains = {load: classification_preprocessing(model.contract, load, options.allow_constant)
                        for load in (True, False)}

    @torch.no_grad()
    def class_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (K,) averaged over the ensemble's members and, with TTA, all axis flips."""
        dims = int(self.model.contract["spatial_dims"])
        head = self.model.contract.get("output_activation", "softmax")
        amp = autocast_dtype(Precision.AUTO, self.device)

        def run(member: tuple[nn.Module, dict[str, Any]], x: torch.Tensor) -> torch.Tensor:
            with autocast(amp, self.device):
                logits = member[0](x)
            if head == "softmax":  # each member's own temperature (fitted on its validation split)
                logits = logits.float() / contract_temperature(member[1])
            return class_probabilities(logits, head)[0].float().cpu()

        x = image[None].to(self.device)
        return average_predictions(self.model.members(), x, dims, self.options.tta, run, spatial_output=False,
                                   axes=self.flip_axes)

    def predict(self, image: str | Path | Sequence[str | Path] | MetaTensor, case_id: str) -> Prediction:
        volume, _ = preprocess_case(self._chains, image, case_id, self.model.contract)
        probs = self.class_probabilities(torch.as_tensor(volume))
        k = int(probs.argmax())
        affine = np.asarray(volume.meta.get("original_affine", volume.affine), dtype=np.float64)
        return Prediction(case_id, "classification", affine, probabilities=probs.numpy(),
                          class_probabilities={n: float(probs[i]) for i, n in self.names.items()},
                          predicted_class=self.names[k],
                          uncertainty={"entropy": float(normalised_entropy(probs)), "max_probability": float(probs[k])})

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return {}  # the report row is the output

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        prediction = self.predict(case.source, case.case_id)
        index = {n: i for i, n in self.names.items()}[str(prediction.predicted_class)]
        values: dict[str, Any] = {"label": "", "predicted": index, "predicted_name": prediction.predicted_class,
                                  **{f"prob_{n}": round(p, 6) for n, p in prediction.class_probabilities.items()},
                                  **{k: round(float(v), 6) for k, v in prediction.uncertainty.items() if v is not None}}
        return CaseResult(case.case_id, case.shown, "ok", values=values)

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}  # unreachable: a classified case is known by its report row

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        predicted = [r.values.get("predicted_name") for r in results if r.status in ("ok", "skipped")]
        return {"predicted_counts": {name: predicted.count(name) for name in self.names.values()}}, {}
