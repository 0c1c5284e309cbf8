"""``make bench``: medseg against a plain MONAI tutorial pipeline on the same work, in one run.

Every measurement runs in its own child process (allocator settings and peak RSS are per
process), the paths interleaved and their order alternated between repetitions; the tables give
medians and the ratio medseg / plain (> 1: medseg is faster). The plain paths are the MONAI
tutorials' code (spleen / BTCV): MetaTensor batches, ``Spacingd`` in its default float64,
``DataLoader(num_workers=...)``, fp32, contiguous tensors, glibc's default malloc.

Workloads:
- W1 data pipeline: CT-like volumes 192x192x128 at 0.8x0.8x2.5 mm, int16, LPS, ``.nii.gz`` ->
  RAS, 1.5x1.5x2.0 mm, window, foreground crop, 4 patches of 96^3 (pos/neg), flips, rot90,
  intensity shift. Patches/s in the first epoch (cache building included) and later epochs,
  against MONAI ``Dataset`` and ``CacheDataset``. Every path iterates a ``DataLoader`` with 2
  workers, so the pipelines are compared, not the loaders.
- W2 training step: the spleen tutorial's 3D U-Net (16-32-64-128-256, 2 residual units, batch
  norm), DiceCE, Adam, batch 2x96^3. Samples/s and achieved GFLOP/s against the machine's peak,
  measured in the same run with a channels-last conv3d (fp32 and bf16). Where a bf16 conv3d takes
  over ``BF16_SLOWER_LIMIT`` times as long as fp32 (CPUs without bf16 instructions), the bf16 paths
  of W2 and W3 are not run and their rows say why: there one bf16 W3 volume takes hours.
- W3 sliding-window inference (roi 96^3, overlap 0.25, 4 windows per batch) of that network on a
  192x192x128 and a 512x512x300 volume: seconds, peak RSS, and the Dice of each path's mask
  against plain fp32's.
- W4 end to end on MSD Task04 Hippocampus with ``configs/msd_hippocampus.yaml``: wall time per
  training epoch (medseg's own train stage against the tutorial loop: ``CacheDataset`` + 2 loader
  workers), and folder inference in scans/min (``medseg predict`` against the tutorial's
  LoadImage -> sliding window -> Invertd -> SaveImage loop, benchmarks/bench_predict.py).

Usage: python benchmarks/bench_perf.py [--repeats 3] [--only w1,w2,w3,w4] [--out benchmarks/results] [--tiny]

``--tiny`` (benchmarks/tiny.py) runs every workload and path on toy sizes: 2 volumes of 48x48x32,
patches of 16^3, U-Nets of 4-32 channels, 1 repetition, 1 timed step, 2 epochs of 3 hippocampus
cases, 2 cases of folder inference, the workers in this process (bench_predict.py still a child); for
the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleaved import run_child  # noqa: E402
from tiny import add_tiny_arguments, results_folder, scratch_folder, subset_manifest  # noqa: E402

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the benchmark's, or ``--tiny``'s (every path on toy inputs)."""

    w1_volumes: int = 6
    w1_shape: Shape = (192, 192, 128)
    w1_epochs: int = 3
    roi: Shape = (96, 96, 96)
    unet_channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # W2/W3: the spleen tutorial's U-Net
    warmup_steps: int = 4
    peak_conv: tuple[int, int, int] = (128, 24, 5)  # channels, edge, timed repeats
    w3_volumes: tuple[Shape, Shape] = ((192, 192, 128), (512, 512, 300))  # "ct192", "ct512"
    w3_train_steps: int = 25
    w4_cases: tuple[tuple[str, int], ...] = ()  # cases per split of the hippocampus manifest; () all
    predict_cases: int = 20


FULL = Scale()
TINY = Scale(w1_volumes=2, w1_shape=(48, 48, 32), w1_epochs=2, roi=(16, 16, 16), unet_channels=(4, 8, 8, 8, 8),
             warmup_steps=1, peak_conv=(16, 8, 1), w3_volumes=((48, 48, 32), (64, 64, 40)), w3_train_steps=2,
             w4_cases=(("train", 3), ("val", 1)), predict_cases=2)
#: This process's sizes: main() sets TINY for --tiny (whose workers then run in this process too).
SCALE = FULL
CT_WINDOW = (-175.0, 250.0)
#: The bf16 paths (W2, W3) are left out where a bf16 convolution takes over this many times as long as
#: fp32: CPUs without bf16 instructions fall back to slow kernels, and one bf16 W3 volume then takes hours.
BF16_SLOWER_LIMIT = 4.0


# ----------------------------------------------------------------------------------- data


def make_ct(path: Path, label_path: Path | None, shape: tuple[int, int, int], spacing: tuple[float, float, float],
            seed: int) -> None:
    """A CT-like int16 volume in LPS (as DICOM-converted CT is): a body filling the field of view
    with lungs, a bright spine and two organs (the label), plus noise."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    volume = np.full(shape, 40, np.float32)
    volume[((X - 0.45) ** 2 / 0.1 + Y**2 / 0.35 + Z**2 / 2) < 1] = -800  # lungs
    volume[((X + 0.45) ** 2 / 0.1 + Y**2 / 0.35 + Z**2 / 2) < 1] = -800
    volume[np.broadcast_to((X**2 + (Y - 0.6) ** 2) < 0.01, shape)] = 700  # spine
    shift = rng.uniform(-0.1, 0.1, 3)
    organ = (((X - shift[0]) ** 2 / 0.08 + (Y - shift[1]) ** 2 / 0.05 + (Z - shift[2]) ** 2 / 0.2) < 1)
    kidney = (((X + 0.3 - shift[1]) ** 2 + (Y + 0.2) ** 2 + (Z - 0.1) ** 2 / 3) < 0.01)
    volume[organ] = 90
    volume[kidney] = 150
    volume += rng.normal(0, 15, shape).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS storage, as DICOM converters write
    affine[:3, 3] = (100.0, 120.0, -200.0)
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), path)
    if label_path is not None:
        label = (organ | kidney).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), label_path)


# ----------------------------------------------------------------------------------- W1


def _tutorial_chain(num_samples: int):
    """The BTCV/spleen tutorials' training transforms, verbatim apart from sizes."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys=["image"], a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image"),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=SCALE.roi, pos=1, neg=1,
                               num_samples=num_samples, image_key="image", image_threshold=0),
        RandFlipd(keys=keys, spatial_axis=[0], prob=0.10), RandFlipd(keys=keys, spatial_axis=[1], prob=0.10),
        RandFlipd(keys=keys, spatial_axis=[2], prob=0.10), RandRotate90d(keys=keys, prob=0.10, max_k=3),
        RandShiftIntensityd(keys=["image"], offsets=0.10, prob=0.50),
    ])


def _medseg_w1_config():
    from medseg.config import ContrastAug, FlipAug, IntensityConfig, PatchConfig, PreprocessConfig, Rot90Aug

    pre = PreprocessConfig(orientation="RAS", spacing=(1.5, 1.5, 2.0), crop_foreground=True,
                           intensity=IntensityConfig(mode="ct_window", window=CT_WINDOW))
    patch = PatchConfig(size=SCALE.roi, samples_per_volume=4, sampler="pos_neg", pos_fraction=0.5)
    augment = [FlipAug(name="flip", prob=0.1), Rot90Aug(name="rot90", prob=0.1, max_k=3, axes=(0, 1)),
               ContrastAug(name="contrast", prob=0.5, scale=0.0, shift=0.1)]
    return pre, patch, augment


def worker_w1(path: str, work: Path) -> dict:
    from monai.data import CacheDataset, DataLoader, Dataset

    items = [{"image": str(work / "w1" / f"ct{i}.nii.gz"), "label": str(work / "w1" / f"ct{i}_label.nii.gz")}
             for i in range(SCALE.w1_volumes)]
    started = time.perf_counter()
    if path == "medseg":
        from medseg.config import CacheMode, DataConfig
        from medseg.data.datasets import make_dataset, records  # noqa: F401 - records: what medseg run builds
        from medseg.data.sampling import EpochSamples, epoch_order, split_transforms
        from medseg.data.transforms import training_transforms
        from medseg.engine.runtime import configure_threads, tune_allocator

        tune_allocator()
        configure_threads(None)
        pre, patch, augment = _medseg_w1_config()
        prefix, rest = split_transforms(training_transforms(pre, patch, augment, 3, 2))
        data_cfg = DataConfig(manifest=Path("unused.csv"), labels={0: "background", 1: "organ"}, cache=CacheMode.MEMORY)
        cached = make_dataset(items, prefix, data_cfg, work / "w1_cache", progress=False)

        def loader(epoch: int):
            order = epoch_order(len(cached), len(cached), 0, epoch)
            return DataLoader(EpochSamples(cached, rest, order, range(len(order)), 0, epoch), batch_size=1,
                              num_workers=2)
    else:
        chain = _tutorial_chain(4)
        dataset = (CacheDataset(items, chain, cache_rate=1.0, num_workers=2, progress=False)
                   if path == "plain_cache" else Dataset(items, chain))

        def loader(epoch: int):
            return DataLoader(dataset, batch_size=1, shuffle=True, num_workers=2)

    build_s = time.perf_counter() - started
    epochs = []
    for epoch in range(SCALE.w1_epochs):
        t0 = time.perf_counter()
        patches = 0
        for batch in loader(epoch):
            patches += int(batch["image"].shape[0])
            if tuple(batch["image"].shape[2:]) != SCALE.roi:
                raise RuntimeError(f"{path}: patch of shape {tuple(batch['image'].shape)}")
        seconds = time.perf_counter() - t0 + (build_s if epoch == 0 else 0.0)
        epochs.append({"seconds": seconds, "patches": patches, "patches_per_s": patches / seconds})
    return {"path": path, "epochs": epochs, "cache_build_s": build_s}


# ----------------------------------------------------------------------------------- W2


def _tutorial_unet():
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=SCALE.unet_channels, strides=(2, 2, 2, 2),
                num_res_units=2, norm=Norm.BATCH)


def _medseg_unet(precision: str = "auto"):
    """The same network as medseg builds it from a config, with medseg's runtime choices."""
    import torch

    from medseg.config import Precision, UNetModelConfig
    from medseg.engine.runtime import autocast_dtype, to_channels_last, use_channels_last
    from medseg.tasks.segmentation.networks import create_segmentation_network

    cfg = UNetModelConfig(name="unet", spatial_dims=3, channels=SCALE.unet_channels, strides=(2, 2, 2, 2),
                          num_res_units=2, norm="batch")
    net = create_segmentation_network(cfg, 1, 2, SCALE.roi)
    channels_last = use_channels_last(None, 3)
    if channels_last:
        net = to_channels_last(net, 3)
    return net, channels_last, autocast_dtype(Precision(precision), torch.device("cpu"))


def _w2_batch(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, *SCALE.roi, generator=g)
    label = (torch.rand(2, 1, *SCALE.roi, generator=g) > 0.7).float()
    return image, label


def worker_w2(path: str, steps: int) -> dict:
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    image, label = _w2_batch()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if path == "plain":
        from monai.data import MetaTensor, list_data_collate

        net = _tutorial_unet()
        # what a MONAI DataLoader hands the tutorial's loop: MetaTensors
        batch = list_data_collate([{"image": MetaTensor(image[i]), "label": MetaTensor(label[i])} for i in range(2)])
        image, label = batch["image"], batch["label"]
        amp = None
    else:
        from medseg.engine.runtime import autocast, configure_threads, to_channels_last, tune_allocator

        tune_allocator()
        configure_threads(None)
        net, channels_last, amp = _medseg_unet("bf16" if path == "medseg_bf16" else "auto")
        if channels_last:
            image = to_channels_last(image, 3)
    if path == "plain":
        optimiser = torch.optim.Adam(net.parameters(), 1e-4)
    else:  # medseg's own optimiser construction (AdamW without decay is the tutorial's Adam, fused)
        from types import SimpleNamespace

        from medseg.config import OptimConfig
        from medseg.engine.loop import make_optimizer
        from medseg.tasks.segmentation.config import SegmentationLossConfig
        from medseg.tasks.segmentation.metrics import create_loss

        optimiser = make_optimizer(SimpleNamespace(optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.0)), net)
        loss_fn = create_loss(SegmentationLossConfig(name="dice_ce"))
    net.train()
    times = []
    # oneDNN builds its primitives in the first step, and glibc's default malloc needs a few steps to
    # raise its mmap threshold past the activations (until then every step page-faults them in):
    # untimed, so the ratio is the steady state of both paths, not medseg's warm start.
    warmup = SCALE.warmup_steps
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        if path == "plain":
            loss = loss_fn(net(image), label)
        else:
            with autocast(amp, torch.device("cpu")):
                out = net(image)
            loss = loss_fn(out.float(), label)
        loss.backward()
        optimiser.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"path": path, "step_s": times, "threads": torch.get_num_threads()}


def worker_peak(no_bf16: bool = False) -> dict:
    """The machine's conv3d throughput (channels-last, fp32 and bf16, best of 5) and the W2 step's FLOPs;
    bf16 left out when asked (``no_bf16``) or when it is far slower than fp32 here."""
    import torch
    from monai.losses import DiceCELoss
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.engine.runtime import tune_allocator

    tune_allocator()
    out: dict[str, Any] = {}
    channels, edge, repeats = SCALE.peak_conv
    dtypes = [torch.float32, torch.bfloat16]
    if no_bf16:
        out["bf16_skipped"], out["conv3d_gflops_bfloat16"] = "--no-bf16", None
        dtypes = [torch.float32]
    elif SCALE is not TINY:  # --tiny runs every path, however slow
        slower = _bf16_slowdown(min(channels, 64), min(edge, 12))
        if slower > BF16_SLOWER_LIMIT:
            out["bf16_skipped"], out["conv3d_gflops_bfloat16"] = (
                f"a bf16 conv3d took {slower:.0f}x as long as fp32 on this CPU (over {BF16_SLOWER_LIMIT:g}x: "
                "no bf16 instructions)"), None
            dtypes = [torch.float32]
    for dtype in dtypes:
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(dtype)
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, channels, edge, edge, edge, dtype=dtype).to(memory_format=torch.channels_last_3d)
        flops = 2 * 2 * channels * channels * 27 * edge**3
        best = float("inf")
        with torch.no_grad():
            conv(x)
            for _ in range(repeats):
                t0 = time.perf_counter()
                conv(x)
                best = min(best, time.perf_counter() - t0)
        out[f"conv3d_gflops_{str(dtype).split('.')[-1]}"] = flops / best / 1e9
    net = _tutorial_unet()
    image, label = _w2_batch()
    with FlopCounterMode(display=False) as counter:
        DiceCELoss(to_onehot_y=True, softmax=True)(net(image), label).backward()
    out["step_gflop"] = counter.get_total_flops() / 1e9
    return out


def _bf16_slowdown(channels: int, edge: int) -> float:
    """How many times longer one channels-last conv3d takes in bf16 than in fp32 (one warm call each)."""
    import torch

    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(dtype)
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, channels, edge, edge, edge, dtype=dtype).to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            conv(x)
            t0 = time.perf_counter()
            conv(x)
            seconds[dtype] = time.perf_counter() - t0
    return seconds[torch.bfloat16] / seconds[torch.float32]


# ----------------------------------------------------------------------------------- W3


def worker_w3(path: str, volume: str, work: Path) -> dict:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from medseg.engine.case_io import peak_rss_mb

    torch.manual_seed(0)
    array = np.asarray(nib.load(work / "w3" / f"{volume}.nii.gz").dataobj, dtype=np.float32)
    image = torch.from_numpy(np.clip((array - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1))[None, None]
    state = torch.load(work / "w3" / "unet.pt", weights_only=True)
    t0 = time.perf_counter()
    if path == "plain":
        from monai.data import MetaTensor

        net = _tutorial_unet().eval()
        net.load_state_dict(state)
        with torch.no_grad():
            logits = sliding_window_inference(MetaTensor(image), SCALE.roi, 4, net, overlap=0.25)
        mask = logits[0].argmax(0).to(torch.uint8)
    else:
        from medseg.engine.runtime import configure_threads, to_channels_last, tune_allocator
        from medseg.engine.sliding import fold_batch_norms, label_map, predict_logits

        tune_allocator()
        configure_threads(None)
        net, _, amp = _medseg_unet("bf16" if path == "medseg_bf16" else "auto")
        net.load_state_dict(state)
        net = to_channels_last(fold_batch_norms(net.eval()), 3)  # what medseg predict does with a model
        logits = predict_logits(net, image[0], SCALE.roi, overlap=0.25, sw_batch_size=4, blend="constant",
                                device=torch.device("cpu"), amp_dtype=amp)
        mask = label_map(logits)
    seconds = time.perf_counter() - t0
    np.save(work / "w3" / f"mask_{volume}_{path}.npy", mask.numpy())
    return {"path": path, "volume": volume, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def _train_w3_network(work: Path) -> None:
    """Train the W3 network briefly on W1-style CT patches so its masks are organs, not noise
    (speed does not depend on the weights; the Dice comparison would be meaningless without)."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net, channels_last, _ = _medseg_unet()
    image = np.asarray(nib.load(work / "w3" / "train.nii.gz").dataobj, dtype=np.float32)
    label = np.asarray(nib.load(work / "w3" / "train_label.nii.gz").dataobj)
    image = np.clip((image - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1)
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(0)
    fg = np.argwhere(label > 0)
    edge = SCALE.roi[0]
    for _ in range(SCALE.w3_train_steps):
        xs, ys = [], []
        for _ in range(2):
            centre = (fg[rng.integers(len(fg))] if rng.random() < 0.7
                      else rng.integers(edge // 2, np.array(image.shape) - edge // 2))
            lo = np.clip(centre - edge // 2, 0, np.array(image.shape) - edge)
            sl = tuple(slice(a, a + edge) for a in lo)
            xs.append(torch.from_numpy(np.ascontiguousarray(image[sl]))[None])
            ys.append(torch.from_numpy(np.ascontiguousarray(label[sl]).astype(np.float32))[None])
        optimiser.zero_grad()
        loss_fn(net(torch.stack(xs).to(memory_format=torch.channels_last_3d)), torch.stack(ys)).backward()
        optimiser.step()
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, work / "w3" / "unet.pt")


def _dice(a, b) -> float:
    inter = float((a & b).sum())
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * inter / total


# ----------------------------------------------------------------------------------- W4


def worker_w4(path: str, epochs: int, work: Path) -> dict:
    """``epochs`` training epochs of configs/msd_hippocampus.yaml; seconds per epoch."""
    from medseg import load_config

    overrides = [f"data.root={HIPPO}", f"train.max_epochs={epochs}", "train.max_minutes=null",
                 "train.val_interval=1000", f"output_dir={work / f'w4_{path}'}"]
    if SCALE.w4_cases:  # main() wrote the subset
        overrides += [f"data.manifest={work / 'w4_manifest.csv'}", "model.channels=[4,8,16,32]"]
    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", overrides)
    if path == "medseg":
        from medseg.engine.runner import PipelineContext
        from medseg.tasks.segmentation import TASK
        from medseg.tracking.mlflow_tracker import NullTracker

        os.chdir(REPO)
        out_dir = work / f"w4_medseg_{time.time_ns()}"
        started = time.perf_counter()
        trained = TASK.train(PipelineContext(cfg, REPO / cfg.data.manifest, HIPPO, out_dir, NullTracker(), progress=False))
        total = time.perf_counter() - started
        import csv

        with open(trained.history) as f:
            rows = list(csv.DictReader(f))
        # epoch 1 includes building the cache (logged as time/cache_build_s, read back from the loop's log)
        per_epoch = [float(r["time/epoch_train_s"]) for r in rows]
        return {"path": path, "epoch_s": per_epoch, "total_s": total}
    return _tutorial_hippocampus(cfg, epochs)


def _tutorial_hippocampus(cfg: Any, epochs: int) -> dict:
    """The MONAI spleen tutorial's training loop, with the config's network, patches and augmentations."""
    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    from medseg.data.manifest import read_manifest

    manifest = read_manifest(REPO / cfg.data.manifest)
    files = [{"image": str(HIPPO / c.images[0]), "label": str(HIPPO / c.label)} for c in manifest.split("train")]
    keys = ["image", "label"]
    angle = float(np.deg2rad(10))
    chain = Compose([
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        SpatialPadd(keys=keys, spatial_size=list(cfg.patch.size)),  # some cases are smaller than the patch
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=list(cfg.patch.size), pos=2, neg=1,
                               num_samples=cfg.patch.samples_per_volume, image_key=None),
        RandAffined(keys=keys, prob=0.2, rotate_range=[angle] * 3, scale_range=[0.1] * 3, translate_range=[0] * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.2), RandShiftIntensityd(keys="image", prob=0.3, offsets=0.1),
        RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.8, 1.25)),
        RandGaussianNoised(keys="image", prob=0.1, std=0.05),
    ])
    started = time.perf_counter()
    dataset = CacheDataset(files, chain, cache_rate=1.0, num_workers=2, progress=False)
    build = time.perf_counter() - started
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=2)
    m = cfg.model
    net = UNet(spatial_dims=3, in_channels=1, out_channels=len(cfg.data.labels), channels=m.channels,
               strides=m.strides, num_res_units=m.num_res_units, norm=m.norm)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(net.parameters(), cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    per_epoch = []
    for _ in range(epochs):
        net.train()
        t0 = time.perf_counter()
        for batch in loader:
            optimiser.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimiser.step()
        per_epoch.append(time.perf_counter() - t0)
    return {"path": "plain", "epoch_s": per_epoch, "cache_build_s": build,
            "total_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------- driver


def _interleaved(paths: tuple[str, ...], repeats: int, run) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for repeat in range(repeats):
        for path in (paths if repeat % 2 == 0 else tuple(reversed(paths))):
            result = run(path)
            runs[path].append(result)
            print(f"  repeat {repeat + 1} {path}: {_short(result)}", flush=True)
    return runs


def _short(result: dict) -> str:
    return json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                       if not isinstance(v, (list, dict))})


def _child(work: Path, *args: str) -> dict:
    if SCALE is TINY:  # the workers in this process: one import of torch, MONAI and medseg in all
        return run_child(__file__, args[0], ["--work", str(work), *args[1:], "--tiny"], REPO, main)
    return run_child(__file__, args[0], ["--work", str(work), *args[1:]], REPO)


def main(argv: list[str] | None = None) -> None:
    global SCALE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="w1,w2,w3,w4", help="comma-separated workloads")
    add_tiny_arguments(parser)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help="W2: timed steps per child")
    parser.add_argument("--epochs", type=int, default=2, help="W4: epochs per child")
    parser.add_argument("--no-bf16", action="store_true", help="leave out W2/W3's bf16 paths (and the bf16 peak)")
    args = parser.parse_args(argv)
    if args.tiny:
        SCALE = TINY
        args.repeats, args.steps, args.epochs = 1, 1, 2
    if args.worker:
        result = {"w1": lambda: worker_w1(args.worker, args.work), "w2": lambda: worker_w2(args.worker, args.steps),
                  "peak": lambda: worker_peak(args.no_bf16), "w3": lambda: worker_w3(args.worker, args.volume, args.work),
                  "w4": lambda: worker_w4(args.worker, args.epochs, args.work)}[args.workload]()
        print(json.dumps(result))
        return

    out = results_folder(args)
    work = args.work or scratch_folder("bench_perf_", args, out)
    only = set(args.only.split(","))
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": _machine(), "repeats": args.repeats}
    rows: list[str] = []
    if "w1" in only:
        rows += _bench_w1(args, work, report)
    peak = _child(work, "machine", "--workload", "peak", *(["--no-bf16"] if args.no_bf16 else [])) \
        if only & {"w2", "w3"} else {}
    if peak:
        print(f"  peak: {_short(peak)}", flush=True)
    if "w2" in only:
        rows += _bench_w2(args, work, report, peak)
    if "w3" in only:
        rows += _bench_w3(args, work, report, peak)
    if "w4" in only:
        rows += _bench_w4(args, work, report)
    report["seconds"] = time.perf_counter() - started
    table = "\n".join(["| workload | plain MONAI | medseg | medseg / plain |", "|---|---|---|---|", *rows]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(report, indent=2))
    (out / "perf.md").write_text(table + f"\n{report['machine']}; {args.repeats} repetitions; "
                                 f"{report['seconds'] / 60:.1f} min in all.\n")
    print(table)
    print(f"{report['seconds'] / 60:.1f} min; results in {out / 'perf.json'} and perf.md")


def _bench_w1(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> list[str]:
    print("W1 data pipeline", flush=True)
    (work / "w1").mkdir(parents=True, exist_ok=True)
    for i in range(SCALE.w1_volumes):
        make_ct(work / "w1" / f"ct{i}.nii.gz", work / "w1" / f"ct{i}_label.nii.gz", SCALE.w1_shape,
                (0.8, 0.8, 2.5), seed=i)
    runs = _interleaved(("plain_dataset", "plain_cache", "medseg"), args.repeats,
                        lambda p: _child(work, p, "--workload", "w1"))
    w1 = {}
    for path, results in runs.items():
        w1[path] = {"first_epoch": statistics.median(r["epochs"][0]["patches_per_s"] for r in results),
                    "steady": statistics.median(e["patches_per_s"] for r in results for e in r["epochs"][1:])}
    report["w1"] = {"runs": runs, "summary": w1}
    m, rows = w1["medseg"], []
    for base, label in (("plain_dataset", "`Dataset`"), ("plain_cache", "`CacheDataset`")):
        b = w1[base]
        rows.append(f"| W1 data pipeline vs {label} (patches/s, first / later epochs) | {b['first_epoch']:.2f} / "
                    f"{b['steady']:.2f} | {m['first_epoch']:.2f} / {m['steady']:.2f} | "
                    f"{m['first_epoch'] / b['first_epoch']:.2f}x / **{m['steady'] / b['steady']:.2f}x** |")
    return rows


def _bf16_skipped(label: str, peak: dict[str, Any]) -> str:
    return f"| {label} | - | - | not run: {peak['bf16_skipped']} |"


def _bench_w2(args: argparse.Namespace, work: Path, report: dict[str, Any], peak: dict[str, Any]) -> list[str]:
    print("W2 training step", flush=True)
    bf16 = "bf16_skipped" not in peak
    runs = _interleaved(("plain", "medseg", *(["medseg_bf16"] if bf16 else [])), args.repeats,
                        lambda p: _child(work, p, "--workload", "w2", "--steps", str(args.steps)))
    step = {p: statistics.median(t for r in rs for t in r["step_s"]) for p, rs in runs.items()}
    best_peak = max(g for g in (peak["conv3d_gflops_float32"], peak["conv3d_gflops_bfloat16"]) if g)
    w2 = {p: {"step_s": s, "samples_per_s": 2 / s, "gflops": peak["step_gflop"] / s,
              "fraction_of_peak": peak["step_gflop"] / s / best_peak} for p, s in step.items()}
    report["w2"] = {"runs": runs, "peak": peak, "summary": w2}
    rows = []
    for path in ("medseg", "medseg_bf16"):
        label = "W2 training step" + (" (bf16 autocast)" if path == "medseg_bf16" else "")
        if path not in w2:
            rows.append(_bf16_skipped(label, peak))
            continue
        p, m = w2["plain"], w2[path]
        rows.append(f"| {label} (samples/s; GFLOP/s, % of {best_peak:.0f} peak) | {p['samples_per_s']:.2f}; "
                    f"{p['gflops']:.0f}, {100 * p['fraction_of_peak']:.0f}% | {m['samples_per_s']:.2f}; "
                    f"{m['gflops']:.0f}, {100 * m['fraction_of_peak']:.0f}% | "
                    f"**{m['samples_per_s'] / p['samples_per_s']:.2f}x** |")
    return rows


def _bench_w3(args: argparse.Namespace, work: Path, report: dict[str, Any], peak: dict[str, Any]) -> list[str]:
    print("W3 sliding-window inference", flush=True)
    import numpy as np

    (work / "w3").mkdir(parents=True, exist_ok=True)
    small, large = SCALE.w3_volumes
    make_ct(work / "w3" / "train.nii.gz", work / "w3" / "train_label.nii.gz", small, (0.8, 0.8, 2.5), 11)
    make_ct(work / "w3" / "ct192.nii.gz", None, small, (0.8, 0.8, 2.5), 12)
    make_ct(work / "w3" / "ct512.nii.gz", None, large, (0.7, 0.7, 1.5), 13)
    _train_w3_network(work)
    report["w3"], rows = {}, []
    bf16 = "bf16_skipped" not in peak
    for volume, repeats in (("ct192", args.repeats), ("ct512", 1)):
        paths = ("plain", "medseg", *(["medseg_bf16"] if bf16 and volume == "ct192" else []))
        runs = _interleaved(paths, repeats, lambda p, v=volume: _child(work, p, "--workload", "w3", "--volume", v))
        reference = np.load(work / "w3" / f"mask_{volume}_plain.npy") > 0
        summary = {}
        for path, results in runs.items():
            mask = np.load(work / "w3" / f"mask_{volume}_{path}.npy") > 0
            summary[path] = {"seconds": statistics.median(r["seconds"] for r in results),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                             "dice_vs_plain_fp32": _dice(mask, reference), "foreground_voxels": int(mask.sum())}
        report["w3"][volume] = {"runs": runs, "summary": summary}
        p = summary["plain"]
        label = f"W3 sliding window {volume} ({'x'.join(map(str, small if volume == 'ct192' else large))})"
        for path in paths[1:]:
            m = summary[path]
            rows.append(f"| {label}{' bf16' if path == 'medseg_bf16' else ''} (s/volume; peak RSS GiB; Dice vs plain "
                        f"fp32) | {p['seconds']:.1f}; {p['peak_rss_mb'] / 1024:.1f} | {m['seconds']:.1f}; "
                        f"{m['peak_rss_mb'] / 1024:.1f}; {m['dice_vs_plain_fp32']:.4f} | "
                        f"**{p['seconds'] / m['seconds']:.2f}x** |")
        if volume == "ct192" and not bf16:
            rows.append(_bf16_skipped(f"{label} bf16", peak))
    return rows


def _bench_w4(args: argparse.Namespace, work: Path, report: dict[str, Any]) -> list[str]:
    print("W4 hippocampus training epoch", flush=True)
    if SCALE.w4_cases:
        subset_manifest(REPO / "data_manifests" / "msd_hippocampus.csv", work / "w4_manifest.csv",
                        dict(SCALE.w4_cases))
    runs = _interleaved(("plain", "medseg"), max(1, args.repeats - 1),
                        lambda p: _child(work, p, "--workload", "w4", "--epochs", str(args.epochs)))
    w4 = {p: {"first_epoch_s": statistics.median(r["epoch_s"][0] for r in rs),
              "steady_epoch_s": statistics.median(e for r in rs for e in r["epoch_s"][1:])} for p, rs in runs.items()}
    report["w4"] = {"runs": runs, "summary": w4}
    p, m = w4["plain"], w4["medseg"]
    rows = [f"| W4 hippocampus training epoch (s, later epochs) | {p['steady_epoch_s']:.1f} | "
            f"{m['steady_epoch_s']:.1f} | **{p['steady_epoch_s'] / m['steady_epoch_s']:.2f}x** |"]
    print("W4 folder inference", flush=True)
    import subprocess

    command = [sys.executable, str(REPO / "benchmarks" / "bench_predict.py"), "--skip-ct", "--repeats",
               str(max(1, args.repeats - 1)), "--cases", str(SCALE.predict_cases), "--out", str(work / "predict"),
               *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    predicted = json.loads((work / "predict" / "predict.json").read_text())
    report["w4"]["folder_inference"] = predicted
    print(done.stdout[-500:], flush=True)
    return rows + _folder_inference_rows(predicted)


#: bench_predict's paths, as the table names them.
_PREDICT_PATHS = {"medseg": "torch", "medseg-onnxruntime": "onnxruntime", "medseg-openvino": "openvino"}


def _folder_inference_rows(predicted: dict[str, Any]) -> list[str]:
    """One table row per medseg backend against the plain MONAI inference loop (bench_predict's rows:
    one per workload and path, ``s_per_case`` the median)."""
    rows = [r for r in predicted["rows"] if r["workload"] == "hippocampus"]
    plain = next(r for r in rows if r["path"] == "monai")
    return [f"| W4 folder inference, {r['cases']} hippocampus scans, {_PREDICT_PATHS[r['path']]} (scans/min) | "
            f"{60 / plain['s_per_case']:.0f} | {60 / r['s_per_case']:.0f} | **{r['vs_plain_monai']:.2f}x** |"
            for r in rows if r["path"] in _PREDICT_PATHS]


def _machine() -> str:
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
