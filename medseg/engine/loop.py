"""The training loop every task shares: budgets, checkpoints, exact resume, DDP, tracking.

A task (segmentation, classification) hands :func:`fit` a :class:`TrainTask`: its network, its
records and transform chains, its loss and its validation. The loop owns everything else, so
a fix to resuming or to the LR schedule reaches every task at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medseg.config import CacheMode, OptimizerName, RunConfig, ScheduleName, config_to_dict
from medseg.data.datasets import DeviceCache, cached_bytes, make_dataset
from medseg.data.manifest import Manifest
from medseg.data.sampling import (
    EpochSamples,
    epoch_order,
    process_positions,
    remaining_steps,
    split_transforms,
    stream_seed,
)
from medseg.engine import distributed
from medseg.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from medseg.engine.model_format import write_model_folder
from medseg.engine.report import write_report
from medseg.engine.runtime import (
    autocast,
    autocast_dtype,
    configure_threads,
    resolve_device,
    seed_everything,
    seed_step,
    to_channels_last,
    tune_allocator,
    use_channels_last,
)
from medseg.errors import MedsegError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.plots import learning_curve
from medseg.tracking import MlflowTracker

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
#: Seconds between two per-epoch log lines: a 20-second plan trains 70 epochs on a quiet 2-core CPU
#: and would print 70 lines; every epoch still goes to MLflow and history.csv, the last is always said.
EPOCH_LINE_SECONDS = 10.0

#: ``validate(network, dataset, device, autocast dtype, progress) -> {"val/...": value}``; every
#: process calls it on its share of the validation cases and gets the all-process result back.
Validator = Callable[[nn.Module, Any, torch.device, "torch.dtype | None", bool], dict[str, float]]

#: ``preview(network, dataset, device, autocast dtype) -> {image key: RGB uint8 array (H, W, 3)}``:
#: pictures of the same few validation cases at every validation (the main process's share of the
#: validation dataset), logged with the epoch as their step so that the MLflow run page's image
#: slider shows training progress.
Previewer = Callable[[nn.Module, Any, torch.device, "torch.dtype | None"], dict[str, np.ndarray]]


@dataclass(frozen=True)
class TrainOutputs:
    best_checkpoint: Path
    last_checkpoint: Path
    history: Path
    learning_curve: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class ModelOutputs:
    """What a package stage logged: the contract file and the MLflow model URI."""

    contract: Path
    model_uri: str


@dataclass
class TrainTask:
    """What a task gives the shared loop.

    Attributes:
        build_network: makes the model to train, called once the run is seeded (so every process
            and every rerun starts from the same weights); the loop moves and wraps it.
        train_items / val_items: records for the dictionary transforms, one per case.
        train_transform: the whole training chain; its deterministic prefix is cached.
        val_transform: the validation chain (deterministic, cached).
        loss: ``loss(network output, batch label) -> scalar``.
        validate: see :data:`Validator`.
        selection_metric: the validation metric whose maximum picks ``best.safetensors`` (``val/dice_mean``, ``val/auc``).
        default_num_workers: loader worker processes when ``train.num_workers`` is null; None
            leaves the choice to :func:`loader_workers`.
        preview: see :data:`Previewer`; None logs no pictures.
    """

    build_network: Callable[[], nn.Module]
    train_items: list[dict[str, Any]]
    val_items: list[dict[str, Any]]
    train_transform: Compose
    val_transform: Compose | None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Validator
    selection_metric: str
    default_num_workers: int | None = None
    preview: Previewer | None = None


# ----------------------------------------------------------------------------------- helpers


def split_cases(cfg: RunConfig, manifest: Manifest, role: str) -> list:
    """Cases for ``train``/``val``/``test`` under the config's split names (or fold)."""
    data = cfg.data
    if role == "test":
        return manifest.split(data.test_split)
    if data.fold is not None:
        folds = sorted({c.fold for c in manifest.cases if c.fold is not None and c.fold >= 0})
        if data.fold not in folds:
            raise UsageError(f"data.fold={data.fold} but the manifest {manifest.path} has folds {folds}; "
                             "pick one of them or rebuild the manifest with --folds")
        if role == "train" and data.train_folds == "all":  # nnU-Net's final model: every case trains
            return [c for c in manifest.split(data.train_split) if c.fold is not None and c.fold >= 0]
        return manifest.select(data.train_split, fold=data.fold, role=role)
    return manifest.split(data.train_split if role == "train" else data.val_split)


def has_labelled_cases(cfg: RunConfig, manifest_path: Path, split: str) -> bool:
    """True when ``split`` has at least one case with a label (evaluation has something to score)."""
    from medseg.data.manifest import read_manifest

    return any(c.label for c in split_cases(cfg, read_manifest(manifest_path), split))


class BudgetSchedule:
    """LR factor from training progress, where progress is the larger of epochs and minutes used.

    With a wall-clock budget the cosine/poly decay therefore ends when the time does, instead
    of being cut off half-way through an epoch count that was never reached.
    """

    def __init__(self, cfg: RunConfig, iterations_per_epoch: int, by_time: bool = True):
        self.cfg = cfg
        self.iterations_per_epoch = max(1, iterations_per_epoch)
        self.by_time = by_time  # off for deterministic runs: a clock is never reproducible
        self.step_count = 0
        self.elapsed = 0.0

    def progress(self) -> float:
        epochs = self.cfg.train.max_epochs
        by_steps = self.step_count / (epochs * self.iterations_per_epoch) if epochs else 0.0
        minutes = self.cfg.train.max_minutes
        by_time = self.elapsed / (minutes * 60) if minutes and self.by_time else 0.0
        return min(1.0, max(by_steps, by_time))

    def factor(self, _: int = 0) -> float:
        o = self.cfg.optim
        p = self.progress()
        if o.warmup_fraction > 0 and p < o.warmup_fraction:
            return max(1e-3, p / o.warmup_fraction)
        if o.schedule == ScheduleName.CONSTANT:
            return 1.0
        q = (p - o.warmup_fraction) / max(1e-8, 1 - o.warmup_fraction)
        if o.schedule == ScheduleName.POLY:
            decayed = (1 - q) ** 0.9
        else:
            decayed = 0.5 * (1 + math.cos(math.pi * q))
        return o.min_lr_fraction + (1 - o.min_lr_fraction) * decayed


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (model.freeze) stay out
    # One fused kernel for all parameters instead of torch's per-tensor loop, which is its default
    # on CPUs (on GPUs its default already batches the tensors).
    fused: dict[str, Any] = {"fused": True} if params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if o.name == OptimizerName.SGD:
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True,
                               **fused)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fused)


def weight_penalty(cfg: RunConfig, model: nn.Module) -> torch.Tensor | None:
    """``optim.l1 * sum|w| + optim.l2 * sum w²`` over trainable weight tensors (biases and norm
    scales, being 1-D, are left alone as usual); None when both are off."""
    l1, l2 = cfg.optim.l1, cfg.optim.l2
    if not (l1 or l2):
        return None
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    total = weights[0].new_zeros(())
    for w in weights:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


def loader_workers(cfg: RunConfig, task_default: int | None = None) -> int:
    """Loader worker processes: ``train.num_workers`` when set, else the task's default
    (:attr:`TrainTask.default_num_workers`), else none for cached data and two for uncached."""
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    if task_default is not None:
        return task_default
    # With the deterministic work cached, augmenting a few samples costs far less than the
    # training step; extra processes would only fight the model for the cores.
    return 0 if cfg.data.cache != CacheMode.NONE else 2


def augment_on_device(cfg: RunConfig, device: torch.device, workers: int, dataset: Any) -> bool:
    """Whether the training cache moves to the GPU and augmentation runs there (``data.augment_on_device``).

    Auto (null) says yes on a CUDA device with a memory cache, in-process loading (worker
    processes cannot share CUDA tensors) and a cache under a quarter of the GPU's memory.
    """
    wanted = cfg.data.augment_on_device
    possible = device.type == "cuda" and cfg.data.cache == CacheMode.MEMORY and workers == 0
    if wanted and not possible:
        raise UsageError("data.augment_on_device: true needs a CUDA device, data.cache: memory and in-process "
                         "loading (train.num_workers: 0); set it to null to let medseg decide")
    if wanted is False or not possible:
        return False
    if wanted:
        return True
    budget = torch.cuda.get_device_properties(device).total_memory // 4
    return cached_bytes(dataset) <= budget


# ----------------------------------------------------------------------------------- loop state


@dataclass
class LoopState:
    """Where training stands: every checkpoint carries it as JSON (``state``) and a resumed run
    continues from it.

    Attributes:
        epoch: epochs finished (the 0-based index of the epoch in progress).
        iteration: steps trained in the epoch in progress.
        samples_done: positions of the epoch's sample stream trained so far (the next step starts
            there). Counted in samples, not steps, because it must keep its meaning when a run is
            resumed with another number of processes, and so another global batch.
        partial_losses: the all-process loss of each step of the epoch in progress.
        best_metric: the best score of the selection metric so far.
        best_epoch: the epoch that scored it (-1 before any validation).
        elapsed: seconds of training and validation, all sessions of the run together.
        history: one record per finished epoch (``history.csv``).
        stale_validations: validations in a row without a new best (early stopping counts them).
        stopped_early: early stopping ended the run, so a resumed run does not train on.
    """

    epoch: int = 0
    iteration: int = 0
    samples_done: int = 0
    partial_losses: list[float] = field(default_factory=list)
    best_metric: float = -math.inf
    best_epoch: int = -1
    elapsed: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    stale_validations: int = 0
    stopped_early: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, saved_global_batch: int) -> LoopState:
        """The state a checkpoint saved.

        Args:
            text: the checkpoint's ``state``.
            saved_global_batch: samples per step of the run that saved it; checkpoints written
                before ``samples_done`` existed give their position as ``iteration`` steps of it.
        """
        saved = json.loads(text)
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        if "samples_done" not in saved:
            state.samples_done = state.iteration * saved_global_batch
        return state


# ----------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class _Runtime:
    """Where this process trains."""

    ctx: distributed.DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    threads: int


@dataclass(frozen=True)
class _TrainData:
    """This process's data and how its epochs are drawn.

    Attributes:
        train: preprocessed training cases (all of them, or this process's shard: ``sharded``).
        augment: the random rest of the training chain, applied per stream position.
        val: validation dataset (this process's share, possibly empty), or None without validation.
        sharded: each process draws from its own stream over its own shard (a memory cache in
            DDP) rather than its share of one stream of all cases.
        stream_seed: the seed of the stream this process draws from.
        iterations: steps per epoch.
        loader_kwargs: DataLoader arguments (workers, pinning).
        on_device: the training cache lives on the GPU and augmentation runs there.
        prepare_seconds: time spent building the caches.
    """

    train: Any
    augment: Compose | None
    val: Any
    sharded: bool
    stream_seed: int
    iterations: int
    loader_kwargs: dict[str, Any]
    on_device: bool
    prepare_seconds: float


@dataclass(frozen=True)
class _Trainables:
    """The network and what updates it; ``model`` is the network as trained (DDP-wrapped in a job)."""

    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    budget: BudgetSchedule
    channels_last: bool


def fit(cfg: RunConfig, task: TrainTask, out_dir: Path, tracker: MlflowTracker, *, resume: bool = False,
        progress: bool = True) -> TrainOutputs:
    """Train ``task.network`` on the sample stream of ``task.train_items``; validate and checkpoint.

    Runs in every process of a distributed job (see :mod:`medseg.engine.distributed`): each
    trains on its share of the sample stream and validates its share of the validation cases;
    only the main process writes checkpoints, history and plots.

    Args:
        cfg: validated run config.
        task: the task's network, data and hooks.
        out_dir: run directory; ``checkpoints/``, ``history.csv`` and plots go here.
        tracker: MLflow run to log to (already started; a no-op tracker off the main process).
        resume: continue from ``out_dir/checkpoints/last.safetensors`` if it exists.
        progress: show progress bars.

    Returns:
        Paths of the best and last checkpoints, the history and the learning curve, and the final metrics.
    """
    runtime = _start_runtime(cfg)
    ctx = runtime.ctx
    _check_training_cases(cfg, task, ctx)
    data = _prepare_data(cfg, task, runtime, out_dir, progress)
    parts = _build_model(cfg, task, runtime, data.iterations)
    last_path = out_dir / "checkpoints" / "last.safetensors"
    # The main process reads the checkpoint and hands it to the others: no shared disk needed.
    checkpoint = ctx.broadcast(load_checkpoint(last_path) if ctx.is_main and resume and last_path.is_file() else None)
    state = LoopState()
    if checkpoint is not None:
        state = _restore(checkpoint, cfg, ctx, data, parts)
        log.info("resumed from %s at epoch %d, sample %d of its stream (step %d of %d)", last_path, state.epoch,
                 state.samples_done, state.iteration, data.iterations)
    parts = replace(parts, model=_distribute(parts.net, ctx, runtime.device))
    loop = _Loop(cfg, task, runtime, data, parts, state, out_dir, tracker, progress)
    loop.log_setup()
    loop.train()
    if checkpoint is not None:
        loop.log_history()
    return loop.finish()


def _start_runtime(cfg: RunConfig) -> _Runtime:
    """Seed the run and pick this process's threads, device and autocast dtype."""
    ctx = distributed.current()
    tune_allocator()
    seed_everything(cfg.seed, cfg.train.deterministic)
    threads = configure_threads(cfg.train.num_threads, ctx.local_world_size)
    device = distributed.process_device(resolve_device(cfg.train.device), ctx)
    return _Runtime(ctx, device, autocast_dtype(cfg.train.precision, device), threads)


def _check_training_cases(cfg: RunConfig, task: TrainTask, ctx: distributed.DistContext) -> None:
    n_train = len(task.train_items)
    if not n_train:
        raise MedsegError(f"{cfg.data.manifest}: no cases in the training split {cfg.data.train_split!r}; "
                          "check data.train_split / data.fold against the manifest's split and fold columns")
    if n_train < ctx.world_size:
        raise UsageError(f"{n_train} training case(s) for {ctx.world_size} processes; "
                         "use fewer processes (--nproc) or more data")
    if cfg.train.deterministic and cfg.train.max_minutes:
        log.warning("train.deterministic with train.max_minutes: the number of epochs then depends on the "
                    "machine's speed; the LR schedule follows steps only")


def _prepare_data(cfg: RunConfig, task: TrainTask, runtime: _Runtime, out_dir: Path, progress: bool) -> _TrainData:
    """Build (or load) the caches of this process's cases and choose how batches are loaded."""
    ctx = runtime.ctx
    started = time.monotonic()
    prepare_tf, augment_tf = split_transforms(task.train_transform)
    cache_root = cfg.data.cache_dir or out_dir / "cache"
    # A memory cache is split between processes (each holds its shard, as MONAI's partition_dataset
    # does); otherwise every process draws from one shared stream, which a DDP run then follows
    # exactly as one process with the whole global batch would.
    sharded = ctx.enabled and cfg.data.cache == CacheMode.MEMORY
    train_items = task.train_items[ctx.rank::ctx.world_size] if sharded else task.train_items
    train_ds = make_dataset(train_items, prepare_tf, cfg.data, cache_root / "train", progress and ctx.is_main)
    val_items = task.val_items[ctx.rank::ctx.world_size]
    val_ds: Any = None  # no validation split; otherwise every process validates (its share may be empty)
    if task.val_items and task.val_transform is not None:
        val_ds = make_dataset(val_items, task.val_transform, cfg.data, cache_root / "val",
                              progress and ctx.is_main) if val_items else []
    if ctx.enabled and cfg.data.cache == CacheMode.DISK:
        _warm_disk_cache(train_ds, ctx)
    prepare_seconds = time.monotonic() - started  # the memory cache's preprocessing happens here
    global_batch = cfg.train.batch_size * ctx.world_size
    iterations = cfg.train.iterations_per_epoch or max(1, len(task.train_items) // global_batch)

    workers = loader_workers(cfg, task.default_num_workers)
    on_device = augment_on_device(cfg, runtime.device, workers, train_ds)
    if on_device:
        train_ds = DeviceCache(train_ds, runtime.device)
    # In-process loading is synchronous: MONAI's ThreadDataLoader would augment in a background
    # thread that fights the step's compute threads for the cores (benchmarks/results/perf.md, W4,
    # and docs/benchmarks.md on it).
    loader_kwargs: dict[str, Any] = {"num_workers": workers,
                                     "pin_memory": runtime.device.type == "cuda" and not on_device}
    return _TrainData(train_ds, augment_tf, val_ds, sharded, stream_seed(cfg.seed, ctx.rank) if sharded else cfg.seed,
                      iterations, loader_kwargs, on_device, prepare_seconds)


def _build_model(cfg: RunConfig, task: TrainTask, runtime: _Runtime, iterations: int) -> _Trainables:
    """The network of a fresh run (not yet wrapped for DDP), its optimiser, LR schedule and grad scaler."""
    device, dims = runtime.device, cfg.model.spatial_dims
    channels_last = use_channels_last(cfg.train.channels_last, dims)
    net = task.build_network().to(device)
    if channels_last:
        net = to_channels_last(net, dims)
    optimizer = make_optimizer(cfg, net)
    budget = BudgetSchedule(cfg, iterations, by_time=not cfg.train.deterministic)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16 and device.type == "cuda")
    return _Trainables(net, net, optimizer, scheduler, scaler, budget, channels_last)


def _restore(checkpoint: dict[str, Any], cfg: RunConfig, ctx: distributed.DistContext, data: _TrainData,
             parts: _Trainables) -> LoopState:
    """Load ``last.safetensors`` into the run's parts (before DDP wraps the network) and return the loop state it saved."""
    parts.net.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    saved_world = int(checkpoint.get("world_size", 1))
    # train.batch_size cannot change on resume (runner.check_resumable); the process count can.
    state = LoopState.from_json(checkpoint["state"], cfg.train.batch_size * saved_world)
    parts.budget.step_count, parts.budget.elapsed = int(checkpoint["step_count"]), float(state.elapsed)
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    if saved_world != ctx.world_size:
        _restate_position(state, cfg, ctx, data, parts.budget, saved_world)
    return state


def _restate_position(state: LoopState, cfg: RunConfig, ctx: distributed.DistContext, data: _TrainData,
                      budget: BudgetSchedule, saved_world: int) -> None:
    """Restate a position saved by a run of ``saved_world`` processes in this run's steps.

    The position in samples stays: the epoch continues at the first position of its stream not
    yet trained, whatever step of the new global batch that falls in (see
    :func:`~medseg.data.sampling.process_positions` for a remainder that is not a whole step). The
    step counter and the LR schedule's step count are restated to the steps of the new global
    batch that cover those samples, so that the epoch ends after the step that reaches its end
    and the schedule's progress carries on from where it was. (With ``train.iterations_per_epoch``
    an epoch is that many steps, so its length in samples changes with the process count; a
    position at or past the new end leaves nothing of the epoch to train.)
    """
    global_batch = cfg.train.batch_size * ctx.world_size
    state.iteration = data.iterations - remaining_steps(data.iterations, global_batch, state.samples_done)
    budget.step_count = state.epoch * data.iterations + state.iteration
    log.warning("resuming a run of %d process(es) with %d: the global batch changes, so the run continues but "
                "will not match an uninterrupted one", saved_world, ctx.world_size)
    if cfg.data.cache == CacheMode.MEMORY:
        # With a memory cache in DDP every process samples its own shard of the cases from its own
        # stream, and the shards change with the process count: only the number of samples left in
        # the epoch carries over, not which ones.
        log.warning("data.cache: memory shards the training cases between processes, and the shards change "
                    "with the process count: the rest of epoch %d draws its remaining samples from the new "
                    "shards, so it may see some cases twice and others not at all (later epochs are whole)",
                    state.epoch + 1)


def _distribute(net: nn.Module, ctx: distributed.DistContext, device: torch.device) -> nn.Module:
    """``net`` wrapped for DDP in a distributed job (after the checkpoint is loaded), else ``net``."""
    if not ctx.enabled:
        return net
    # SyncBatchNorm exists for GPUs only; on CPUs each process keeps its own batch statistics.
    if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same Parameter objects: the optimiser stays valid
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


class _Loop:
    """The epochs of one :func:`fit` call, from a fresh or restored :class:`LoopState`."""

    def __init__(self, cfg: RunConfig, task: TrainTask, runtime: _Runtime, data: _TrainData, parts: _Trainables,
                 state: LoopState, out_dir: Path, tracker: MlflowTracker, progress: bool):
        self.cfg, self.task, self.runtime, self.data, self.parts, self.state = cfg, task, runtime, data, parts, state
        self.ctx = runtime.ctx
        self.out_dir, self.tracker = out_dir, tracker
        self.progress = progress and self.ctx.is_main
        self.last_path = out_dir / "checkpoints" / "last.safetensors"
        self.best_path = out_dir / "checkpoints" / "best.safetensors"
        self.global_batch = cfg.train.batch_size * self.ctx.world_size
        self.resumed_after = state.samples_done if state.samples_done else None  # an epoch resumed part-way
        self.budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
        self.last_epoch_line: float | None = None
        self.checkpoint_every_s = cfg.train.checkpoint_interval_minutes * 60
        self.started = self.last_saved = time.monotonic()  # both restart with train()
        self.out_of_time = False
        self.validation_s = 0.0  # the latest validation's duration: the last one must fit into the budget too

    def log_setup(self) -> None:
        cfg, ctx, data, parts = self.cfg, self.ctx, self.data, self.parts
        batch_size = cfg.train.batch_size
        self.tracker.log_metrics({
            "system/threads": self.runtime.threads, "system/world_size": ctx.world_size,
            "system/batch_per_process": batch_size, "system/global_batch": self.global_batch,
            "system/channels_last": float(parts.channels_last), "system/augment_on_device": float(data.on_device),
            "data/train_cases": len(self.task.train_items), "data/val_cases": len(self.task.val_items),
            # what the main process holds: its shard with a memory cache in DDP, else all
            "data/train_cases_per_process": len(data.train), "time/cache_build_s": data.prepare_seconds}, step=0)
        log.info("training on %s (%d process(es) x %d threads, autocast=%s, channels-last=%s): %d train / %d val "
                 "cases, %d iterations per epoch of %d x %d samples", self.runtime.device, ctx.world_size,
                 self.runtime.threads, self.runtime.amp_dtype, parts.channels_last, len(self.task.train_items),
                 len(self.task.val_items), data.iterations, ctx.world_size, batch_size)
        if cfg.data.seen_validation():
            log.info("data.train_folds=all: fold %d is trained on too, so its validation scores only monitor "
                     "training; the last weights are kept", cfg.data.fold)

    # ------------------------------------------------------------------------ training
    def train(self) -> None:
        """Train epochs until ``max_epochs``, the wall-clock budget or early stopping."""
        state = self.state
        self.started = time.monotonic() - state.elapsed
        self.last_saved = time.monotonic()
        while not self._epochs_done() and not self.out_of_time and not state.stopped_early:
            self.parts.model.train()
            epoch_started, first_step = time.monotonic(), state.iteration
            if not self._train_epoch():
                break
            self._end_epoch(epoch_started, state.iteration - first_step)

    def _epochs_done(self) -> bool:
        epochs = self.cfg.train.max_epochs
        return epochs is not None and self.state.epoch >= epochs

    def _epoch_label(self) -> str:
        """``epoch 3/100``, or under a budget alone ``epoch 3 (4.2/30 min)``: no cap that never binds."""
        epochs, minutes = self.cfg.train.max_epochs, self.cfg.train.max_minutes
        if epochs is not None:
            return f"epoch {self.state.epoch + 1}/{epochs}"
        return f"epoch {self.state.epoch + 1} ({self.state.elapsed / 60:.1f}/{minutes:g} min)"

    def _final_validation_reserve(self) -> float:
        """Seconds kept for the validation that closes training, so that training and its last
        validation end within the budget (the latest validation's duration predicts it)."""
        return self.validation_s if self.data.val is not None else 0.0

    def _train_epoch(self) -> bool:
        """Train what is left of the epoch in progress; False when it has nothing to show (no steps)."""
        state, iterations = self.state, self.data.iterations
        bar = tqdm(total=iterations, initial=state.iteration, desc=self._epoch_label(),
                   disable=not self.progress, unit="it", leave=False)
        for batch in self._epoch_loader():
            self._train_step(batch)
            bar.set_postfix(loss=f"{state.partial_losses[-1]:.4f}")
            bar.update()
            if self.parts.budget.elapsed + self._final_validation_reserve() >= self.budget_s:
                self.out_of_time = True
                break
            if time.monotonic() - self.last_saved >= self.checkpoint_every_s and state.iteration < iterations:
                self.save_last()
        bar.close()
        return bool(state.partial_losses)

    def _epoch_loader(self) -> DataLoader:
        """Batches of this process's remaining positions of the epoch in progress."""
        data, state, batch_size = self.data, self.state, self.cfg.train.batch_size
        if data.sharded:  # a stream of its own per process, at the same step as every other
            length, positions = process_positions(data.iterations, batch_size, 1, 0, state.iteration * batch_size)
        else:
            length, positions = process_positions(data.iterations, batch_size, self.ctx.world_size, self.ctx.rank,
                                                  state.samples_done)
        order = epoch_order(len(data.train), length, data.stream_seed, state.epoch)
        samples = EpochSamples(data.train, data.augment, order, positions, data.stream_seed, state.epoch)
        return DataLoader(samples, batch_size=batch_size, shuffle=False, drop_last=False, **data.loader_kwargs)

    def _train_step(self, batch: dict[str, Any]) -> None:
        """One optimiser step on ``batch``; every process then agrees on the loss and the clock."""
        cfg, parts, state, device = self.cfg, self.parts, self.state, self.runtime.device
        seed_step(cfg.seed, state.epoch, state.iteration, self.ctx.rank)
        image = batch["image"].to(device, non_blocking=True)
        if parts.channels_last:
            image = to_channels_last(image, cfg.model.spatial_dims)
        label = batch["label"].to(device, non_blocking=True)
        parts.optimizer.zero_grad(set_to_none=True)
        with autocast(self.runtime.amp_dtype, device):
            loss = self.task.loss(parts.model(image), label)
        penalty = weight_penalty(cfg, parts.net)
        objective = loss if penalty is None else loss + penalty
        parts.scaler.scale(objective).backward()
        if cfg.train.grad_clip:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.net.parameters(), cfg.train.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        # One small all-reduce gives every process the global loss and the same clock, so the
        # LR schedule and the decision to stop agree everywhere (a disagreement would hang DDP).
        shared = self.ctx.sum_(torch.tensor([float(loss.detach()), time.monotonic() - self.started],
                                            dtype=torch.float64)) / self.ctx.world_size
        state.iteration += 1
        state.samples_done += self.global_batch
        parts.budget.step_count += 1
        parts.budget.elapsed = state.elapsed = float(shared[1])
        parts.scheduler.step()
        state.partial_losses.append(float(shared[0]))

    def _end_epoch(self, epoch_started: float, steps: int) -> None:
        """Close the epoch: its record, validation, early stopping, the checkpoint, then the log.
        ``steps``: the optimiser steps timed by ``time/epoch_train_s`` (fewer than an epoch's when the
        budget cut it), so that a cut epoch still gives the time per step."""
        cfg, state = self.cfg, self.state
        if self.resumed_after is not None:
            log.info("epoch %d: resumed after %d of its %d samples, trained %d more", state.epoch + 1,
                     self.resumed_after, self.data.iterations * self.global_batch,
                     state.samples_done - self.resumed_after)
            self.resumed_after = None
        state.epoch += 1
        record: dict[str, float] = {"epoch": state.epoch, "train/loss": float(np.mean(state.partial_losses)),
                                    "lr": self.parts.optimizer.param_groups[0]["lr"],
                                    # training only (a resumed epoch: its remaining part), validation excluded
                                    "time/epoch_train_s": time.monotonic() - epoch_started,
                                    "time/epoch_steps": steps}
        last_epoch = self._epochs_done() or self.out_of_time
        if self.data.val is not None and (state.epoch % cfg.train.val_interval == 0 or last_epoch):
            validation_started = time.monotonic()
            self._validate_and_select(record)
            self.validation_s = time.monotonic() - validation_started
        state.elapsed = time.monotonic() - self.started  # validation time counts against the budget too
        record["time/elapsed_min"] = state.elapsed / 60
        state.iteration, state.samples_done, state.partial_losses = 0, 0, []
        state.history.append(record)
        patience = cfg.train.early_stopping_patience
        if patience and state.stale_validations >= patience:
            log.info("early stopping: %s did not improve in %d validations", self.task.selection_metric, patience)
            state.stopped_early = True  # saved below, so a resumed run does not train on
        # Checkpoint first, then log: a crash in between is healed on resume (log_history), while
        # the other order would log an epoch twice.
        self.save_last()
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=state.epoch)
        now = time.monotonic()
        said = last_epoch or state.stopped_early or self.last_epoch_line is None or \
            now - self.last_epoch_line >= EPOCH_LINE_SECONDS
        self.last_epoch_line = now if said else self.last_epoch_line
        log.log(logging.INFO if said else logging.DEBUG, "epoch %d: %s", state.epoch,
                ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))

    def _validate_and_select(self, record: dict[str, float]) -> None:
        """Add the validation metrics to ``record``; a new best score writes ``best.safetensors``."""
        state, select, net = self.state, self.task.selection_metric, self.parts.net
        record.update(self.task.validate(net, self.data.val, self.runtime.device, self.runtime.amp_dtype,
                                         self.progress))
        if self.task.preview is not None and self.ctx.is_main and len(self.data.val):
            # The bare network, on the main process only: it runs no collective, so it cannot hang the
            # others (they wait for it at the next step's all-reduce).
            try:
                for key, picture in self.task.preview(net, self.data.val, self.runtime.device,
                                                      self.runtime.amp_dtype).items():
                    self.tracker.log_image(key, picture, step=state.epoch)
            except Exception as err:  # pictures are for looking at: never worth stopping training for
                log.warning("epoch %d: validation pictures not logged (%s: %s)", state.epoch, type(err).__name__, err)
        net.train()
        score = record[select]
        if self.cfg.data.seen_validation():  # scores on trained-on cases select nothing: the latest weights win
            state.best_metric, state.best_epoch, state.stale_validations = score, state.epoch, 0
            self._save_best(score)
        elif not math.isnan(score) and score > state.best_metric:
            state.best_metric, state.best_epoch, state.stale_validations = score, state.epoch, 0
            self._save_best(score)
        else:
            state.stale_validations += 1

    # ------------------------------------------------------------------------ checkpoints and results
    def save_last(self) -> None:
        """``last.safetensors``: everything a resumed run needs to continue exactly (main process only)."""
        if self.ctx.is_main:
            parts = self.parts
            save_checkpoint(self.last_path, {
                "version": CHECKPOINT_VERSION, "model": parts.net.state_dict(),
                "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                "scaler": parts.scaler.state_dict(), "rng": rng_state(), "step_count": parts.budget.step_count,
                "world_size": self.ctx.world_size, "state": self.state.to_json(),
                "config": json.dumps(config_to_dict(self.cfg))})
        self.last_saved = time.monotonic()

    def _save_best(self, score: float) -> None:
        if self.ctx.is_main:
            select = self.task.selection_metric
            save_checkpoint(self.best_path, {"model": self.parts.net.state_dict(), "epoch": self.state.epoch,
                                             "metric": select, select: score,
                                             "config": json.dumps(config_to_dict(self.cfg))})

    def log_history(self) -> None:
        """Log every epoch of the history: those checkpointed but not logged before a crash get
        logged now (the tracker skips steps it already has)."""
        for record in self.state.history:
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))

    def finish(self) -> TrainOutputs:
        """Write the history and learning curve, make sure ``best.safetensors`` exists, log the totals."""
        state = self.state
        if self.out_of_time:
            log.info("wall-clock budget of %.1f min reached after %d epochs", self.cfg.train.max_minutes, state.epoch)
        if not self.best_path.is_file():  # no validation split: the last weights are the ones to use
            self._save_best(float("nan"))
        history_path, curve = self.out_dir / "history.csv", self.out_dir / "plots" / "learning_curve.png"
        if self.ctx.is_main:
            write_history(state.history, history_path)
            learning_curve(state.history, curve, metric=self.task.selection_metric)
        final = {k: v for rec in state.history for k, v in rec.items() if k != "epoch"}
        final.update({"best_val/epoch": state.best_epoch, "train/epochs": state.epoch,
                      "train/minutes": state.elapsed / 60})
        self.tracker.log_metrics({k: final[k] for k in ("best_val/epoch", "train/epochs", "train/minutes")},
                                 step=state.epoch)
        return TrainOutputs(self.best_path, self.last_path, history_path, curve, final)


def _warm_disk_cache(dataset: Any, ctx: distributed.DistContext) -> None:
    """The processes of each machine fill the disk cache together before anyone reads from it,
    so none reads a half-written file. Per machine, because a cache folder need not be shared
    between machines; where it is, two machines write identical complete files."""
    for index in range(ctx.local_rank, len(dataset), ctx.local_world_size):
        dataset[index]
    ctx.barrier()


# ----------------------------------------------------------------------------------- packaging


def base_contract(cfg: RunConfig) -> dict[str, Any]:
    """The contract entries every task shares: how inference must see the images, and the labels.

    Tasks add their own (patch and sliding window; resize and output head). Together they are
    what MONAI bundles keep in ``metadata.json``: inference reads them and never guesses.
    """
    from medseg._version import __version__

    pre = cfg.preprocess
    return {
        "medseg_version": __version__,
        "task": str(cfg.task),
        "spatial_dims": cfg.model.spatial_dims,
        "in_channels": len(cfg.data.channels),
        "channel_names": list(cfg.data.channels),
        "labels": {str(k): v for k, v in (cfg.data.labels or {}).items()},
        "orientation": pre.orientation,
        "spacing": list(pre.spacing) if pre.spacing else None,
        "intensity": pre.intensity.model_dump(mode="json"),
        "crop_foreground": pre.crop_foreground,
        "allow_constant": pre.allow_constant,
        "tta_axes": trained_flip_axes(cfg),
    }


def trained_flip_axes(cfg: RunConfig) -> list[int]:
    """The spatial axes the training augmentation flipped: the only mirrorings TTA may average over
    (as nnU-Net mirrors only along the axes it trained with). A network that never saw a flipped
    image can mistake a mirrored one for other anatomy (left for right, anterior for posterior)."""
    from medseg.config import FlipAug

    axes: set[int] = set()
    for aug in getattr(cfg, "augment", None) or []:
        if isinstance(aug, FlipAug):
            axes.update(aug.axes if aug.axes is not None else range(cfg.model.spatial_dims))
    return sorted(axes)


def network_spec(cfg: RunConfig) -> dict[str, Any]:
    """What rebuilds the network: its task, its registry name and the config its factory reads."""
    return {"task": str(cfg.task), "name": str(getattr(cfg.model, "name", "")), "config": config_to_dict(cfg)}


def package_model(network: nn.Module, checkpoint: Path, contract: dict[str, Any], out_dir: Path,
                  tracker: MlflowTracker, cfg: RunConfig) -> tuple[Path, str]:
    """Load ``checkpoint`` into ``network`` and save and log it (:func:`log_network`).

    Returns:
        ``(contract.json path, model URI)``.
    """
    contract_path = atomic_write_text(out_dir / "contract.json", json.dumps(contract, indent=2))
    network.load_state_dict(load_checkpoint(checkpoint)["model"])
    tracker.log_artifact(contract_path)
    return contract_path, log_network(network, cfg, contract, out_dir, tracker, {"checkpoint": checkpoint.name})


def log_network(network: nn.Module, cfg: RunConfig, contract: dict[str, Any], out_dir: Path,
                tracker: MlflowTracker, extra: dict[str, Any] | None = None) -> str:
    """Write the model folder ``out_dir/model`` (weights as safetensors, network spec and contract
    as JSON) and log it to MLflow as a pyfunc model, registered (and aliased) as ``cfg.tracking`` says.

    Returns:
        The model URI; the local model folder when nothing is tracked (a non-main process).
    """
    folder = out_dir / "model"
    write_model_folder(folder, network.eval(), network_spec(cfg), contract,
                       extra={"run_id": tracker.run_id, **(extra or {})})
    uri = tracker.log_model(folder, contract, registered_name=cfg.tracking.register_model_as,
                            alias=cfg.tracking.model_alias)
    return uri or str(folder)


def write_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    keys: list[str] = []
    for rec in history:
        keys.extend(k for k in rec if k not in keys)
    return write_csv(path, keys, [{k: f"{r[k]:.6g}" for k in r} for r in history])


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """A CSV written atomically by the one CSV writer (:func:`medseg.engine.report.write_report`):
    rows may leave fields out; text a spreadsheet would run as a formula is escaped."""
    return write_report(rows, fields, path)
