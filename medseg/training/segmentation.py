"""Segmentation stages: train (patches, budgets, checkpoints), evaluate (whole volumes), package.

Each stage is a function whose inputs and outputs are files, so a run can be stopped, inspected
and resumed between stages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, ThreadDataLoader
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import medseg
from medseg.config import CacheMode, OptimizerName, RunConfig, ScheduleName, config_to_dict
from medseg.data.datasets import make_dataset, records
from medseg.data.manifest import Manifest, read_manifest
from medseg.data.sampling import EpochSamples, epoch_order, process_positions, split_transforms, stream_seed
from medseg.errors import MedsegError, UsageError
from medseg.inference.sliding import predict_logits
from medseg.io.atomic import atomic_write_text
from medseg.models import create_model
from medseg.plots import learning_curve, overlay
from medseg.tasks.segmentation import SegmentationMetrics, create_loss
from medseg.tracking import MlflowTracker
from medseg.training import distributed
from medseg.training.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from medseg.training.runtime import (
    autocast,
    autocast_dtype,
    configure_threads,
    resolve_device,
    seed_everything,
    seed_step,
)
from medseg.transforms import training_transforms, validation_transforms

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainOutputs:
    best_checkpoint: Path
    last_checkpoint: Path
    history: Path
    learning_curve: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalOutputs:
    per_case: Path
    metrics_file: Path
    overlays: tuple[Path, ...]
    metrics: dict[str, float]


@dataclass(frozen=True)
class ModelOutputs:
    contract: Path
    model_uri: str


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


def build_network(cfg: RunConfig) -> nn.Module:
    return create_model(cfg.model, len(cfg.data.channels), len(cfg.data.labels), cfg.patch.size)


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
    if o.name == OptimizerName.SGD:
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _loader_workers(cfg: RunConfig) -> int:
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    # With the deterministic work cached, augmenting a few patches costs far less than the
    # training step; extra processes would only fight the model for the cores.
    return 0 if cfg.data.cache != CacheMode.NONE else 2


def _case_spacing(item: dict[str, Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in item["image"].pixdim)


# ----------------------------------------------------------------------------------- train stage


def train(cfg: RunConfig, manifest_path: Path, root: Path, out_dir: Path, tracker: MlflowTracker, *,
          resume: bool = False, progress: bool = True) -> TrainOutputs:
    """Train a segmentation network on patches; validate whole volumes by sliding window.

    Runs in every process of a distributed job (see :mod:`medseg.training.distributed`): each
    trains on its share of the sample stream and validates its share of the validation cases;
    only the main process writes checkpoints, history and plots.

    Args:
        cfg: validated run config.
        manifest_path: manifest CSV (already verified).
        root: data root of the manifest's paths.
        out_dir: run directory; ``checkpoints/``, ``history.csv`` and plots go here.
        tracker: MLflow run to log to (already started; a no-op tracker off the main process).
        resume: continue from ``out_dir/checkpoints/last.pt`` if it exists.
        progress: show progress bars.

    Returns:
        Paths of the best and last checkpoints, the history and the learning curve, and the final metrics.
    """
    ctx = distributed.current()
    seed_everything(cfg.seed, cfg.train.deterministic)
    threads = configure_threads(cfg.train.num_threads, ctx.local_world_size)
    device = distributed.process_device(resolve_device(cfg.train.device), ctx)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    manifest = read_manifest(manifest_path)
    train_cases, val_cases = split_cases(cfg, manifest, "train"), split_cases(cfg, manifest, "val")
    if not train_cases:
        raise MedsegError(f"{manifest_path}: no cases in the training split {cfg.data.train_split!r}; "
                          "check data.train_split / data.fold against the manifest's split and fold columns")
    if len(train_cases) < ctx.world_size:
        raise UsageError(f"{len(train_cases)} training case(s) for {ctx.world_size} processes; "
                         "use fewer processes (--nproc) or more data")
    labels = cfg.data.labels
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    batch_size = cfg.train.batch_size
    if cfg.train.deterministic and cfg.train.max_minutes:
        log.warning("train.deterministic with train.max_minutes: the number of epochs then depends on the "
                    "machine's speed; the LR schedule follows steps only")

    train_tf = training_transforms(cfg.preprocess, cfg.patch, cfg.augment, cfg.model.spatial_dims, len(labels))
    prepare_tf, augment_tf = split_transforms(train_tf)
    cache_root = cfg.data.cache_dir or out_dir / "cache"
    # A memory cache is split between processes (each holds its shard, as MONAI's partition_dataset
    # does); otherwise every process draws from one shared stream, which a DDP run then follows
    # exactly as one process with the whole global batch would.
    sharded = ctx.enabled and cfg.data.cache == CacheMode.MEMORY
    train_items = records(train_cases, root)
    if sharded:
        train_items = train_items[ctx.rank::ctx.world_size]
    train_ds = make_dataset(train_items, prepare_tf, cfg.data, cache_root / "train", progress and ctx.is_main)
    val_items = records(val_cases, root)[ctx.rank::ctx.world_size]
    val_ds: Any = None  # no validation split; otherwise every process validates (its share may be empty)
    if val_cases:
        val_ds = make_dataset(val_items, validation_transforms(cfg.preprocess), cfg.data, cache_root / "val",
                              progress and ctx.is_main) if val_items else []
    if ctx.enabled and cfg.data.cache == CacheMode.DISK:
        _warm_disk_cache(train_ds, ctx)
    stream_world, stream_rank = (1, 0) if sharded else (ctx.world_size, ctx.rank)
    stream_seed_base = stream_seed(cfg.seed, ctx.rank) if sharded else cfg.seed
    iterations = cfg.train.iterations_per_epoch or max(1, len(train_cases) // (batch_size * ctx.world_size))

    workers = _loader_workers(cfg)
    loader_cls = ThreadDataLoader if workers == 0 else DataLoader
    loader_kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}

    def epoch_loader(epoch: int, start_iteration: int) -> Any:
        length, positions = process_positions(iterations, batch_size, stream_world, stream_rank, start_iteration)
        order = epoch_order(len(train_ds), length, stream_seed_base, epoch)
        samples = EpochSamples(train_ds, augment_tf, order, positions, stream_seed_base, epoch)
        return loader_cls(samples, batch_size=batch_size, shuffle=False, drop_last=False, **loader_kwargs)

    net = build_network(cfg).to(device)
    optimizer = make_optimizer(cfg, net)
    budget = BudgetSchedule(cfg, iterations, by_time=not cfg.train.deterministic)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    loss_fn = create_loss(cfg.loss)
    metrics = SegmentationMetrics(labels, hd95=cfg.validation.hd95)

    state: dict[str, Any] = {"epoch": 0, "iteration": 0, "partial_losses": [], "best_metric": -1.0,
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
                         "data/train_cases": len(train_cases), "data/val_cases": len(val_cases),
                         # what the main process holds: its shard with a memory cache in DDP, else all
                         "data/train_cases_per_process": len(train_ds)}, step=0)
    log.info("training on %s (%d process(es) x %d threads, autocast=%s): %d train / %d val cases, "
             "%d iterations per epoch of %d x %d volumes", device, ctx.world_size, threads, amp_dtype,
             len(train_cases), len(val_cases), iterations, ctx.world_size, batch_size)

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
        iteration, losses = state["iteration"], list(state["partial_losses"])
        bar = tqdm(total=iterations, initial=iteration, desc=f"epoch {epoch + 1}/{cfg.train.max_epochs}",
                   disable=not (progress and ctx.is_main), unit="it", leave=False)
        for batch in epoch_loader(epoch, iteration):
            seed_step(cfg.seed, epoch, iteration, ctx.rank)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(amp_dtype, device):
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
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
                                    "lr": optimizer.param_groups[0]["lr"]}
        last_epoch = epoch >= cfg.train.max_epochs or out_of_time
        if val_ds is not None and (epoch % cfg.train.val_interval == 0 or last_epoch):
            record.update(validate(net, val_ds, cfg, metrics, device, amp_dtype, progress and ctx.is_main))
            score = record["val/dice_mean"]
            if not math.isnan(score) and score > state["best_metric"]:
                state.update(best_metric=score, best_epoch=epoch, stale_validations=0)
                if ctx.is_main:
                    save_checkpoint(best_path, {"model": net.state_dict(), "epoch": epoch, "val/dice_mean": score,
                                                "config": json.dumps(config_to_dict(cfg))})
            else:
                state["stale_validations"] += 1
        state["elapsed"] = time.monotonic() - started  # validation time counts against the budget too
        record["time/elapsed_min"] = state["elapsed"] / 60
        state.update(epoch=epoch, iteration=0, partial_losses=[])
        state["history"].append(record)
        patience = cfg.train.early_stopping_patience
        if patience and state["stale_validations"] >= patience:
            log.info("early stopping: val/dice_mean did not improve in %d validations", patience)
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
        save_checkpoint(best_path, {"model": net.state_dict(), "epoch": epoch, "val/dice_mean": float("nan"),
                                    "config": json.dumps(config_to_dict(cfg))})

    history_path, curve = out_dir / "history.csv", out_dir / "plots" / "learning_curve.png"
    if ctx.is_main:
        _write_history(state["history"], history_path)
        learning_curve(state["history"], curve)
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


@torch.no_grad()
def validate(model: nn.Module, dataset: Any, cfg: RunConfig, metrics: SegmentationMetrics, device: torch.device,
             amp_dtype: torch.dtype | None, progress: bool = False, prefix: str = "val") -> dict[str, float]:
    """Sliding-window prediction of whole volumes and Dice/HD95 against their labels.

    In a distributed run each process scores its share of the cases and the counts are summed
    across processes, so every process returns the single-process value.
    """
    model.eval()
    metrics.reset()
    for item in tqdm(dataset, desc=prefix, disable=not progress, leave=False, unit="case"):
        pred = predict_segmentation(model, item["image"], cfg, device, amp_dtype)
        metrics.update(pred, item["label"].as_tensor()[0], _case_spacing(item), item["case_id"])
    metrics.reduce(distributed.current())
    model.train()
    return metrics.aggregate(prefix)


def predict_segmentation(model: nn.Module, image: torch.Tensor, cfg: RunConfig, device: torch.device,
                         amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Label map (*spatial) for one preprocessed channel-first volume."""
    v = cfg.validation
    logits = predict_logits(model, image.as_tensor() if hasattr(image, "as_tensor") else image, cfg.patch.size,
                            overlap=v.overlap, sw_batch_size=v.sw_batch_size, blend=v.blend, device=device,
                            amp_dtype=amp_dtype)
    return logits.argmax(0).to(torch.uint8)


def _write_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    keys: list[str] = []
    for rec in history:
        keys.extend(k for k in rec if k not in keys)
    return _write_csv(path, keys, [{k: f"{r[k]:.6g}" for k in r} for r in history])


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------------- evaluate stage


def evaluate(cfg: RunConfig, manifest_path: Path, root: Path, checkpoint: Path, out_dir: Path, split: str,
             tracker: MlflowTracker | None = None, progress: bool = True, prefix: str | None = None) -> EvalOutputs:
    """Score a checkpoint on a whole split: per-case CSV, metrics JSON and overlay PNGs.

    Metric names are ``{prefix}/dice/<label>``, ``{prefix}/dice_mean``, ``{prefix}/dice_mean_per_case``
    and ``{prefix}/hd95/<label>``; ``prefix`` defaults to the split name.
    """
    prefix = prefix or split
    device = resolve_device(cfg.train.device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    manifest = read_manifest(manifest_path)
    cases = [c for c in split_cases(cfg, manifest, split) if c.label]
    model = build_network(cfg).to(device)
    model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    model.eval()
    dataset = make_dataset(records(cases, root), validation_transforms(cfg.preprocess), cfg.data.model_copy(
        update={"cache": CacheMode.NONE}), out_dir / "cache", progress=False)
    metrics = SegmentationMetrics(cfg.data.labels, hd95=cfg.validation.hd95)
    overlays: list[Path] = []
    for index, item in enumerate(tqdm(dataset, desc=f"evaluate {split}", disable=not progress, unit="case")):
        pred = predict_segmentation(model, item["image"], cfg, device, amp_dtype)
        truth = item["label"].as_tensor()[0]
        dice = metrics.update(pred, truth, _case_spacing(item), item["case_id"])
        if index < cfg.validation.overlays:
            title = f"{split} {item['case_id']}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
            overlays.append(overlay(item["image"].as_tensor()[0].numpy(), truth.numpy(), pred.cpu().numpy(),
                                    out_dir / "plots" / f"overlay_{split}_{item['case_id']}.png", title,
                                    len(cfg.data.labels)))
    values = metrics.aggregate(prefix)
    per_case = out_dir / "evaluation" / f"{split}_cases.csv"
    _write_csv(per_case, list(metrics.per_case[0]) if metrics.per_case else ["case_id"], metrics.per_case)
    case_means = [np.nanmean([float(r[f"dice/{n}"]) for n in metrics.names]) for r in metrics.per_case]
    values[f"{prefix}/dice_mean_per_case"] = float(np.nanmean(case_means)) if case_means else float("nan")
    metrics_file = atomic_write_text(out_dir / "evaluation" / f"{split}_metrics.json", json.dumps(values, indent=2))
    if tracker is not None:
        tracker.log_metrics(values, step=0)
        tracker.log_artifact(per_case, "evaluation")
        tracker.log_artifact(metrics_file, "evaluation")
        for path in overlays:
            tracker.log_artifact(path, "plots")
    return EvalOutputs(per_case, metrics_file, tuple(overlays), values)


# ----------------------------------------------------------------------------------- package stage


def model_contract(cfg: RunConfig) -> dict[str, Any]:
    """What inference needs to reproduce training's view of the data (MONAI bundle ``metadata.json``)."""
    pre = cfg.preprocess
    return {
        "medseg_version": medseg.__version__,
        "task": str(cfg.task),
        "spatial_dims": cfg.model.spatial_dims,
        "in_channels": len(cfg.data.channels),
        "channel_names": list(cfg.data.channels),
        "labels": {str(k): v for k, v in cfg.data.labels.items()},
        "orientation": pre.orientation,
        "spacing": list(pre.spacing) if pre.spacing else None,
        "intensity": pre.intensity.model_dump(mode="json"),
        "crop_foreground": pre.crop_foreground,
        "patch_size": list(cfg.patch.size),
        "sliding_window": {"overlap": cfg.validation.overlap, "blend": cfg.validation.blend,
                           "sw_batch_size": cfg.validation.sw_batch_size},
        "output_activation": "softmax",
        "postprocess": cfg.postprocess.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
    }


def package(cfg: RunConfig, checkpoint: Path, out_dir: Path, tracker: MlflowTracker) -> ModelOutputs:
    """Log the checkpoint's network with MLflow's PyTorch flavour, its I/O contract alongside."""
    contract = model_contract(cfg)
    contract_path = atomic_write_text(out_dir / "contract.json", json.dumps(contract, indent=2))
    model = build_network(cfg)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    tracker.log_artifact(contract_path)
    uri = tracker.log_model(model, contract, contract_path, registered_name=cfg.tracking.register_model_as)
    return ModelOutputs(contract_path, uri)


def has_labelled_cases(cfg: RunConfig, manifest_path: Path, split: str) -> bool:
    """True when ``split`` has at least one case with a label (evaluation has something to score)."""
    return any(c.label for c in split_cases(cfg, read_manifest(manifest_path), split))
