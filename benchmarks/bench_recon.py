"""Reconstruction training: medseg's data path beside a plain MONAI tutorial pipeline, same work.

Workload: ``configs/recon_mri_4x.yaml`` on the MSD hippocampus training split (182 volumes):
the U-Net with data consistency, batches of 4 volumes x 4 axial slices, a fresh 4x equispaced
k-space mask per slice, the L1 + SSIM loss. Both paths train the same steps; only the data path
differs:

- **medseg**: load, orientation, [0, 1] scaling and padding cached once in memory
  (``CacheDataset``); slices drawn and undersampled on the seeded sample stream (``EpochSamples``)
  by the loader workers ``medseg run`` uses for reconstruction (2, forked over the cache).
- **plain MONAI** (the MONAI fastMRI-tutorial style): ``Dataset`` with every transform, loading
  included, per step, ``DataLoader(num_workers=2, shuffle=True)``.

Each path runs in its own child process, interleaved, several repetitions; the table gives the
median slices/s of the first epoch (with the cache build) and of the later ones, and the ratio.

Usage: python benchmarks/bench_recon.py [--repeats 3] [--epochs 2] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py): the first 4 training volumes (1 step an epoch), 2 epochs, 1
repetition, the workers in this process; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from interleaved import interleave, run_child, summarise_and_write, train_with_data_path
from tiny import add_tiny_arguments, results_folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "recon_mri_4x.yaml"
TINY_VOLUMES = 4


def _worker(args: argparse.Namespace) -> None:
    """Child process: train ``--epochs`` epochs with one data path; print one JSON line."""
    import torch

    from medseg import load_config
    from medseg.data.datasets import records
    from medseg.data.manifest import read_manifest
    from medseg.engine.loop import loader_workers, make_optimizer
    from medseg.tasks.reconstruction import TASK
    from medseg.tasks.reconstruction.operators import Acquisition, create_reconstruction_loss
    from medseg.tasks.reconstruction.training import build_network
    from medseg.tasks.reconstruction.transforms import reconstruction_training_transforms

    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    root = cfg.data.resolved_root() if cfg.data.root.is_absolute() else REPO / cfg.data.resolved_root()
    items = records(read_manifest(REPO / cfg.data.manifest).split("train"), root, with_label=False)
    if args.tiny:
        items = items[:TINY_VOLUMES]
    chain = reconstruction_training_transforms(cfg.preprocess, cfg.recon, cfg.augment, Acquisition(cfg.recon))
    batch = cfg.train.batch_size
    steps = len(items) // batch
    net = build_network(cfg)
    optimiser = make_optimizer(cfg, net)
    loss_fn = create_reconstruction_loss(cfg.loss)
    result = train_with_data_path(args.path, items, chain, cfg.data, net, optimiser, loss_fn, batch, steps,
                                  args.epochs, "slices_per_s", Path("/nonexistent"), loader_workers(cfg, TASK.loader_workers))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first includes caching)")
    add_tiny_arguments(parser)
    parser.add_argument("--worker", choices=["medseg", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        _worker(args)
        return
    if args.tiny:
        args.repeats, args.epochs = 1, 2
    out = results_folder(args)
    extra = ["--epochs", str(args.epochs), *(["--tiny"] if args.tiny else [])]
    here = main if args.tiny else None  # --tiny: the workers in this process
    runs = interleave(args.repeats, lambda path: run_child(__file__, path, extra, REPO, here), "slices_per_s",
                      "slices/s")
    print(summarise_and_write(runs, "slices_per_s", "slices/s", args.epochs, out, "recon", {
        "workload": "configs/recon_mri_4x.yaml (unet_dc, 4x equispaced) on the MSD hippocampus train split",
        "repeats": args.repeats}))


if __name__ == "__main__":
    main()
