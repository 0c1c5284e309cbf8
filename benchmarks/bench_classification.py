"""Classification training: medseg's data path beside a plain MONAI tutorial pipeline, same work.

Workload: the PneumoniaMNIST training split (4708 files of 28x28), the network, batch,
optimiser and augmentation of ``configs/medmnist_pneumonia.yaml``. Both paths train the same
number of steps per epoch; only the data path differs:

- **medseg**: the deterministic prefix (load, window, resize) cached once in memory
  (``CacheDataset``), the seeded sample stream (``EpochSamples``) augmenting in-process with
  a synchronous in-process ``DataLoader`` and torch threads = cores: what ``medseg run`` does.
- **plain MONAI** (MedNIST tutorial style): ``Dataset`` with ``LoadImaged`` and every transform
  per epoch, ``DataLoader(num_workers=2, shuffle=True)``, torch's default threads.

Each path runs in its own child process, interleaved, several repetitions; the table gives the
median samples/s of the first epoch and of the later ones, and the ratio medseg/plain.

Usage: python benchmarks/bench_classification.py [--repeats 3] [--epochs 2] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): 8 training images (batch 4), 2 epochs, 1 repetition, the workers in
this process; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from interleaved import interleave, run_child, summarise_and_write, train_with_data_path
from tiny import add_tiny_arguments, results_folder

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
CONFIG = REPO / "configs" / "medmnist_pneumonia.yaml"
TINY_IMAGES = {"train": 8, "val": 4, "test": 4}
TINY_BATCH = 4


def _tiny_npz(out: Path) -> Path:
    """The first images of each split of the PneumoniaMNIST file, under its own name (so its labels are known)."""
    import numpy as np

    with np.load(NPZ) as arrays:
        subset = {f"{split}_{kind}": arrays[f"{split}_{kind}"][:count]
                  for split, count in TINY_IMAGES.items() for kind in ("images", "labels")}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / NPZ.name, **subset)
    return out / NPZ.name


def _worker(args: argparse.Namespace) -> None:
    """Child process: train ``--epochs`` epochs with one data path; print one JSON line."""
    import torch

    from medseg import load_config
    from medseg.data.datasets import records
    from medseg.data.manifest import read_manifest
    from medseg.engine.loop import loader_workers, make_optimizer
    from medseg.tasks.classification.metrics import create_classification_loss
    from medseg.tasks.classification.training import build_classifier
    from medseg.tasks.classification.transforms import classification_transforms

    overrides = [f"data.root={args.root}", f"data.manifest={args.manifest}"]
    cfg = load_config(CONFIG, overrides + ([f"train.batch_size={TINY_BATCH}"] if args.tiny else []))
    torch.manual_seed(0)
    items = records(read_manifest(args.manifest).split("train"), Path(args.root), class_labels=True)
    chain = classification_transforms(cfg.preprocess, cfg.augment, 2)
    batch = cfg.train.batch_size
    steps = len(items) // batch
    net = build_classifier(cfg)
    optimiser = make_optimizer(cfg, net)
    loss_fn = create_classification_loss(cfg.loss, None)
    result = train_with_data_path(args.path, items, chain, cfg.data, net, optimiser, loss_fn, batch, steps,
                                  args.epochs, "samples_per_s", Path(args.workdir) / "cache", loader_workers(cfg))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first includes caching)")
    add_tiny_arguments(parser)
    parser.add_argument("--worker", choices=["medseg", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        _worker(args)
        return
    from medseg.data.medmnist import import_medmnist

    if args.tiny:
        args.repeats, args.epochs = 1, 2
    out = results_folder(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args.root, args.manifest = workdir / "images", workdir / "manifest.csv"
        import_medmnist(_tiny_npz(workdir / "tiny") if args.tiny else NPZ, args.manifest, args.root, progress=False)
        extra = ["--root", str(args.root), "--manifest", str(args.manifest), "--epochs", str(args.epochs),
                 "--workdir", str(workdir), *(["--tiny"] if args.tiny else [])]
        here = main if args.tiny else None  # --tiny: the workers in this process
        runs = interleave(args.repeats, lambda path: run_child(__file__, path, extra, REPO, here), "samples_per_s",
                          "samples/s")
    print(summarise_and_write(runs, "samples_per_s", "samples/s", args.epochs, out, "classification", {
        "workload": "PneumoniaMNIST train split, configs/medmnist_pneumonia.yaml network and augmentation",
        "repeats": args.repeats}))


if __name__ == "__main__":
    main()
