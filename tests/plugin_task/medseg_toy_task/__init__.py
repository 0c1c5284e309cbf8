"""A fourth task that lives outside medseg: regress the mean intensity of a 2D image.

It reaches medseg only through its public extension points: a config class (``RunConfig``
subclass), the model registry, the engine's loop, packaging and batch-predict driver, and the
``medseg.tasks`` entry-point group (see ``tests/test_plugin_task.py``, which registers it without
touching any file in ``medseg/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import Compose, EnsureTyped, MapTransform, RandFlipd, Resized
from torch import nn

from medseg.config import LossConfig, ModelConfig, RunConfig
from medseg.data.datasets import records
from medseg.data.manifest import read_manifest
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.loop import ModelOutputs, TrainTask, base_contract, fit, package_model, split_cases
from medseg.engine.models import create_model, register_model
from medseg.engine.predict import CaseResult, LoadedModel, Prediction, PredictOptions, read_error
from medseg.io.discovery import InputCase
from medseg.io.readers import make_load_transform
from medseg.tasks.base import TaskBase

NAME = "toy_regression"


class ToyModelConfig(ModelConfig):
    name: str = "tiny_regressor"
    spatial_dims: Literal[2] = 2
    channels: tuple[int, ...] = (4, 8)


class ToyLossConfig(LossConfig):
    name: Literal["mse"] = "mse"


class ToyConfig(RunConfig):
    task: Literal["toy_regression"] = "toy_regression"
    model: ToyModelConfig = ToyModelConfig()
    loss: ToyLossConfig = ToyLossConfig()
    size: tuple[int, int] = (16, 16)


class TinyRegressor(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for width in channels:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
            in_channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(NAME, "tiny_regressor")
def _tiny_regressor(cfg: ToyModelConfig, in_channels: int) -> nn.Module:
    return TinyRegressor(in_channels, cfg.channels)


class MeanTarget(MapTransform):
    """The target: the image's mean intensity."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        out["label"] = torch.as_tensor(out["image"]).float().mean().reshape(1)
        return out


def _chain(size: Sequence[int], load: bool = True) -> list[Any]:
    head = [make_load_transform(["image"])] if load else []
    return [*head, EnsureTyped(keys="image", dtype=np.float32), Resized(keys="image", spatial_size=list(size))]


class ToyPredictor:
    output_columns: tuple[str, ...] = ()
    value_columns = ("predicted_mean",)

    def __init__(self, model: LoadedModel, options: PredictOptions, device: torch.device):
        self.model, self.device = model, device
        size = model.contract["size"]
        self.chains = {True: Compose(_chain(size)), False: Compose(_chain(size, load=False))}

    @torch.no_grad()
    def predict(self, image: str | Path | MetaTensor, case_id: str) -> Prediction:
        loaded = isinstance(image, MetaTensor)
        try:
            x = self.chains[not loaded]({"image": image if loaded else str(image)})["image"]
        except Exception as err:
            raise read_error(case_id if loaded else image, err) from err
        values = [float(net(torch.as_tensor(x)[None].to(self.device))[0, 0]) for net in self.model.networks]
        return Prediction(case_id, NAME, np.eye(4), metrics={"predicted_mean": float(np.mean(values))})

    def expected_outputs(self, case: InputCase, output_dir: Path) -> dict[str, Path]:
        return {}

    def predict_case(self, case: InputCase, output_dir: Path) -> CaseResult:
        prediction = self.predict(case.path, case.case_id)
        return CaseResult(case.case_id, str(case.path), "ok", values=dict(prediction.metrics))

    def values_of_finished(self, case: InputCase, outputs: dict[str, Path]) -> dict[str, Any]:
        return {}

    def summarise(self, results: Sequence[CaseResult]) -> tuple[dict[str, Any], dict[str, float]]:
        return {}, {}


class ToyRegressionTask(TaskBase):
    name = NAME
    config_type = ToyConfig
    predict_options: frozenset[str] = frozenset()
    selection_metric = "val/neg_mse"

    def build_network(self, cfg: Any) -> nn.Module:
        return create_model(NAME, cfg.model.name, cfg.model, len(cfg.data.channels))

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        train = Compose([*_chain(cfg.size), RandFlipd(keys="image", prob=0.5, spatial_axis=0), MeanTarget(keys="image")])
        return train, Compose([*_chain(cfg.size), MeanTarget(keys="image")])

    def create_loss(self, cfg: Any) -> nn.Module:
        return nn.MSELoss()

    def _mse(self, net: nn.Module, dataset: Any, device: torch.device) -> float:
        net.eval()
        errors = [float((net(item["image"][None].to(device))[0] - item["label"].to(device)).pow(2).mean())
                  for item in dataset]
        net.train()
        return float(np.mean(errors)) if errors else float("nan")

    def train(self, ctx: Any) -> Any:
        cfg, manifest = ctx.cfg, read_manifest(ctx.manifest)
        train_tf, val_tf = self.transforms(cfg)
        loss = self.create_loss(cfg)
        task = TrainTask(
            build_network=lambda: self.build_network(cfg),
            train_items=records(split_cases(cfg, manifest, "train"), ctx.root, with_label=False),
            val_items=records(split_cases(cfg, manifest, "val"), ctx.root, with_label=False),
            train_transform=train_tf, val_transform=val_tf,
            loss=lambda output, label: loss(output, label.float()),
            validate=lambda net, dataset, device, amp, show: {"val/neg_mse": -self._mse(net, dataset, device)},
            selection_metric=self.selection_metric,
        )
        return fit(cfg, task, ctx.run_dir, ctx.tracker, resume=ctx.resume, progress=ctx.progress)

    def evaluate(self, ctx: Any, checkpoint: Path, split: str, prefix: str) -> dict[str, float]:
        cases = split_cases(ctx.cfg, read_manifest(ctx.manifest), split)
        if not cases:
            return {}
        net = self.build_network(ctx.cfg)
        net.load_state_dict(load_checkpoint(checkpoint)["model"])
        dataset = Dataset(records(cases, ctx.root, with_label=False), self.transforms(ctx.cfg)[1])
        return {f"{prefix}/mse": self._mse(net, dataset, torch.device("cpu"))}

    def package(self, ctx: Any, checkpoint: Path) -> ModelOutputs:
        contract_path, uri = package_model(self.build_network(ctx.cfg), checkpoint, self.contract(ctx.cfg),
                                           ctx.run_dir, ctx.tracker, ctx.cfg)
        return ModelOutputs(contract_path, uri)

    def contract(self, cfg: Any) -> dict[str, Any]:
        return {**base_contract(cfg), "size": list(cfg.size), "output_activation": "identity"}

    def case_predictor(self, model: LoadedModel, options: PredictOptions, device: torch.device) -> ToyPredictor:
        return ToyPredictor(model, options, device)


TASK = ToyRegressionTask()
