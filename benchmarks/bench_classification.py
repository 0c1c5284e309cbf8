"""Classification training: medseg's data path beside a plain MONAI tutorial pipeline, same work.

Workload: the PneumoniaMNIST training split (4708 files of 28x28), the network, batch,
optimiser and augmentation of ``configs/medmnist_pneumonia.yaml``. Both paths train the same
number of steps per epoch; only the data path differs:

- **medseg**: the deterministic prefix (load, window, resize) cached once in memory
  (``CacheDataset``), the seeded sample stream (``EpochSamples``) augmenting in-process with
  ``ThreadDataLoader`` and torch threads = cores: what ``medseg run`` does.
- **plain MONAI** (MedNIST tutorial style): ``Dataset`` with ``LoadImaged`` and every transform
  per epoch, ``DataLoader(num_workers=2, shuffle=True)``, torch's default threads.

Each path runs in its own child process, interleaved, several repetitions; the table gives the
median samples/s of the first epoch and of the later ones, and the ratio medseg/plain.

Usage: python benchmarks/bench_classification.py [--repeats 3] [--epochs 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
CONFIG = REPO / "configs" / "medmnist_pneumonia.yaml"


def _worker(args: argparse.Namespace) -> None:
    """Child process: train ``--epochs`` epochs with one data path; print one JSON line."""
    import torch
    from monai.data import DataLoader, Dataset, ThreadDataLoader

    from medseg.config import load_config
    from medseg.data.datasets import make_dataset, records
    from medseg.data.manifest import read_manifest
    from medseg.data.sampling import EpochSamples, epoch_order, process_positions, split_transforms
    from medseg.tasks.classification import create_classification_loss
    from medseg.training.classification import build_classifier
    from medseg.training.loop import make_optimizer
    from medseg.training.runtime import configure_threads
    from medseg.transforms import classification_transforms

    cfg = load_config(CONFIG, [f"data.root={args.root}", f"data.manifest={args.manifest}"])
    torch.manual_seed(0)
    items = records(read_manifest(args.manifest).split("train"), Path(args.root), class_labels=True)
    chain = classification_transforms(cfg.preprocess, cfg.augment, 2)
    batch = cfg.train.batch_size
    steps = len(items) // batch
    net = build_classifier(cfg)
    optimiser = make_optimizer(cfg, net)
    loss_fn = create_classification_loss(cfg.loss, None)
    if args.path == "medseg":
        configure_threads(None, 1)
        prefix, rest = split_transforms(chain)
        started = time.perf_counter()
        cached = make_dataset(items, prefix, cfg.data, Path(args.workdir) / "cache", progress=False)
        cache_seconds = time.perf_counter() - started

        def loader(epoch: int):
            length, positions = process_positions(steps, batch, 1, 0)
            samples = EpochSamples(cached, rest, epoch_order(len(cached), length, 0, epoch), positions, 0, epoch)
            return ThreadDataLoader(samples, batch_size=batch, shuffle=False, num_workers=0)
    else:
        cache_seconds = 0.0
        dataset = Dataset(items, chain)

        def loader(epoch: int):
            return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)

    epochs = []
    net.train()
    for epoch in range(args.epochs):
        started = time.perf_counter()
        seen = 0
        for step, batch_data in enumerate(loader(epoch)):
            if step >= steps:
                break
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch_data["image"]), batch_data["label"])
            loss.backward()
            optimiser.step()
            seen += len(batch_data["label"])
        seconds = time.perf_counter() - started + (cache_seconds if epoch == 0 else 0.0)
        epochs.append({"seconds": seconds, "samples": seen, "samples_per_s": seen / seconds})
    print(json.dumps({"path": args.path, "epochs": epochs, "threads": torch.get_num_threads()}))


def _run_child(path: str, args: argparse.Namespace, workdir: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", path, "--root", str(args.root), "--manifest",
                           str(args.manifest), "--epochs", str(args.epochs), "--workdir", str(workdir)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{path} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first includes caching)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--worker", choices=["medseg", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.path = args.worker
        _worker(args)
        return
    from medseg.data.medmnist import import_medmnist

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args.root, args.manifest = workdir / "images", workdir / "manifest.csv"
        import_medmnist(NPZ, args.manifest, args.root, progress=False)
        runs: dict[str, list[dict]] = {"medseg": [], "plain": []}
        for repeat in range(args.repeats):
            for path in ("plain", "medseg") if repeat % 2 else ("medseg", "plain"):
                result = _run_child(path, args, workdir)
                runs[path].append(result)
                print(f"repeat {repeat + 1} {path}: " + ", ".join(f"{e['samples_per_s']:.0f}" for e in result["epochs"])
                      + " samples/s per epoch", flush=True)
    summary = {}
    for path, results in runs.items():
        first = statistics.median(r["epochs"][0]["samples_per_s"] for r in results)
        later = statistics.median(e["samples_per_s"] for r in results for e in r["epochs"][1:]) if args.epochs > 1 else None
        summary[path] = {"first_epoch_samples_per_s": first, "steady_samples_per_s": later}
    ratio_first = summary["medseg"]["first_epoch_samples_per_s"] / summary["plain"]["first_epoch_samples_per_s"]
    ratio_steady = (summary["medseg"]["steady_samples_per_s"] / summary["plain"]["steady_samples_per_s"]
                    if args.epochs > 1 else None)
    report = {"workload": "PneumoniaMNIST train split, configs/medmnist_pneumonia.yaml network and augmentation",
              "repeats": args.repeats, "epochs": args.epochs, "runs": runs, "summary": summary,
              "ratio_first_epoch": ratio_first, "ratio_steady": ratio_steady}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "classification.json").write_text(json.dumps(report, indent=2))
    table = ["| path | first epoch (samples/s) | later epochs (samples/s) |", "|---|---|---|"]
    for path in ("plain", "medseg"):
        s = summary[path]
        steady = f"{s['steady_samples_per_s']:.0f}" if s["steady_samples_per_s"] else "-"
        table.append(f"| {'plain MONAI (Dataset, 2 workers)' if path == 'plain' else 'medseg'} | "
                     f"{s['first_epoch_samples_per_s']:.0f} | {steady} |")
    table.append(f"| **ratio medseg / plain** | **{ratio_first:.2f}x** | "
                 f"**{ratio_steady:.2f}x** |" if ratio_steady else f"| ratio | {ratio_first:.2f}x | - |")
    (args.out / "classification.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
