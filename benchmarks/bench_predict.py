"""Batch inference: ``medseg predict`` on each backend beside a plain MONAI tutorial pipeline,
same network and overlap.

Paths: medseg with ``--backend torch``, ``onnxruntime`` and ``openvino`` (those installed), and
plain MONAI (LoadImaged, Orientationd, normalisation, ``sliding_window_inference`` with the
torch network, Invertd, SaveImaged). Each runs in its own child process (so peak RSS is its
own), in rotating order, several repetitions; the table reports median seconds per case, the
ratio of each to medseg's torch backend and to plain MONAI, and the Dice of each backend's
masks against the torch backend's (the backends' ONNX exports are made in the first repetition,
which the per-case median does not count).

Workloads:
- ``hippocampus``: the ``configs/msd_hippocampus.yaml`` network on held-out MSD Task04 cases.
- ``ct512``: one 512x512x300 int16 CT-like volume (0.7x0.7x1.5 mm) with a lean 3D U-Net whose
  patch is 96x96x64 (overlap 0.25), the size a CT model would use.

Usage: python benchmarks/bench_predict.py [--repeats 3] [--cases 20] [--skip-ct] [--out benchmarks/results] [--tiny]
The networks are freshly initialised (speed does not depend on the weights) unless
``--hippocampus-model`` names a trained model, which makes the Dice between backends meaningful.
``--tiny`` (benchmarks/tiny.py): 1 repetition, at most 2 hippocampus cases, a 64x64x40 CT with a
32x32x16 patch, U-Nets of 4-32 channels, torch and the first exported backend installed, the workers in this process; for
the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interleaved import in_process
from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
PATHS = ("medseg", "medseg-onnxruntime", "medseg-openvino")
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
TINY_NETWORK = ["model.channels=[4,8,16,32]"]


def log_fresh_model(workdir: Path, config: Path, overrides: list[str]) -> str:
    """Log a freshly initialised network with its contract, as `medseg run` would."""
    import mlflow

    from medseg import load_config
    from medseg.engine.loop import log_network
    from medseg.tasks.segmentation.training import build_network, model_contract
    from medseg.tracking import MlflowTracker

    cfg = load_config(config, overrides)
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", "bench")
    tracker.start("bench-model", {})
    contract = model_contract(cfg)
    uri = log_network(build_network(cfg), cfg, contract, workdir, tracker)
    tracker.end()
    mlflow.set_tracking_uri(tracker.uri)
    return uri


def _worker(args: argparse.Namespace) -> None:
    """Child process: predict the input folder with one path and print a JSON line."""
    import mlflow

    from medseg.engine.case_io import peak_rss_mb

    mlflow.set_tracking_uri(args.tracking_uri)
    out = Path(args.output)
    if args.path.startswith("medseg"):
        from medseg import Predictor

        backend = args.path.partition("-")[2] or "torch"
        started = time.perf_counter()  # loading the model counts, as it did in `medseg predict`
        predictor = Predictor.from_uri(args.model, tracking_uri=args.tracking_uri, backend=backend)
        # inference only: the review page (thumbnails) is not what the tutorial loop is compared with
        outputs = predictor.predict_folder(Path(args.input), out, overwrite=True, progress=False, review=False)
        seconds = [r.seconds for r in outputs.results if r.status == "ok"]
        total = time.perf_counter() - started
    else:
        loop = tutorial_loop(args.model, out)
        seconds = []
        started = time.perf_counter()
        for path in sorted(Path(args.input).glob("*.nii.gz")):
            t0 = time.perf_counter()
            loop(path)
            seconds.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
    print(json.dumps({"path": args.path, "seconds_per_case": statistics.median(seconds), "cases": len(seconds),
                      "total_s": total, "peak_rss_mb": peak_rss_mb()}))


@dataclass
class TutorialLoop:
    """The MONAI tutorials' inference loop for one model: LoadImaged -> EnsureChannelFirstd ->
    Orientationd -> normalisation, ``sliding_window_inference``, Invertd -> AsDiscreted(argmax) ->
    SaveImaged. ``infer`` is its network stage, a method of its own so that a profiler can time it
    (benchmarks/profile_predict.py)."""

    model: Any
    pre: Any
    post: Any
    contract: dict[str, Any]

    def infer(self, image: Any) -> Any:
        """The sliding-window logits (C, *spatial) of a preprocessed image (1, *spatial)."""
        import torch
        from monai.inferers import sliding_window_inference

        window = self.contract["sliding_window"]
        with torch.no_grad():
            return sliding_window_inference(image[None], self.contract["patch_size"], window["sw_batch_size"],
                                            self.model, overlap=window["overlap"], mode=window["blend"])[0]

    def __call__(self, path: Path) -> None:
        """Predict the scan ``path`` and save its mask."""
        data = self.pre({"image": str(path)})
        data["pred"] = self.infer(data["image"])
        self.post(data)


def tutorial_loop(model_ref: str, out: Path) -> TutorialLoop:
    """:class:`TutorialLoop` for a logged model (URI or folder), saving masks into ``out``."""
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
    )

    from medseg.engine.model_format import local_model_folder, read_model_folder
    from medseg.tasks.registry import network_from_spec

    # as a MONAI tutorial does it: build the network, load its state dict
    with local_model_folder(model_ref) as (folder, _):
        files = read_model_folder(folder)
    model = network_from_spec(files.network_spec)
    model.load_state_dict(files.state_dict)
    model.eval()
    contract = files.contract
    intensity = contract["intensity"]
    norm = (ScaleIntensityRanged("image", *intensity["window"], 0.0, 1.0, clip=True)
            if intensity["mode"] == "ct_window" else NormalizeIntensityd("image", nonzero=intensity["nonzero"]))
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"), norm])
    post = Compose([
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir=str(out), output_postfix="seg", separate_folder=False, print_log=False),
    ])
    return TutorialLoop(model, pre, post, contract)


def link_hippocampus_test_cases(folder: Path, cases: int) -> list[Path]:
    """Links in ``folder`` (made) to the first ``cases`` held-out scans of the MSD hippocampus manifest."""
    from medseg.data.manifest import read_manifest

    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(REPO / "data_manifests" / "msd_hippocampus.csv")
    links = []
    for rel in [case.images[0] for case in manifest.split("test")][:cases]:
        links.append(folder / Path(rel).name)
        links[-1].symlink_to(HIPPO / rel)
    return links


def _run_child(path: str, model: str, tracking_uri: str, input_dir: Path, output_dir: Path, tiny: bool) -> dict:
    worker = ["--worker", path, "--model", model, "--tracking-uri", tracking_uri, "--input", str(input_dir),
              "--output", str(output_dir)]
    if tiny:  # in this process: one import of torch, MONAI and medseg in all
        return in_process(main, worker)
    cmd = [sys.executable, __file__, *worker]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _make_ct(path: Path, shape: tuple[int, int, int] = (512, 512, 300)) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    rx, ry = 200 / 512 * shape[0], 150 / 512 * shape[1]  # 200 and 150 voxels at 512
    body = ((grid[0] - shape[0] // 2) ** 2 / rx**2 + (grid[1] - shape[1] // 2) ** 2 / ry**2) < 1
    volume = np.where(np.broadcast_to(body, shape), 40, -1000).astype(np.int16)
    volume += rng.normal(0, 20, shape).astype(np.int16)
    affine = np.diag([-0.7, -0.7, 1.5, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--skip-ct", action="store_true")
    add_tiny_arguments(parser)
    parser.add_argument("--worker", choices=[*PATHS, "monai"])
    parser.add_argument("--hippocampus-model", help="a trained model for the hippocampus workload (URI or folder)")
    parser.add_argument("--model")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--input")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        _worker(args)
        return
    if args.tiny:
        args.repeats, args.cases = 1, min(args.cases, 2)
    args.out = results_folder(args)
    work = scratch_folder("bench_predict_", args, args.out)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    workloads = []
    hippo_in = work / "hippo_in"
    link_hippocampus_test_cases(hippo_in, args.cases)
    hippo_model = args.hippocampus_model or log_fresh_model(work, REPO / "configs" / "msd_hippocampus.yaml",
                                                       TINY_NETWORK if args.tiny else [])
    workloads.append(("hippocampus", hippo_model, hippo_in))
    if not args.skip_ct:
        ct_in = work / "ct_in"
        ct_in.mkdir()
        _make_ct(ct_in / "ct512.nii.gz", (64, 64, 40) if args.tiny else (512, 512, 300))
        ct_model = log_fresh_model(work, REPO / "configs" / "msd_hippocampus.yaml", [
            "patch.size=[32,32,16]" if args.tiny else "patch.size=[96,96,64]", *(TINY_NETWORK if args.tiny else []), "model.channels=[8,16,32,64]", "validation.overlap=0.25",
            "preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-160,240]",
            "data.labels={0: background, 1: organ}"])
        workloads.append(("ct512", ct_model, ct_in))

    from medseg.engine.backends import available_backends

    paths = [p for p in PATHS if (p.partition("-")[2] or "torch") in available_backends()]
    if args.tiny:  # torch and one exported backend: every path of this script, one ONNX export per model
        paths = paths[:2]
    paths.append("monai")
    os.environ["MEDSEG_CACHE_DIR"] = str(work / "cache")  # the children's exports, reused across repeats
    results: dict[str, dict[str, list[dict]]] = {}
    dice: dict[str, dict[str, float]] = {}
    for name, model, input_dir in workloads:
        runs: dict[str, list[dict]] = {p: [] for p in paths}
        for repeat in range(args.repeats):
            order = paths[repeat % len(paths):] + paths[:repeat % len(paths)]
            for path in order:
                runs[path].append(_run_child(path, model, tracking, input_dir, work / f"out_{name}_{path}", args.tiny))
                print(f"{name} {path} repeat {repeat}: {runs[path][-1]}", flush=True)
        results[name] = runs
        dice[name] = {p: _min_dice(work / f"out_{name}_medseg", work / f"out_{name}_{p}")
                      for p in paths if p.startswith("medseg-")}

    rows = []
    for name, runs in results.items():
        med = {p: statistics.median(r["seconds_per_case"] for r in runs[p]) for p in runs}
        rss = {p: max(r["peak_rss_mb"] for r in runs[p]) for p in runs}
        for path in paths:
            rows.append({"workload": name, "path": path, "cases": runs[path][0]["cases"], "repeats": args.repeats,
                         "s_per_case": med[path], "vs_medseg_torch": med["medseg"] / med[path],
                         "vs_plain_monai": med["monai"] / med[path], "peak_rss_mb": rss[path],
                         "min_dice_vs_torch": dice[name].get(path)})
    fastest = {name: min((r for r in rows if r["workload"] == name and r["path"] != "monai"),
                         key=lambda r: r["s_per_case"])["path"] for name in results}
    args.out.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (args.out / "predict.json").write_text(json.dumps({"rows": rows, "fastest_medseg_backend": fastest,
                                                       "hippocampus_model": args.hippocampus_model or "untrained",
                                                       "machine": machine, "raw": results}, indent=2))
    names = {"medseg": "medseg (torch)", "medseg-onnxruntime": "medseg (onnxruntime)",
             "medseg-openvino": "medseg (openvino)", "monai": "plain MONAI (torch)"}
    table = ["| workload | path | cases | s/case (median) | vs medseg torch | vs plain MONAI | min Dice vs torch | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = "" if r["min_dice_vs_torch"] is None else f"{r['min_dice_vs_torch']:.4f}"
        table.append(f"| {r['workload']} | {names[r['path']]} | {r['cases']} | {r['s_per_case']:.3f} | "
                     f"{r['vs_medseg_torch']:.2f}x | {r['vs_plain_monai']:.2f}x | {d} | {r['peak_rss_mb']:.0f} |")
    table.append("")
    table.append("Ratios are speed-ups (> 1: faster than the reference). Fastest medseg backend: "
                 + ", ".join(f"{k}: {names[v]}" for k, v in fastest.items())
                 + f". Hippocampus model: {args.hippocampus_model or 'freshly initialised'}. {args.repeats} repetitions, "
                 f"medians; machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}.")
    (args.out / "predict.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def _min_dice(reference: Path, other: Path) -> float:
    """The lowest per-case Dice (foreground labels, mean) between two folders of masks."""
    import nibabel as nib
    import numpy as np

    scores = []
    for ref in sorted(reference.glob("*.nii.gz")):
        if ref.name.endswith("_probabilities.nii.gz") or not (other / ref.name).is_file():
            continue
        a, b = np.asarray(nib.load(ref).dataobj), np.asarray(nib.load(other / ref.name).dataobj)
        per_label = []
        for label in np.union1d(np.unique(a), np.unique(b)):
            if label == 0:
                continue
            x, y = a == label, b == label
            per_label.append(2.0 * float((x & y).sum()) / float(x.sum() + y.sum()))
        scores.append(float(np.mean(per_label)) if per_label else 1.0)
    return min(scores) if scores else float("nan")


if __name__ == "__main__":
    main()
