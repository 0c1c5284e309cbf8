"""The CNN lineage on medical data: perceptron, MLP, LeNet, AlexNet, VGG, GoogLeNet, ResNet-18 and
DenseNet-121, each trained for the same wall-clock budget on PneumoniaMNIST, BreastMNIST and
AdrenalMNIST3D (MedMNIST v2, official splits), scored once on the official test split.

Each run is one ``medseg.train`` of the dataset's config (``configs/medmnist_*.yaml``: its input,
augmentation, loss, optimiser, batch, width factor and stem) with ``model.name`` and the network's
own options overridden (:data:`NETWORKS`), ``train.max_minutes`` set to the budget and no epoch cap,
so the learning-rate schedule follows the clock. Per network and dataset the table gives the
parameters, the FLOPs of one forward pass at the input size (``torch.utils.flop_counter``, one image),
the seconds per training epoch on this machine (median of the epochs the budget finished; the last
epoch is cut by the budget), and test AUC and ACC (mean ± std over seeds).

Every (dataset, network) entry is written into ``lineage.json`` as soon as it is done and
``lineage.md`` is rewritten from all entries, so a rerun with ``--datasets``/``--networks``/``--seeds``
adds or replaces entries.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_lineage.py [--budget-s 30] [--seeds 0,1,2]
       [--datasets pneumonia,breast,adrenal3d] [--networks perceptron,...] [--out benchmarks/results] [--tiny]

The data come from ``make medmnist`` (the manifests the configs name). ``--tiny`` (benchmarks/tiny.py):
8/4/4 train/val/test images of each dataset's ``.npz`` (the first of each class, half and half) imported into a temporary folder, one
epoch of batch 4 per run, one seed, and unless ``--datasets``/``--networks`` say otherwise one 2D and
one 3D dataset and two networks (:data:`TINY_DATASETS`, :data:`TINY_NETWORKS`: every run is the same
``medseg.train`` path, and each run costs half a minute of MLflow and packaging); for the test suite,
never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
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
    return {"parameters": sum(p.numel() for p in net.parameters()), "flops": counter.get_total_flops(),
            "input": list(cfg.preprocess.resize), "dropout": cfg.model.dropout,
            "widen_factor": cfg.model.widen_factor, "stem": str(cfg.model.stem)}


def _seconds_per_epoch(run_dir: Path) -> tuple[float | None, float]:
    """Median training seconds of the epochs finished within the budget (None when none was), and
    the training seconds of the last, budget-cut epoch."""
    with open(run_dir / "history.csv", newline="") as fh:
        seconds = [float(row["time/epoch_train_s"]) for row in csv.DictReader(fh)]
    return (statistics.median(seconds[:-1]) if len(seconds) > 1 else None), seconds[-1]


def _train(key: str, overrides: list[str], seed: int) -> dict[str, Any]:
    import medseg

    result = medseg.train(REPO / "configs" / DATASETS[key][1], overrides=[*overrides, f"seed={seed}"], progress=False)
    assert result is not None  # one process: the main one
    per_epoch, last = _seconds_per_epoch(result.run_dir)
    with open(result.run_dir / "evaluation" / "test_cases.csv", newline="") as fh:
        test_cases = sum(1 for _ in csv.DictReader(fh))
    metrics = result.metrics
    return {"seed": seed, "epochs": metrics.get("train/epochs"), "train_minutes": metrics.get("train/minutes"),
            "s_per_epoch": per_epoch, "last_epoch_s": last, "test_auc": metrics.get("test/auc"),
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
    """Median seconds per finished epoch over seeds, or a floor when the budget finished none."""
    finished = [s["s_per_epoch"] for s in seeds if s["s_per_epoch"] is not None]
    if finished:
        return f"{statistics.median(finished):.1f}"
    return f"> {max(s['last_epoch_s'] for s in seeds):.0f} (none finished)"


def _row(network: str, entry: dict[str, Any]) -> str:
    seeds = entry["seeds"]
    auc, auc_sd = _mean_std([s["test_auc"] for s in seeds])
    acc, acc_sd = _mean_std([s["test_acc"] for s in seeds])
    epochs = statistics.median(float(s["epochs"] or 0) for s in seeds)
    return (f"| {network} | {entry['parameters']:,} | {_flops(entry['flops'])} | {_epoch_cell(seeds)} | "
            f"{epochs:g} | {_fmt(auc, auc_sd)} | {_fmt(acc, acc_sd)} | {len(seeds)} |")


def markdown(results: dict[str, Any]) -> str:
    """``lineage.md`` from every entry of ``lineage.json``."""
    lines = ["# The CNN lineage on MedMNIST at one budget", "",
             "Written by " + ", ".join(f"`{c}`" for c in results.get("commands", [results.get("command", "?")]))
             + " (each entry with its own date in `lineage.json`). Every network trained for the same "
             "wall-clock budget per run on this CPU, one `medseg.train` of the dataset's config with `model.name` "
             "(and the network's options) overridden; scored once on the official test split with the checkpoint "
             "of the best validation AUC.", "",
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
        lines += [_row(network, entries[network]) for network in NETWORKS if network in entries]
        missing = [network for network in NETWORKS if network not in entries]
        if missing:
            lines += ["", f"Not measured yet on {name}: {', '.join(missing)}."]
        budgets = sorted({e["budget_s"] for e in entries.values()})
        lines += ["", f"Budget per run: {', '.join(f'{b:g}' for b in budgets)} s of training (validation "
                  f"included); width factor {first['widen_factor']:g} and stem `{first['stem']}` from the config "
                  "(DenseNet-121 has no width factor; VGG no stem choice); test cases: "
                  f"{int(first['seeds'][0]['test_cases'] or 0)}.", ""]
    lines += ["Networks: " + "; ".join(f"**{n}** `{' '.join(o)}`" for n, o in NETWORKS.items()) + ".", "",
              "FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one forward pass of one image in eval mode "
              "(a multiply-add counts 2). Seconds per epoch: the median training time (validation excluded) of "
              "the epochs that finished within the budget, over seeds; with none finished, the budget-cut "
              "epoch's time as a floor.", ""]
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
        new["seeds"] = sorted([s for s in old["seeds"] if s["seed"] not in rerun] + new["seeds"],
                              key=lambda s: s["seed"])
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
        results.update(about)
        results["commands"] = [*[c for c in results.get("commands", []) if c != about["command"]], about["command"]]
        results["entries"].setdefault(key, {})[network] = _merge(results["entries"].get(key, {}).get(network), entry)
        atomic_write_text(json_path, json.dumps(results, indent=2))
        atomic_write_text(out / "lineage.md", markdown(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=30.0, help="training seconds per run (validation included)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--networks", help=f"comma-separated, of {', '.join(NETWORKS)} (default: all)")
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
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/bench_lineage.py", *(sys.argv[1:] if argv is None else argv)])
    for key in datasets:
        scratch = scratch_folder(f"bench-lineage-{key}-", args, out)
        # one disk cache per dataset, shared by its runs (and by concurrent invocations): each run
        # then reads the preprocessed images instead of loading and resizing every file again
        cache = scratch / "cache" if args.tiny else Path(tempfile.gettempdir()) / "medseg-bench-lineage-cache" / key
        common = [*_data(key, scratch, args.tiny), f"output_dir={scratch / 'runs'}",
                  f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", "train.device=cpu", "validation.tsne=false",
                  "data.cache=disk", f"data.cache_dir={cache}", *_budget(args)]
        for network in networks:
            overrides = [*common, *NETWORKS[network]]
            started = time.monotonic()
            host = _host()
            entry = {**_size(overrides, key), "overrides": NETWORKS[network], "budget_s": args.budget_s,
                     "seeds": [_train(key, overrides, seed) for seed in seeds],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            entry["wall_s"] = round(time.monotonic() - started, 1)
            _record(out, key, network, entry, {"host": host, "command": command})
            print(f"{key} {network}: {json.dumps(entry)}", flush=True)
        if not args.tiny:  # the runs and their MLflow store: the figures are in lineage.json
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
