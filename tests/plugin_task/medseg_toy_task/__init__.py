"""A fourth task outside medseg, written against ``medseg.tasks.kit`` alone: regress the mean
intensity of a 2D image (registered through the ``medseg.tasks`` entry-point group by
``tests/test_plugin_task.py``, without touching any file in ``medseg/``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, MapTransform, RandFlipd, Resized
from torch import nn

from medseg.tasks import kit

NAME = "toy_regression"


class ToyModelConfig(kit.ModelConfig):
    name: str = "tiny_regressor"
    spatial_dims: Literal[2] = 2
    channels: tuple[int, ...] = (4, 8)


class ToyLossConfig(kit.LossConfig):
    name: Literal["mse"] = "mse"


class ToyConfig(kit.RunConfig):
    task: Literal["toy_regression"] = "toy_regression"
    model: ToyModelConfig = ToyModelConfig()
    loss: ToyLossConfig = ToyLossConfig()
    size: tuple[int, int] = (16, 16)


@kit.register_model(NAME, "tiny_regressor")
def _tiny_regressor(cfg: ToyModelConfig, in_channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    for width in cfg.channels:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 1))


class MeanTarget(MapTransform):
    """The target: the image's mean intensity."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        out["label"] = torch.as_tensor(out["image"]).float().mean().reshape(1)
        return out


def _chain(size: Sequence[int], load: bool = True) -> list[Any]:
    head = [kit.make_load_transform(["image"])] if load else []
    return [*head, EnsureTyped(keys="image", dtype=np.float32), Resized(keys="image", spatial_size=list(size))]


class ToyPredictor(kit.ValuePredictor):
    value_columns = ("predicted_mean",)

    def __init__(self, model: kit.LoadedModel, options: kit.PredictOptions, device: torch.device):
        self.model, self.device = model, device
        size = model.contract["size"]
        self.chains = {True: Compose(_chain(size)), False: Compose(_chain(size, load=False))}

    @torch.no_grad()
    def predict(self, image: str | Path | MetaTensor, case_id: str) -> kit.Prediction:
        loaded = isinstance(image, MetaTensor)
        try:
            x = self.chains[not loaded]({"image": image if loaded else str(image)})["image"]
        except Exception as err:
            raise kit.read_error(case_id if loaded else image, err) from err
        values = [float(net(torch.as_tensor(x)[None].to(self.device))[0, 0]) for net in self.model.networks]
        return kit.Prediction(case_id, NAME, np.eye(4), metrics={"predicted_mean": float(np.mean(values))})


class ToyRegressionTask(kit.TaskBase):
    name = NAME
    config_type = ToyConfig
    predict_options: frozenset[str] = frozenset()
    selection_metric = "val/neg_mse"
    uses_labels = False  # the target is computed from the image

    def build_network(self, cfg: Any) -> nn.Module:
        return kit.create_model(NAME, cfg.model.name, cfg.model, len(cfg.data.channels))

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        train = Compose([*_chain(cfg.size), RandFlipd(keys="image", prob=0.5, spatial_axis=0), MeanTarget(keys="image")])
        return train, Compose([*_chain(cfg.size), MeanTarget(keys="image")])

    def create_loss(self, cfg: Any) -> nn.Module:
        return nn.MSELoss()

    def score(self, network: nn.Module, dataset: Any, device: torch.device, prefix: str) -> dict[str, float]:
        was_training = network.training
        network.eval()
        with torch.no_grad():
            errors = [float((network(item["image"][None].to(device))[0] - item["label"].to(device)).pow(2).mean())
                      for item in dataset]
        network.train(was_training)
        mse = float(np.mean(errors)) if errors else float("nan")
        return {f"{prefix}/neg_mse": -mse, f"{prefix}/mse": mse}

    def contract_extras(self, cfg: Any) -> dict[str, Any]:
        return {"size": list(cfg.size), "output_activation": "identity"}

    def case_predictor(self, model: kit.LoadedModel, options: kit.PredictOptions, device: torch.device) -> ToyPredictor:
        return ToyPredictor(model, options, device)


TASK = ToyRegressionTask()
