"""The CNN lineage on medical data: perceptron, MLP, LeNet, AlexNet, VGG, GoogLeNet, ResNet-18 and
DenseNet-121, each trained for the same wall-clock budget on PneumoniaMNIST, BreastMNIST and
AdrenalMNIST3D (MedMNIST v2, official splits), scored once on the official test split.

Each run is one ``medseg.train`` of the dataset's config (``configs/medmnist_*.yaml``: its input,
augmentation, loss, optimiser, batch, width factor and stem) with ``model.name`` and the network's
own options overridden (:data:`NETWORKS`), ``train.max_minutes`` set to the budget and no epoch cap,
so the learning-rate schedule follows the clock. Per network and dataset the table gives the
parameters, the FLOPs of one forward pass at the input size (``torch.utils.flop_counter``, one image),
the seconds per training epoch on this machine (median of the epochs the budget finished; the last
epoch is cut by the budget; with none finished, the seconds per optimiser step, from the history's
``time/epoch_steps``, times an epoch's steps), and test AUC and ACC (mean ± std over seeds).

A run is verify, training and the test split's scoring (:func:`_test_only`): the validation
re-scoring and the packaged MLflow model of ``medseg.train`` cost seconds a run and change no figure
of the table; ``--full-pipeline`` runs every stage. MLflow system metrics are off.

Every (dataset, network) entry is written into ``lineage.json`` as soon as it is done and
``lineage.md`` is rewritten from all entries, so a rerun with ``--datasets``/``--networks``/``--seeds``
adds or replaces entries.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_lineage.py [--budget-s 30] [--seeds 0,1,2]
       [--datasets pneumonia,breast,adrenal3d] [--networks perceptron,...] [--budget-note TEXT]
       [--full-pipeline] [--out benchmarks/results] [--tiny]

The data come from ``make medmnist`` (the manifests the configs name). ``--tiny`` (benchmarks/tiny.py):
8/4/4 train/val/test images of each dataset's ``.npz`` (the first of each class, half and half) imported into a temporary folder, one
epoch of batch 4 per run, one seed, and unless ``--datasets``/``--networks`` say otherwise one 2D and
one 3D dataset and two networks (:data:`TINY_DATASETS`, :data:`TINY_NETWORKS`: every run is the same
run path); for the test suite,
never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"
#: key -> (name, config, MedMNIST file)
DATASETS = {"pneumonia": ("PneumoniaMNIST", "medmnist_pneumonia.yaml", "pneumoniamnist.npz"),
            "breast": ("BreastMNIST", "medmnist_breast.yaml", "breastmnist.npz"),
            "adrenal3d": ("AdrenalMNIST3D", "medmnist_adrenal3d.yaml", "adrenalmnist3d.npz")}
#: The lineage, oldest first: each network's config overrides (the rest is the dataset's config).
#: The perceptron is the MLP without hidden layers; LeNet has LeNet-5's 6 and 16 filters; AlexNet,
#: VGG and GoogLeNet get their papers' classifier dropout.
NETWORKS: dict[str, list[str]] = {
    "perceptron": ["model.name=mlp", "model.channels=[]"],
    "mlp": ["model.name=mlp", "model.channels=[256,128]"],
    "lenet": ["model.name=lenet", "model.channels=[6,16]"],
    "alexnet": ["model.name=alexnet", "model.dropout=0.5"],
    "vgg16": ["model.name=vgg16", "model.dropout=0.5"],
    "googlenet": ["model.name=googlenet", "model.dropout=0.4"],
    "resnet18": ["model.name=resnet18"],
    "densenet121": ["model.name=densenet121"],
}
TINY_IMAGES = {"train": 8, "val": 4, "test": 4}
TINY_DATASETS = ("breast", "adrenal3d")
TINY_NETWORKS = ("perceptron", "googlenet")


def _data(key: str, scratch: Path, tiny: bool) -> list[str]:
    """Overrides pointing the dataset's config at its data: the ``make medmnist`` import, or a tiny one."""
    from medseg import load_config

    if not tiny:
        data = load_config(REPO / "configs" / DATASETS[key][1]).data  # its paths resolved against configs/
        if not Path(data.manifest).is_file():
            raise SystemExit(f"{data.manifest} is missing: run `make medmnist` first (it imports the MedMNIST files)")
        return [f"data.manifest={data.manifest}", f"data.root={data.root}"]
    import numpy as np

    from medseg.data.medmnist import import_medmnist

    source = MEDMNIST / DATASETS[key][2]
    subset = {}
    with np.load(source) as arrays:
        for split, count in TINY_IMAGES.items():  # half of class 0, half of the others: AUC is defined
            labels = arrays[f"{split}_labels"].reshape(-1)
            keep = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:count // 2],
                                           np.flatnonzero(labels != 0)[:count - count // 2]]))
            subset.update({f"{split}_images": arrays[f"{split}_images"][keep], f"{split}_labels": arrays[f"{split}_labels"][keep]})
    small = scratch / source.name
    np.savez(small, **subset)
    manifest, root = scratch / f"{key}.csv", scratch / key
    import_medmnist(small, manifest, root, progress=False)
    return [f"data.manifest={manifest}", f"data.root={root}"]


def _size(overrides: list[str], key: str) -> dict[str, Any]:
    """Parameters and forward FLOPs of one image at the config's input size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg import load_config
    from medseg.tasks.classification.training import build_classifier

    cfg = load_config(REPO / "configs" / DATASETS[key][1], overrides)
    net = build_classifier(cfg).eval()
    image = torch.zeros(1, len(cfg.data.channels), *cfg.preprocess.resize)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(image)
    with open(cfg.data.manifest, newline="") as fh:
        train_cases = sum(1 for row in csv.DictReader(fh) if row["split"] == "train")
    return {"parameters": sum(p.numel() for p in net.parameters()), "flops": counter.get_total_flops(),
            "train_cases": train_cases, "batch_size": cfg.train.batch_size,
            "steps_per_epoch": cfg.train.iterations_per_epoch or math.ceil(train_cases / cfg.train.batch_size),
            "input": list(cfg.preprocess.resize), "dropout": cfg.model.dropout,
            "widen_factor": cfg.model.widen_factor, "stem": str(cfg.model.stem)}


def _timing(run_dir: Path, steps_per_epoch: int) -> dict[str, float | None]:
    """Median training seconds of the epochs finished within the budget (None when none was), the
    training seconds and steps of the last, budget-cut epoch, and the seconds per step over every
    epoch (``time/epoch_steps``) scaled to a whole epoch: the estimate that still says something when
    the budget ended before the first epoch did."""
    with open(run_dir / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seconds = [float(row["time/epoch_train_s"]) for row in rows]
    steps = [int(float(row["time/epoch_steps"])) for row in rows]
    return {"s_per_epoch": statistics.median(seconds[:-1]) if len(seconds) > 1 else None,
            "last_epoch_s": seconds[-1], "last_epoch_steps": steps[-1],
            "s_per_step": sum(seconds) / max(sum(steps), 1),
            "s_per_epoch_est": sum(seconds) / max(sum(steps), 1) * steps_per_epoch}


def _test_only(task: Any) -> Any:
    """The standard stages less what the table does not use: verify, train, then the best checkpoint
    scored on the test split alone; no validation re-scoring (its temperature fit changes neither the
    test AUC nor the argmax ACC) and no packaged MLflow model (seconds a run, 72 runs)."""
    test = [(split, prefix) for split, prefix in task.evaluated_splits if split == "test"]

    def pipeline(ctx: Any) -> None:
        ctx.headline_patterns = task.headline_metrics
        trained = ctx.verify_and_train(task.train, task.verify_options(ctx.cfg))
        for split, prefix in test:
            ctx.metrics.update(task.evaluate(ctx, trained.best_checkpoint, split, prefix))
    return pipeline


def _run(key: str, overrides: list[str], full: bool) -> Any:
    """One run: ``medseg.train`` (every stage) with ``full``, else the test-only pipeline."""
    import medseg
    from medseg.engine.runner import run_pipeline

    config = REPO / "configs" / DATASETS[key][1]
    if full:
        return medseg.train(config, overrides=overrides, progress=False)
    cfg = medseg.load_config(config, overrides)
    task = medseg.get_task(str(cfg.task))
    return medseg.RunResult.from_summary(run_pipeline(cfg, _test_only(task), progress=False,
                                                      prepare_data=task.prepare_data))


def _train(key: str, overrides: list[str], seed: int, steps_per_epoch: int, full: bool) -> dict[str, Any]:
    result = _run(key, [*overrides, f"seed={seed}"], full)
    with open(result.run_dir / "evaluation" / "test_cases.csv", newline="") as fh:
        test_cases = sum(1 for _ in csv.DictReader(fh))
    metrics = result.metrics
    return {"seed": seed, "epochs": metrics.get("train/epochs"), "train_minutes": metrics.get("train/minutes"),
            **_timing(result.run_dir, steps_per_epoch), "test_auc": metrics.get("test/auc"),
            "test_acc": metrics.get("test/acc"), "test_cases": test_cases, "run_id": result.run_id}


def _budget(args: argparse.Namespace) -> list[str]:
    if args.tiny:
        return ["train.max_epochs=1", "train.max_minutes=null", "train.batch_size=4"]
    return [f"train.max_minutes={args.budget_s / 60:.6g}", "train.max_epochs=null"]


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else None)


def _fmt(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def _flops(flops: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:g}"


def _epoch_cell(seeds: list[dict[str, Any]]) -> str:
    """Median seconds per finished epoch over seeds; when the budget finished none, the seconds per
    step scaled to an epoch (``≈``), or, for entries from before steps were recorded, a floor."""
    finished = [s["s_per_epoch"] for s in seeds if s["s_per_epoch"] is not None]
    if finished:
        return f"{statistics.median(finished):.1f}"
    estimates = [s["s_per_epoch_est"] for s in seeds if s.get("s_per_epoch_est") is not None]
    if estimates:
        return f"≈ {statistics.median(estimates):.0f} (none finished)"
    return f"> {max(s['last_epoch_s'] for s in seeds):.0f} (none finished)"


def _loads(entries: dict[str, Any]) -> str:
    """The range of the 1-minute load averages seen at the start and end of the entries' runs."""
    loads = [v for e in entries.values() for v in e.get("load_average", [])]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def _row(network: str, entry: dict[str, Any], budget: float) -> str:
    """The entry's table row; an entry of another budget than the dataset's latest says its own."""
    seeds = entry["seeds"]
    if entry["budget_s"] != budget:
        network = f"{network} ({entry['budget_s']:g} s, an earlier run)"
    auc, auc_sd = _mean_std([s["test_auc"] for s in seeds])
    acc, acc_sd = _mean_std([s["test_acc"] for s in seeds])
    epochs = statistics.median(float(s["epochs"] or 0) for s in seeds)
    return (f"| {network} | {entry['parameters']:,} | {_flops(entry['flops'])} | {_epoch_cell(seeds)} | "
            f"{epochs:g} | {_fmt(auc, auc_sd)} | {_fmt(acc, acc_sd)} | {len(seeds)} |")


def markdown(results: dict[str, Any]) -> str:
    """``lineage.md`` from every entry of ``lineage.json``."""
    # the commands of the entries shown (an entry replaced by a rerun takes its command with it)
    entries = [e for d in results.get("entries", {}).values() for e in d.values()]
    older = results.get("commands", [results.get("command", "?")]) if any("command" not in e for e in entries) else []
    commands = list(dict.fromkeys([*[e["command"] for e in entries if "command" in e], *older]))
    lines = ["# The CNN lineage on MedMNIST at one budget", "",
             "Written by " + ", ".join(f"`{c}`" for c in commands)
             + " (each entry with its own date in `lineage.json`). Every network trained for the same "
             "wall-clock budget per run on this CPU (one budget per dataset), one run of the dataset's config with "
             "`model.name` (and the network's options) overridden: verify, train, then scored once on the official "
             "test split with the checkpoint of the best validation AUC.", "",
             f"**The host was shared** with other sessions' work while these ran ({results.get('host', '?')}): "
             "seconds per epoch, and so the epochs a budget bought, vary with their load and compare only "
             "roughly across rows. The budgets are far below what these networks need to converge: the table "
             "shows what each step of the lineage buys in a short, equal budget, not what it can reach.", ""]
    for key, (name, config, _) in DATASETS.items():
        entries = results.get("entries", {}).get(key, {})
        if not entries:
            continue
        first = next(iter(entries.values()))
        lines += [f"## {name} (`configs/{config}`, input {'x'.join(map(str, first['input']))})", "",
                  "| network | parameters | FLOPs / image (forward) | s / epoch | epochs (last cut by the budget) | "
                  "test AUC | test ACC | seeds |", "|---|---|---|---|---|---|---|---|"]
        latest = max(entries.values(), key=lambda e: e.get("date", ""))["budget_s"]
        lines += [_row(network, entries[network], latest) for network in NETWORKS if network in entries]
        missing = [network for network in NETWORKS if network not in entries]
        if missing:
            lines += ["", f"Not measured yet on {name}: {', '.join(missing)}."]
        budgets = sorted({e["budget_s"] for e in entries.values()})
        lines += ["", f"Budget per run: {', '.join(f'{b:g}' for b in budgets)} s of training (validation "
                  f"included). {results.get('budget_notes', {}).get(key, '')} Width factor "
                  f"{first['widen_factor']:g} and stem `{first['stem']}` from the config (DenseNet-121 has no "
                  "width factor; VGG no stem choice); "
                  + (f"{first['train_cases']} training images, {first['steps_per_epoch']} steps of batch "
                     f"{first['batch_size']} per epoch; " if "train_cases" in first else "")
                  + f"test cases: {int(first['seeds'][0]['test_cases'] or 0)}. Load average (1 min) on the "
                  f"2-core host while these ran: {_loads(entries)}.", ""]
    lines += ["Networks: " + "; ".join(f"**{n}** `{' '.join(o)}`" for n, o in NETWORKS.items()) + ".", "",
              "FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one forward pass of one image in eval mode "
              "(a multiply-add counts 2). Seconds per epoch: the median training time (validation excluded) of "
              "the epochs that finished within the budget, over seeds; with none finished, `≈`: the seconds "
              "per optimiser step of the budget-cut epoch (`time/epoch_steps` in the run's history) times the "
              "steps of a whole epoch (median over seeds; it includes the first steps' warm-up, so it errs "
              "high); `>`: a floor, in entries from before steps were recorded. Each run is `verify`, training "
              "and the test split's scoring (`--full-pipeline` adds the validation re-scoring and the packaged "
              "MLflow model, which the table does not use); MLflow system metrics off.", ""]
    return "\n".join(lines)


def _choices(text: str, known: Any, flag: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {list(known)}")
    return chosen


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, with the seeds of ``old`` it did not rerun when both had the same budget."""
    if old and old.get("budget_s") == new["budget_s"]:
        rerun = {s["seed"] for s in new["seeds"]}
        kept = [s for s in old["seeds"] if s["seed"] not in rerun]
        new["seeds"] = sorted(kept + new["seeds"], key=lambda s: s["seed"])
        if not kept:
            return new
        # the invocations' wall time and load averages together (the seeds came from both)
        new["wall_s"] = round(old.get("wall_s", 0.0) + new.get("wall_s", 0.0), 1)
        new["load_average"] = [*old.get("load_average", []), *new.get("load_average", [])]
        if old.get("command") and old["command"] != new.get("command"):
            new["command"] = f"{old['command']} && {new.get('command', '?')}"
    return new


def _host() -> str:
    return (f"{platform.node() or 'host'}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
            f"{os.getloadavg()[0]:.1f} when the last entry started")


def _record(out: Path, key: str, network: str, entry: dict[str, Any], about: dict[str, str]) -> None:
    """Add ``entry`` to ``lineage.json`` (read again under a lock, so that invocations running side by
    side keep each other's entries) and rewrite ``lineage.md``."""
    import fcntl

    from medseg.io.atomic import atomic_write_text

    json_path = out / "lineage.json"
    # named by a digest of the folder (str hashes differ between processes)
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"medseg-bench-lineage-{digest}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {"entries": {}}
        notes = about.pop("budget_note", None)
        results.update(about)
        if notes:
            results.setdefault("budget_notes", {})[key] = notes
        results["commands"] = [*[c for c in results.get("commands", []) if c != about["command"]], about["command"]]
        entry["command"] = about["command"]
        results["entries"].setdefault(key, {})[network] = _merge(results["entries"].get(key, {}).get(network), entry)
        atomic_write_text(json_path, json.dumps(results, indent=2))
        atomic_write_text(out / "lineage.md", markdown(results))


def _command(argv: list[str]) -> str:
    """The command line as the table names it: the note, printed under the table, not repeated."""
    words = [("'<the note under its table>'" if i and argv[i - 1] == "--budget-note" else shlex.quote(w))
             for i, w in enumerate(argv)]
    return " ".join(["OMP_NUM_THREADS=1 python benchmarks/bench_lineage.py", *words])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=30.0, help="training seconds per run (validation included)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--networks", help=f"comma-separated, of {', '.join(NETWORKS)} (default: all)")
    parser.add_argument("--full-pipeline", action="store_true",
                        help="every stage of medseg.train (validation re-scoring, the packaged MLflow model); "
                        "default: verify, train and score the test split only")
    parser.add_argument("--budget-note", help="why this budget: printed under the dataset's table")
    add_tiny_arguments(parser)
    args = parser.parse_args(argv)
    args.datasets = args.datasets or ",".join(TINY_DATASETS if args.tiny else DATASETS)
    args.networks = args.networks or ",".join(TINY_NETWORKS if args.tiny else NETWORKS)

    datasets = _choices(args.datasets, DATASETS, "--datasets")
    networks = _choices(args.networks, NETWORKS, "--networks")
    seeds = [0] if args.tiny else [int(s) for s in _choices(args.seeds, [s.strip() for s in args.seeds.split(",")],
                                                              "--seeds")]
    out = results_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    command = _command(sys.argv[1:] if argv is None else argv)
    for key in datasets:
        scratch = scratch_folder(f"bench-lineage-{key}-", args, out)
        # one disk cache per dataset, shared by its runs (and by concurrent invocations): each run
        # then reads the preprocessed images instead of loading and resizing every file again
        cache = scratch / "cache" if args.tiny else Path(tempfile.gettempdir()) / "medseg-bench-lineage-cache" / key
        common = [*_data(key, scratch, args.tiny), f"output_dir={scratch / 'runs'}",
                  f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", "tracking.system_metrics=false",
                  "train.device=cpu", "validation.tsne=false",
                  "data.cache=disk", f"data.cache_dir={cache}", *_budget(args)]
        for network in networks:
            overrides = [*common, *NETWORKS[network]]
            started, load_before = time.monotonic(), os.getloadavg()[0]
            host = _host()
            size = _size(overrides, key)
            entry = {**size, "overrides": NETWORKS[network], "budget_s": args.budget_s,
                     "pipeline": "full" if args.full_pipeline else "test-only",
                     "seeds": [_train(key, overrides, seed, size["steps_per_epoch"], args.full_pipeline)
                               for seed in seeds],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            entry["wall_s"] = round(time.monotonic() - started, 1)
            entry["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            _record(out, key, network, entry, {"host": host, "command": command,
                                               **({"budget_note": args.budget_note} if args.budget_note else {})})
            print(f"{key} {network}: {json.dumps(entry)}", flush=True)
        if not args.tiny:  # the runs and their MLflow store: the figures are in lineage.json
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
