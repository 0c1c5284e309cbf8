"""The training loop every task shares: budgets, checkpoints, exact resume, DDP, tracking.

A task (segmentation, classification) hands :func:`fit` a :class:`TrainTask`: its network, its
records and transform chains, its loss and its validation. The loop owns everything else, so
a fix to resuming or to the LR schedule reaches every task at once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medseg.config import CacheMode, OptimizerName, RunConfig, ScheduleName, Task, config_to_dict
from medseg.data.datasets import DeviceCache, cached_bytes, make_dataset
from medseg.data.manifest import Manifest
from medseg.data.sampling import EpochSamples, epoch_order, process_positions, split_transforms, stream_seed
from medseg.engine import distributed
from medseg.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
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

#: ``validate(network, dataset, device, autocast dtype, progress) -> {"val/...": value}``; every
#: process calls it on its share of the validation cases and gets the all-process result back.
Validator = Callable[[nn.Module, Any, torch.device, "torch.dtype | None", bool], dict[str, float]]


@dataclass(frozen=True)
class TrainOutputs:
    best_checkpoint: Path
    last_checkpoint: Path
    history: Path
    learning_curve: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluate stage wrote: the per-case CSV, the metrics JSON and its figures."""

    per_case: Path
    metrics_file: Path
    figures: tuple[Path, ...]
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
        selection_metric: the validation metric whose maximum picks ``best.pt`` (``val/dice_mean``, ``val/auc``).
    """

    build_network: Callable[[], nn.Module]
    train_items: list[dict[str, Any]]
    val_items: list[dict[str, Any]]
    train_transform: Compose
    val_transform: Compose | None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Validator
    selection_metric: str


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
        by_steps = self.step_count / (self.cfg.train.max_epochs * self.iterations_per_epoch)
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
    fused = {"fused": True} if params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
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


def loader_workers(cfg: RunConfig) -> int:
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    if cfg.task == Task.RECONSTRUCTION:
        # Simulating a measurement (masks and FFTs, or noise) for every slice is per-sample work of
        # the order of the training step: two workers overlap it with the step (1.5x measured,
        # benchmarks/bench_recon.py).
        return 2
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


# ----------------------------------------------------------------------------------- the loop


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
        resume: continue from ``out_dir/checkpoints/last.pt`` if it exists.
        progress: show progress bars.

    Returns:
        Paths of the best and last checkpoints, the history and the learning curve, and the final metrics.
    """
    ctx = distributed.current()
    tune_allocator()
    seed_everything(cfg.seed, cfg.train.deterministic)
    threads = configure_threads(cfg.train.num_threads, ctx.local_world_size)
    device = distributed.process_device(resolve_device(cfg.train.device), ctx)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    n_train, n_val = len(task.train_items), len(task.val_items)
    if not n_train:
        raise MedsegError(f"{cfg.data.manifest}: no cases in the training split {cfg.data.train_split!r}; "
                          "check data.train_split / data.fold against the manifest's split and fold columns")
    if n_train < ctx.world_size:
        raise UsageError(f"{n_train} training case(s) for {ctx.world_size} processes; "
                         "use fewer processes (--nproc) or more data")
    select = task.selection_metric
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    batch_size = cfg.train.batch_size
    if cfg.train.deterministic and cfg.train.max_minutes:
        log.warning("train.deterministic with train.max_minutes: the number of epochs then depends on the "
                    "machine's speed; the LR schedule follows steps only")

    prepare_started = time.monotonic()
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
    if n_val and task.val_transform is not None:
        val_ds = make_dataset(val_items, task.val_transform, cfg.data, cache_root / "val",
                              progress and ctx.is_main) if val_items else []
    if ctx.enabled and cfg.data.cache == CacheMode.DISK:
        _warm_disk_cache(train_ds, ctx)
    prepare_seconds = time.monotonic() - prepare_started  # the memory cache's preprocessing happens here
    stream_world, stream_rank = (1, 0) if sharded else (ctx.world_size, ctx.rank)
    stream_seed_base = stream_seed(cfg.seed, ctx.rank) if sharded else cfg.seed
    iterations = cfg.train.iterations_per_epoch or max(1, n_train // (batch_size * ctx.world_size))

    workers = loader_workers(cfg)
    on_device = augment_on_device(cfg, device, workers, train_ds)
    if on_device:
        train_ds = DeviceCache(train_ds, device)
    # In-process loading is synchronous: MONAI's ThreadDataLoader would augment in a background
    # thread that fights the step's compute threads for the cores (an epoch 1.6x slower measured
    # on 2 cores, benchmarks/bench_perf.py W4).
    loader_kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda" and not on_device}

    def epoch_loader(epoch: int, start_iteration: int) -> Any:
        length, positions = process_positions(iterations, batch_size, stream_world, stream_rank, start_iteration)
        order = epoch_order(len(train_ds), length, stream_seed_base, epoch)
        samples = EpochSamples(train_ds, augment_tf, order, positions, stream_seed_base, epoch)
        return DataLoader(samples, batch_size=batch_size, shuffle=False, drop_last=False, **loader_kwargs)

    dims = cfg.model.spatial_dims
    channels_last = use_channels_last(cfg.train.channels_last, dims)
    net = task.build_network().to(device)
    if channels_last:
        net = to_channels_last(net, dims)
    optimizer = make_optimizer(cfg, net)
    budget = BudgetSchedule(cfg, iterations, by_time=not cfg.train.deterministic)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

    state: dict[str, Any] = {"epoch": 0, "iteration": 0, "partial_losses": [], "best_metric": -math.inf,
                             "best_epoch": -1, "elapsed": 0.0, "history": [], "stale_validations": 0}
    # The main process reads the checkpoint and hands it to the others: no shared disk needed.
    ckpt = ctx.broadcast(load_checkpoint(last_path) if ctx.is_main and resume and last_path.is_file() else None)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        state.update(json.loads(ckpt["state"]))
        budget.step_count, budget.elapsed = int(ckpt["step_count"]), float(state["elapsed"])
        scheduler.load_state_dict(ckpt["scheduler"])
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != ctx.world_size:
            # An epoch has another number of steps now: restate the position and the schedule's step
            # count in the new steps, so the LR schedule keeps its shape and no part of an epoch is lost.
            state["iteration"] = min(int(state["iteration"]), iterations)
            budget.step_count = int(state["epoch"]) * iterations + state["iteration"]
            log.warning("resuming a run of %d process(es) with %d: the global batch changes, so the run "
                        "continues but will not match an uninterrupted one", saved_world, ctx.world_size)
        log.info("resumed from %s at epoch %d, iteration %d", last_path, state["epoch"], state["iteration"])
    if ctx.enabled:
        # SyncBatchNorm exists for GPUs only; on CPUs each process keeps its own batch statistics.
        if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same Parameter objects: the optimiser stays valid
        model: nn.Module = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = net

    tracker.log_metrics({"system/threads": threads, "system/world_size": ctx.world_size,
                         "system/batch_per_process": batch_size, "system/global_batch": batch_size * ctx.world_size,
                         "system/channels_last": float(channels_last), "system/augment_on_device": float(on_device),
                         "data/train_cases": n_train, "data/val_cases": n_val,
                         # what the main process holds: its shard with a memory cache in DDP, else all
                         "data/train_cases_per_process": len(train_ds), "time/cache_build_s": prepare_seconds},
                        step=0)
    log.info("training on %s (%d process(es) x %d threads, autocast=%s, channels-last=%s): %d train / %d val "
             "cases, %d iterations per epoch of %d x %d samples", device, ctx.world_size, threads, amp_dtype, channels_last,
             n_train, n_val, iterations, ctx.world_size, batch_size)

    started = time.monotonic() - state["elapsed"]
    budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
    checkpoint_every_s = cfg.train.checkpoint_interval_minutes * 60
    last_saved = time.monotonic()
    out_of_time = False
    epoch = state["epoch"]

    def save_last() -> None:
        if ctx.is_main:
            save_checkpoint(last_path, {
                "version": CHECKPOINT_VERSION, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "step_count": budget.step_count, "world_size": ctx.world_size, "state": json.dumps(state),
                "config": json.dumps(config_to_dict(cfg))})

    while epoch < cfg.train.max_epochs and not out_of_time and not state.get("stopped_early"):
        model.train()
        epoch_started = time.monotonic()
        iteration, losses = state["iteration"], list(state["partial_losses"])
        bar = tqdm(total=iterations, initial=iteration, desc=f"epoch {epoch + 1}/{cfg.train.max_epochs}",
                   disable=not (progress and ctx.is_main), unit="it", leave=False)
        for batch in epoch_loader(epoch, iteration):
            seed_step(cfg.seed, epoch, iteration, ctx.rank)
            image = batch["image"].to(device, non_blocking=True)
            if channels_last:
                image = to_channels_last(image, dims)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(amp_dtype, device):
                loss = task.loss(model(image), label)
            penalty = weight_penalty(cfg, net)
            objective = loss if penalty is None else loss + penalty
            scaler.scale(objective).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            # One small all-reduce gives every process the global loss and the same clock, so the
            # LR schedule and the decision to stop agree everywhere (a disagreement would hang DDP).
            shared = ctx.sum_(torch.tensor([float(loss.detach()), time.monotonic() - started],
                                           dtype=torch.float64)) / ctx.world_size
            iteration += 1
            budget.step_count += 1
            budget.elapsed = float(shared[1])
            scheduler.step()
            losses.append(float(shared[0]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
            if budget.elapsed >= budget_s:
                out_of_time = True
                break
            if time.monotonic() - last_saved >= checkpoint_every_s and iteration < iterations:
                state.update(epoch=epoch, iteration=iteration, partial_losses=losses, elapsed=budget.elapsed)
                save_last()
                last_saved = time.monotonic()
        bar.close()
        if not losses:
            break
        epoch += 1
        record: dict[str, float] = {"epoch": epoch, "train/loss": float(np.mean(losses)),
                                    "lr": optimizer.param_groups[0]["lr"],
                                    # training only (a resumed epoch: its remaining part), validation excluded
                                    "time/epoch_train_s": time.monotonic() - epoch_started}
        last_epoch = epoch >= cfg.train.max_epochs or out_of_time
        if val_ds is not None and (epoch % cfg.train.val_interval == 0 or last_epoch):
            record.update(task.validate(net, val_ds, device, amp_dtype, progress and ctx.is_main))
            net.train()
            score = record[select]
            if not math.isnan(score) and score > state["best_metric"]:
                state.update(best_metric=score, best_epoch=epoch, stale_validations=0)
                if ctx.is_main:
                    save_checkpoint(best_path, {"model": net.state_dict(), "epoch": epoch, "metric": select,
                                                select: score, "config": json.dumps(config_to_dict(cfg))})
            else:
                state["stale_validations"] += 1
        state["elapsed"] = time.monotonic() - started  # validation time counts against the budget too
        record["time/elapsed_min"] = state["elapsed"] / 60
        state.update(epoch=epoch, iteration=0, partial_losses=[])
        state["history"].append(record)
        patience = cfg.train.early_stopping_patience
        if patience and state["stale_validations"] >= patience:
            log.info("early stopping: %s did not improve in %d validations", select, patience)
            state["stopped_early"] = True  # saved below, so a resumed run does not train on
        # Checkpoint first, then log: a crash in between is healed on resume (see below), while the
        # other order would log an epoch twice.
        save_last()
        last_saved = time.monotonic()
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
    if ckpt is not None:  # epochs checkpointed but not logged before the crash (the tracker skips logged steps)
        for record in state["history"]:
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
    if out_of_time:
        log.info("wall-clock budget of %.1f min reached after %d epochs", cfg.train.max_minutes, epoch)
    if ctx.is_main and not best_path.is_file():  # no validation split: the last weights are the ones to use
        save_checkpoint(best_path, {"model": net.state_dict(), "epoch": epoch, "metric": select, select: float("nan"),
                                    "config": json.dumps(config_to_dict(cfg))})

    history_path, curve = out_dir / "history.csv", out_dir / "plots" / "learning_curve.png"
    if ctx.is_main:
        write_history(state["history"], history_path)
        learning_curve(state["history"], curve, metric=select)
    final = {k: v for rec in state["history"] for k, v in rec.items() if k != "epoch"}
    final.update({"best_val/epoch": state["best_epoch"], "train/epochs": epoch, "train/minutes": state["elapsed"] / 60})
    tracker.log_metrics({k: final[k] for k in ("best_val/epoch", "train/epochs", "train/minutes")}, step=epoch)
    return TrainOutputs(best_path, last_path, history_path, curve, final)


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
    import medseg

    pre = cfg.preprocess
    return {
        "medseg_version": medseg.__version__,
        "task": str(cfg.task),
        "spatial_dims": cfg.model.spatial_dims,
        "in_channels": len(cfg.data.channels),
        "channel_names": list(cfg.data.channels),
        "labels": {str(k): v for k, v in (cfg.data.labels or {}).items()},
        "orientation": pre.orientation,
        "spacing": list(pre.spacing) if pre.spacing else None,
        "intensity": pre.intensity.model_dump(mode="json"),
        "crop_foreground": pre.crop_foreground,
    }


def package_model(network: nn.Module, checkpoint: Path, contract: dict[str, Any], out_dir: Path,
                  tracker: MlflowTracker, registered_name: str | None = None) -> tuple[Path, str]:
    """Load ``checkpoint`` into ``network`` and log it as an MLflow PyTorch model carrying ``contract``.

    Returns:
        ``(contract.json path, model URI)``.
    """
    contract_path = atomic_write_text(out_dir / "contract.json", json.dumps(contract, indent=2))
    network.load_state_dict(load_checkpoint(checkpoint)["model"])
    network.eval()
    tracker.log_artifact(contract_path)
    return contract_path, tracker.log_model(network, contract, contract_path, registered_name=registered_name)


def write_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    keys: list[str] = []
    for rec in history:
        keys.extend(k for k in rec if k not in keys)
    return write_csv(path, keys, [{k: f"{r[k]:.6g}" for k in r} for r in history])


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """A CSV written atomically (rows may leave fields out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
