"""The protocol every task implements, and the defaults most tasks share.

A task is everything that differs between segmentation, classification and reconstruction: its
config class, its networks, transforms, losses and metrics, its train / evaluate / package
stages, its contract and how it predicts one case. The engine (loop, checkpoints, distributed,
sliding window, batch prediction) and the run / predict drivers know nothing else about it, so a
new task is a new package plus one registry entry (see :mod:`medseg.tasks.registry`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from monai.transforms import Compose
from torch import nn

from medseg.config import RunConfig
from medseg.data.verify import VerifyOptions
from medseg.engine.loop import ModelOutputs, TrainOutputs
from medseg.engine.predict import CasePredictor, LoadedModel, PredictOptions
from medseg.engine.runner import PipelineContext


@runtime_checkable
class Task(Protocol):
    """What a task provides. medseg's three implement it; so can a separate package.

    Attributes:
        name: the value of ``task:`` in a config, and of ``task`` in a model's contract.
        config_type: the task's config class (a :class:`~medseg.config.RunConfig` subclass whose
            ``task`` field is ``Literal[name]``); its sections are typed, required ones required.
        predict_options: the :class:`~medseg.engine.predict.PredictOptions` fields, beyond the ones
            every task honours, that this task's prediction uses; the driver refuses the others.
        selection_metric: the validation metric whose maximum picks ``best.safetensors``.
    """

    name: str
    config_type: type[RunConfig]
    predict_options: frozenset[str]
    selection_metric: str

    def build_network(self, cfg: Any) -> nn.Module:
        """The untrained network the config describes (also what a checkpoint is loaded into)."""
        ...

    def describe_input(self, cfg: Any) -> str:
        """A few words on what the network takes (``patch [96, 96, 96]``), for ``medseg validate``."""
        ...

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        """The training chain (its deterministic prefix is cached) and the validation chain."""
        ...

    def create_loss(self, cfg: Any) -> nn.Module:
        """``loss(network output, batch label) -> scalar``."""
        ...

    def verify_options(self, cfg: Any) -> VerifyOptions:
        """How ``verify`` checks this task's data (label values, class labels, dimensions)."""
        ...

    def prepare_data(self, cfg: Any, root: Path, progress: bool) -> None:
        """Write the data the config generates itself, before anything reads the manifest."""
        ...

    def train(self, ctx: PipelineContext) -> TrainOutputs:
        """The train stage: the engine's loop with this task's network, data, loss and validation."""
        ...

    def evaluate(self, ctx: PipelineContext, checkpoint: Path, split: str, prefix: str) -> dict[str, float]:
        """The evaluate stage: score ``checkpoint`` on ``split`` (metrics named ``<prefix>/...``);
        an empty dict when the split has nothing to score."""
        ...

    def package(self, ctx: PipelineContext, checkpoint: Path) -> ModelOutputs:
        """The package stage: log ``checkpoint``'s network and its contract as an MLflow model."""
        ...

    def contract(self, cfg: Any) -> dict[str, Any]:
        """The model's I/O contract: everything inference needs so that it never guesses."""
        ...

    def case_predictor(self, model: LoadedModel, options: PredictOptions, device: torch.device) -> CasePredictor:
        """What the one batch-predict driver calls for each case of a folder with this task's model."""
        ...

    def plan(self, request: Any, fingerprint: Any) -> Any:
        """``medseg plan``: a :class:`~medseg.planning.plan.Plan` for this task from a
        :class:`~medseg.planning.plan.PlanRequest` and the dataset's fingerprint."""
        ...

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        """One input batch as prediction feeds the network (to export it to ONNX), and whether
        its spatial size varies (sliding windows, slices) or is fixed (a resized image)."""
        ...


class TaskBase:
    """Defaults a task may inherit: no generated data, standard verify options, a network summary,
    and train / package / contract from a stage module (``stages_module``) whose functions are
    ``train(cfg, manifest, root, run_dir, tracker, resume=, progress=)``,
    ``package(cfg, checkpoint, run_dir, tracker)`` and ``model_contract(cfg)``."""

    name: str = ""
    selection_metric: str = "val/loss"
    predict_options: frozenset[str] = frozenset()
    #: the module holding the task's stages, imported on first use (torch-heavy)
    stages_module: str = ""
    #: the manifest's label column holds a class index (classification), not a label-map path
    class_labels: bool = False

    def _stages(self) -> Any:
        if not self.stages_module:
            raise NotImplementedError(f"task {self.name!r}: set stages_module or override train/package/contract")
        return importlib.import_module(self.stages_module)

    def train(self, ctx: PipelineContext) -> TrainOutputs:
        return self._stages().train(ctx.cfg, ctx.manifest, ctx.root, ctx.run_dir, ctx.tracker,  # type: ignore[no-any-return]
                                    resume=ctx.resume, progress=ctx.progress)

    def package(self, ctx: PipelineContext, checkpoint: Path) -> ModelOutputs:
        return self._stages().package(ctx.cfg, checkpoint, ctx.run_dir, ctx.tracker)  # type: ignore[no-any-return]

    def contract(self, cfg: Any) -> dict[str, Any]:
        return self._stages().model_contract(cfg)  # type: ignore[no-any-return]

    def describe_input(self, cfg: Any) -> str:
        return f"{len(cfg.data.channels)} channel(s), {cfg.model.spatial_dims}D"

    def prepare_data(self, cfg: Any, root: Path, progress: bool) -> None:
        return None

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.errors import UsageError

        raise UsageError(f"task {self.name!r} has no planner; write its config by hand (see configs/)")

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        from medseg.errors import UsageError

        raise UsageError(f"task {getattr(self, 'name', '?')!r} does not run on another inference backend; "
                         "use --backend torch")

    def verify_options(self, cfg: Any) -> VerifyOptions:
        """Label values and labelled train/val cases are checked when the config has a label map."""
        labels = sorted(cfg.data.labels) if getattr(cfg.data, "labels", None) else None
        return VerifyOptions(labels=labels,
                             require_labels_for=(cfg.data.train_split, cfg.data.val_split) if labels else (),
                             spatial_dims=cfg.model.spatial_dims, expected_channels=len(cfg.data.channels),
                             class_labels=self.class_labels, cross_split_duplicates=cfg.data.cross_split_duplicates,
                             allow_constant=cfg.preprocess.allow_constant)


def parameter_count(network: nn.Module) -> int:
    """Trainable and frozen parameters of ``network``."""
    return sum(p.numel() for p in network.parameters())
