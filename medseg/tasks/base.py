"""The protocol every task implements, and the defaults most tasks share.

A task is everything that differs between segmentation, classification and reconstruction: its
config class, its networks, transforms, losses and metrics, its train / evaluate / package
stages, its contract and how it predicts one case. The engine (loop, checkpoints, distributed,
sliding window, batch prediction) and the run / predict drivers know nothing else about it, so a
new task is a new package plus one registry entry (see :mod:`medseg.tasks.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from monai.data import Dataset
from monai.transforms import Compose
from torch import nn

from medseg.config import RunConfig
from medseg.data.datasets import records
from medseg.data.manifest import read_manifest
from medseg.data.verify import VerifyOptions
from medseg.engine.calibration import contract_calibration
from medseg.engine.evaluation import Evaluator, SplitScores, load_for_evaluation, write_evaluation
from medseg.engine.loop import (
    ModelOutputs,
    Previewer,
    TrainOutputs,
    TrainTask,
    Validator,
    base_contract,
    fit,
    package_model,
    split_cases,
)
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import CasePredictor, PredictOptions
from medseg.engine.runner import PipelineContext


@runtime_checkable
class Task(Protocol):
    """What a task provides. medseg's three implement it; so can a separate package.

    Attributes:
        name: the value of ``task:`` in a config, and of ``task`` in a model's contract.
        config_type: the task's config class (a :class:`~medseg.config.RunConfig` subclass whose
            ``task`` field is ``Literal[name]``); its sections are typed, required ones required.
        predict_options: the :class:`~medseg.engine.results.PredictOptions` fields, beyond the ones
            every task honours, that this task's prediction uses; the driver refuses the others.
        selection_metric: the validation metric whose maximum picks ``best.safetensors``.
        evaluated_splits: (split, metric prefix) pairs the selected checkpoint is scored on, in order.
        headline_metrics: what a finished run reports first (regular expressions over metric names).
    """

    name: str
    config_type: type[RunConfig]
    predict_options: frozenset[str]
    selection_metric: str
    evaluated_splits: tuple[tuple[str, str], ...]
    headline_metrics: tuple[str, ...]

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
    """The engine's stages over a task's pieces, and defaults a task may inherit.

    A task supplies pieces: :meth:`build_network`, :meth:`transforms`, :meth:`create_loss`,
    :meth:`score` (how a network does on a dataset of its split), :meth:`contract_extras` and
    :meth:`case_predictor`. The stages are the engine's and are not overridden: :meth:`train` (the
    shared loop), :meth:`evaluate` (the checkpoint loaded as predict loads it, scored on a split,
    its files written and logged) and :meth:`package` (the network and its contract logged as an
    MLflow model). A task that needs more overrides a finer piece, never a stage:
    :meth:`training_network`, :meth:`training_loss`, :meth:`validation` (validation and the pictures
    logged with it), :meth:`evaluation_items`, :meth:`score_split`, :meth:`packaged_contract` and
    :meth:`package_extras`.
    """

    name: str = ""
    selection_metric: str = "val/loss"
    evaluated_splits: tuple[tuple[str, str], ...] = (("val", "best_val"), ("test", "test"))
    headline_metrics: tuple[str, ...] = ("^test/",)
    predict_options: frozenset[str] = frozenset()
    #: the manifest's label column holds a class index (classification), not a label-map path
    class_labels: bool = False
    #: the records carry the manifest's label (a label-map path or a class index)
    uses_labels: bool = True
    #: loader workers when ``train.num_workers`` is null; None leaves it to the engine
    loader_workers: int | None = None

    # ------------------------------------------------------------------------------ pieces

    def build_network(self, cfg: Any) -> nn.Module:
        raise NotImplementedError(f"task {self.name!r}: build_network(cfg) is a required piece")

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        raise NotImplementedError(f"task {self.name!r}: transforms(cfg) is a required piece")

    def create_loss(self, cfg: Any) -> nn.Module:
        raise NotImplementedError(f"task {self.name!r}: create_loss(cfg) is a required piece")

    def score(self, network: nn.Module, dataset: Any, device: torch.device, prefix: str) -> dict[str, float]:
        """How ``network`` does on ``dataset`` (one split through the validation chain): metrics named
        ``<prefix>/...``; the one named by :attr:`selection_metric` picks the best checkpoint."""
        raise NotImplementedError(f"task {self.name!r}: score(network, dataset, device, prefix) is a required piece "
                                  "(or override validation and score_split)")

    def contract_extras(self, cfg: Any) -> dict[str, Any]:
        """What inference needs beyond :func:`~medseg.engine.loop.base_contract` (input size, head)."""
        return {}

    def contract(self, cfg: Any) -> dict[str, Any]:
        return {**base_contract(cfg), **self.contract_extras(cfg)}

    # ------------------------------------------------------------------------------ finer pieces

    def training_network(self, cfg: Any) -> nn.Module:
        """The network training starts from: the bare one, or initialised from ``model.init_from``
        (transfer, fine-tuning, a race winner going on from its race weights)."""
        network = self.build_network(cfg)
        init_from = getattr(cfg.model, "init_from", None)
        if init_from:
            from medseg.engine.transfer import initialise_from

            initialise_from(network, init_from, cfg.tracking.uri)
        return network

    def record_init_from(self, ctx: PipelineContext) -> None:
        """Say in the run which tensors ``model.init_from`` gives this network and which start fresh
        (``init_from.json``), and tag the run with the source and the pretraining run it came from;
        before any data is read, so a network that does not fit the weights fails at once."""
        from medseg.engine.transfer import check_pretrained_network, initialise_from, record_transfer

        source = str(ctx.cfg.model.init_from)
        check_pretrained_network(source, ctx.cfg.model)
        report = initialise_from(self.build_network(ctx.cfg), source, ctx.cfg.tracking.uri)
        record_transfer(source, report, ctx.run_dir, ctx.tracker)

    def training_loss(self, ctx: PipelineContext) -> nn.Module:
        """The loss as training uses it (weights resolved from the training cases, for example)."""
        return self.create_loss(ctx.cfg)

    def validation(self, ctx: PipelineContext) -> tuple[Validator, Previewer | None]:
        """What validates the network during training, and what draws its pictures (None: none);
        by default :meth:`score` on the validation split."""
        def validate(network: nn.Module, dataset: Any, device: torch.device, amp: Any, show: bool) -> dict[str, float]:
            return self.score(network, dataset, device, "val")

        return validate, None

    def evaluation_items(self, ctx: PipelineContext, split: str) -> list[dict[str, Any]]:
        """The records the evaluate stage scores on ``split``: its labelled cases (every case when
        the task does not use labels)."""
        cases = split_cases(ctx.cfg, read_manifest(ctx.manifest), split)
        if self.uses_labels:
            cases = [c for c in cases if c.label is not None and c.label != ""]
        return records(cases, ctx.root, with_label=self.uses_labels, class_labels=self.class_labels)

    def score_split(self, ctx: PipelineContext, evaluator: Evaluator) -> SplitScores:
        """The evaluate stage's scores of one split; by default :meth:`score` (no per-case rows)."""
        return SplitScores(self.score(evaluator.network, evaluator.dataset, evaluator.device, evaluator.prefix))

    def packaged_contract(self, ctx: PipelineContext) -> dict[str, Any]:
        """The contract the package stage logs: :meth:`contract`, and the temperature the validation
        split fitted when the config calibrates a softmax head."""
        contract = self.contract(ctx.cfg)
        if getattr(getattr(ctx.cfg, "validation", None), "calibrate", False) \
                and contract.get("output_activation") == "softmax":
            contract.update(contract_calibration(ctx.run_dir))
        return contract

    def package_extras(self, ctx: PipelineContext, checkpoint: Path) -> None:
        """What the package stage writes and logs beside the model (pretraining: the weights file that
        ``model.init_from`` takes); nothing by default."""
        return None

    # ------------------------------------------------------------------------------ the engine's stages

    def records(self, ctx: PipelineContext, split: str) -> list[dict[str, Any]]:
        """The split's cases as records for the dictionary transforms."""
        cases = split_cases(ctx.cfg, read_manifest(ctx.manifest), split)
        return records(cases, ctx.root, with_label=self.uses_labels, class_labels=self.class_labels)

    def train(self, ctx: PipelineContext) -> TrainOutputs:
        """The shared loop with this task's network, data, loss and validation."""
        cfg = ctx.cfg
        if getattr(cfg.model, "init_from", None) and ctx.dist.is_main:
            self.record_init_from(ctx)
        train_transform, val_transform = self.transforms(cfg)
        validate, preview = self.validation(ctx)
        task = TrainTask(
            build_network=lambda: self.training_network(cfg),
            train_items=self.records(ctx, "train"), val_items=self.records(ctx, "val"),
            train_transform=train_transform, val_transform=val_transform, loss=self.training_loss(ctx),
            validate=validate, selection_metric=self.selection_metric,
            default_num_workers=self.loader_workers, preview=preview,
        )
        return fit(cfg, task, ctx.run_dir, ctx.tracker, resume=ctx.resume, progress=ctx.progress)

    def evaluate(self, ctx: PipelineContext, checkpoint: Path, split: str, prefix: str) -> dict[str, float]:
        """``checkpoint`` scored on ``split`` by :meth:`score_split`, with the network loaded as
        predict loads it; its files written and logged. Nothing when the split has nothing to score."""
        items = self.evaluation_items(ctx, split)
        if not items:
            return {}
        network, device, amp_dtype = load_for_evaluation(lambda: self.build_network(ctx.cfg), ctx.cfg, checkpoint)
        evaluator = Evaluator(network, device, amp_dtype, Dataset(items, self.transforms(ctx.cfg)[1]), split, prefix,
                              ctx.run_dir, ctx.progress)
        return write_evaluation(self.score_split(ctx, evaluator), ctx.run_dir, split, ctx.tracker).metrics

    def package(self, ctx: PipelineContext, checkpoint: Path) -> ModelOutputs:
        """``checkpoint``'s network and :meth:`packaged_contract`, logged as an MLflow model."""
        contract_path, uri = package_model(self.build_network(ctx.cfg), checkpoint, self.packaged_contract(ctx),
                                           ctx.run_dir, ctx.tracker, ctx.cfg)
        self.package_extras(ctx, checkpoint)
        return ModelOutputs(contract_path, uri)

    # ------------------------------------------------------------------------------ defaults

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
