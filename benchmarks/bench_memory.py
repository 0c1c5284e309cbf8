"""Peak memory of segmentation prediction: the full-buffer path against the bounded (slab) one.

Each prediction runs in its own child process (``medseg.Predictor.predict_folder`` on a folder
of one scan, review page off), whose peak resident memory (``VmHWM``, the whole process: Python,
torch, the model, reading, writing) and wall time it reports.

Workloads:
- ``ct300``: a 512x512x300 int16 CT-like volume (0.7x0.7x1.5 mm, LPS, as bench_predict.py's ct512)
  with a freshly initialised lean 3D U-Net (8-16-32-64, patch 96x96x64, overlap 0.25, CT window)
  and 3 classes. Three paths, interleaved: ``head`` (the code of the commit given by ``--head``,
  unpacked by ``git archive``: the full buffer as it was), ``full`` (this code,
  ``MEDSEG_PREDICT_SCORES=full``) and ``bounded`` (``MEDSEG_PREDICT_SCORES=bounded``). Their masks are
  compared voxel by voxel.
- ``wb1000``: a 512x512x1000 whole-body-sized volume (0.8x0.8x1.5 mm) with a freshly initialised
  100-class head resampling to ``--wb-spacing`` (default 1.5 mm, TotalSegmentator's) with patch
  ``--wb-patch``; the bounded path only (the full buffer would need ~100 GB).

Usage: python benchmarks/bench_memory.py [--repeats 2] [--head 9b682be] [--skip-ct] [--skip-wb] [--backend torch] [--out benchmarks/results] [--tiny]
Writes memory.json and memory.md to ``--out``; a run of one workload keeps the other workloads' rows
already there (merged by name). ``--backend`` (``MEDSEG_BACKEND`` for every worker) runs the workloads as
``ct300@torch`` etc., beside the default backend's rows. Each workload records its command, backend and
the host's load average as it started.
``--tiny`` (benchmarks/tiny.py): both workloads and all three paths on toy volumes (45x38x29 and
37x33x50, patch 16x16x16, U-Nets of 4-32 channels, 5 classes for the whole-body head), 1 repetition,
``--head HEAD`` unless given, the ``full`` and ``bounded`` workers in this process; for the test
suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from interleaved import in_process
from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
#: The last commit before bounded prediction (Issue 29 part 3): the full-buffer path as it was.
BEFORE = "9b682be"
CT_MODEL = ["model.channels=[8,16,32,64]", "validation.overlap=0.25", "preprocess.intensity.mode=ct_window",
            "preprocess.intensity.window=[-160,240]"]
#: --tiny: (shape, spacing) of each workload's volume, its patch, and the whole-body head's classes.
TINY_CT = ((45, 38, 29), (0.7, 0.7, 1.5))
TINY_WB = ((37, 33, 50), (0.8, 0.8, 1.5))
TINY_PATCH = "16,16,16"
TINY_WB_CLASSES = 5
TINY_NETWORK = ["model.channels=[4,8,16,32]"]


def _log_model(workdir: Path, overrides: list[str], name: str) -> str:
    """Log a freshly initialised network with its contract, as `medseg run` would."""
    from medseg import load_config
    from medseg.engine.loop import log_network
    from medseg.tasks.segmentation.training import build_network, model_contract
    from medseg.tracking import MlflowTracker

    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", overrides)
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", "bench-memory")
    tracker.start(name, {})
    uri = log_network(build_network(cfg), cfg, model_contract(cfg), workdir / name, tracker)
    tracker.end()
    return uri


def _make_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """A body-shaped ellipse of soft tissue in air with noise, int16, LPS (negative x and y)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.ogrid[: shape[0], : shape[1]]
    body = ((grid[0] - shape[0] // 2) ** 2 / (0.39 * shape[0]) ** 2
            + (grid[1] - shape[1] // 2) ** 2 / (0.29 * shape[1]) ** 2) < 1
    volume = np.empty(shape, dtype=np.int16)
    for z in range(shape[2]):  # slice by slice: the generator's own memory stays small
        volume[:, :, z] = np.where(body, 40, -1000) + rng.normal(0, 20, shape[:2]).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])), path)


def _worker(args: argparse.Namespace) -> None:
    """Child process: predict the folder with one path; print a JSON line."""
    if args.tree:
        sys.path.insert(0, args.tree)  # the head commit's medseg before the installed one
    import medseg
    from medseg.engine.case_io import peak_rss_mb

    before = os.environ.get("MEDSEG_PREDICT_SCORES")
    if args.worker in ("full", "bounded"):
        os.environ["MEDSEG_PREDICT_SCORES"] = args.worker
    try:
        started = time.perf_counter()
        predictor = medseg.Predictor.from_uri(args.model, tracking_uri=args.tracking_uri)
        batch = predictor.predict_folder(Path(args.input), Path(args.output), overwrite=True, progress=False,
                                         review=False)
        seconds = time.perf_counter() - started
    finally:  # a tiny run's next worker, in this process or a child of it, must not inherit the path
        if before is None:
            os.environ.pop("MEDSEG_PREDICT_SCORES", None)
        else:
            os.environ["MEDSEG_PREDICT_SCORES"] = before
    bad = [r.error for r in batch.results if r.status != "ok"]
    if bad:
        raise SystemExit(f"prediction failed: {bad}")
    print(json.dumps({"path": args.worker, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "medseg": str(Path(medseg.__file__).parent)}))


def _run(path: str, model: str, tracking: str, input_dir: Path, out: Path, tree: str | None,
         tiny: bool = False) -> dict:
    worker = ["--worker", path, "--model", model, "--tracking-uri", tracking, "--input", str(input_dir),
              "--output", str(out)] + (["--tree", tree] if tree else [])
    if tiny and tree is None:  # in this process: no second import of torch, MONAI and medseg
        result = in_process(main, worker)
    else:  # the head's code needs a process of its own (its medseg first on sys.path)
        done = subprocess.run([sys.executable, __file__, *worker], capture_output=True, text=True, cwd=REPO,
                              check=False)
        if done.returncode != 0:
            raise SystemExit(f"{path} worker failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{input_dir.name} {path}: {result['seconds']:.1f} s, {result['peak_rss_mb']:.0f} MiB", flush=True)
    return result


def _compare(a: Path, b: Path) -> dict:
    """Voxels where two masks differ, and whether they are bitwise equal (values and affine)."""
    import nibabel as nib
    import numpy as np

    ia, ib = nib.load(a), nib.load(b)
    x, y = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
    return {"voxels": int(x.size), "differ": int((x != y).sum()), "bitwise_equal": bool(np.array_equal(x, y)),
            "same_affine": bool(np.array_equal(ia.affine, ib.affine)),
            "label_counts": {int(v): int(c) for v, c in zip(*np.unique(x, return_counts=True))}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--head", default=None, help="the commit whose full-buffer path is today's (default: the "
                                                     f"last one before bounded prediction, {BEFORE}; HEAD with --tiny)")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--skip-wb", action="store_true")
    parser.add_argument("--paths", default="head,full,bounded",
                        help="the ct300 paths to run (head: the --head commit's code, which cannot load a model "
                             "logged by a much later commit; leave it out then)")
    parser.add_argument("--backend", default=None, help="MEDSEG_BACKEND for the workers (torch, openvino, "
                                                        "onnxruntime); the workloads are then named NAME@BACKEND")
    parser.add_argument("--wb-spacing", type=float, default=1.5)
    parser.add_argument("--wb-patch", default=None, help="the whole-body model's patch (default 96,96,64; "
                                                         f"{TINY_PATCH} with --tiny)")
    add_tiny_arguments(parser)
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite memory.md (and what each workload replaced) from --out's memory.json")
    parser.add_argument("--worker", choices=["head", "full", "bounded"])
    for name in ("--model", "--tracking-uri", "--input", "--output", "--tree"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.table_only:
        out = results_folder(args)
        saved = json.loads((out / "memory.json").read_text())
        _write(out, {"head": saved["head"], "workloads": saved["workloads"]}, rerun=False)
        return
    if args.tiny:
        args.repeats = 1
    args.wb_patch = args.wb_patch or (TINY_PATCH if args.tiny else "96,96,64")
    out = results_folder(args)
    work = scratch_folder("bench_memory_", args, out)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    head = subprocess.run(["git", "rev-parse", args.head or ("HEAD" if args.tiny else BEFORE)], capture_output=True,
                          text=True, cwd=REPO, check=True).stdout.strip()
    report: dict = {"head": head, "workloads": {}}
    if args.backend:  # inherited by every worker process
        os.environ["MEDSEG_BACKEND"] = args.backend
    suffix = f"@{args.backend}" if args.backend else ""
    shown = "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {shown}".strip(),
               "backend": os.environ.get("MEDSEG_BACKEND", "auto")}
    if not args.skip_ct:
        load = os.getloadavg()
        report["workloads"]["ct300" + suffix] = {**_ct300(args, work, tracking, head), **started,
                                                 "load_average_at_start": [round(x, 2) for x in load]}
    if not args.skip_wb:
        load = os.getloadavg()
        report["workloads"]["wb1000" + suffix] = {**_wb1000(args, work, tracking), **started,
                                                  "load_average_at_start": [round(x, 2) for x in load]}
    _write(out, report)


def _unpack(commit: str, tree: Path) -> None:
    """The repository's files at ``commit``, in ``tree``: ``git archive``, which (unlike a worktree) leaves the
    shared checkout's ``.git`` alone, and leaves nothing behind in it when a run is killed."""
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], capture_output=True, cwd=REPO,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, capture_output=True, check=True)


def _ct300(args: argparse.Namespace, work: Path, tracking: str, head: str) -> dict:
    paths = [p for p in ("head", "full", "bounded") if p in args.paths.split(",")]
    tree = work / "head"
    if "head" in paths:
        _unpack(head, tree)
    inputs = work / "ct300"
    inputs.mkdir()
    shape, spacing = TINY_CT if args.tiny else ((512, 512, 300), (0.7, 0.7, 1.5))
    _make_ct(inputs / "ct.nii.gz", shape, spacing)
    patch = TINY_PATCH if args.tiny else "96,96,64"
    model = _log_model(work, [f"patch.size=[{patch}]", *CT_MODEL, *(TINY_NETWORK if args.tiny else [])], "ct300")
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for repeat in range(args.repeats):
        for path in paths[repeat % len(paths):] + paths[: repeat % len(paths)]:
            runs[path].append(_run(path, model, tracking, inputs, work / f"out_{path}",
                                   str(tree) if path == "head" else None, args.tiny))
    masks = {p: work / f"out_{p}" / "ct.nii.gz" for p in paths}
    network = "4-8-16-32" if args.tiny else "8-16-32-64"
    compared = {f"bounded_vs_{p}": _compare(masks[p], masks["bounded"]) for p in ("full", "head")
                if p in paths and "bounded" in paths}
    return {"shape": list(shape), "classes": 3,
            "model": f"lean U-Net {network}, patch {patch.replace(',', 'x')}, overlap 0.25",
            "runs": runs, "seconds": {p: statistics.median(r["seconds"] for r in runs[p]) for p in paths},
            "peak_rss_mb": {p: max(r["peak_rss_mb"] for r in runs[p]) for p in paths}, **compared}


def _wb1000(args: argparse.Namespace, work: Path, tracking: str) -> dict:
    inputs = work / "wb1000"
    inputs.mkdir()
    shape, voxel = TINY_WB if args.tiny else ((512, 512, 1000), (0.8, 0.8, 1.5))
    classes = TINY_WB_CLASSES if args.tiny else 100
    _make_ct(inputs / "wb.nii.gz", shape, voxel)
    labels = "{" + ", ".join(f"{i}: c{i}" for i in range(classes)) + "}"
    spacing = args.wb_spacing
    patch = f"[{args.wb_patch}]"
    model = _log_model(work, [f"patch.size={patch}", *CT_MODEL, f"data.labels={labels}",
                              f"preprocess.spacing=[{spacing},{spacing},{spacing}]",
                              *(TINY_NETWORK if args.tiny else [])], "wb1000")
    run = _run("bounded", model, tracking, inputs, work / "out_wb", None, args.tiny)
    network = "4-8-16-32" if args.tiny else "8-16-32-64"
    return {"shape": list(shape), "classes": classes, "spacing_mm": list(voxel),
            "model": f"lean U-Net {network}, {classes} classes, patch {patch}, overlap 0.25, resampled to {spacing} mm",
            "runs": {"bounded": [run]}, "seconds": {"bounded": run["seconds"]},
            "peak_rss_mb": {"bounded": run["peak_rss_mb"]}}


def _last_commit(path: Path) -> str:
    """The last commit that changed ``path`` (short hash), or "uncommitted"."""
    done = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], capture_output=True, text=True,
                          cwd=REPO, check=False)
    return done.stdout.strip() or "uncommitted"


#: Issue 29's memory targets (whole-process peak RSS): 1.45 GB for ct300 slab by slab (half of the 2.9 GB
#: the full buffer took), 3 GB for wb1000; and slab by slab at most 1.1x the full buffer's wall time.
TARGET_MIB = {"ct300": 1.45e9 / 2**20, "wb1000": 3e9 / 2**20}
TARGET_TIME = 1.1


def _targets(workloads: dict) -> list[str]:
    """One line per workload: its bounded peak (and time against the full path's) against the targets."""
    lines = []
    for name, w in workloads.items():
        target = TARGET_MIB.get(name.split("@")[0])
        peak = w["peak_rss_mb"].get("bounded")
        if target is None or peak is None:
            continue
        text = (f"- target {name}: bounded {peak:.0f} MiB against at most {target:.0f} MiB "
                f"({'met' if peak <= target else 'not met'})")
        full = w["seconds"].get("full")
        if full:
            ratio = w["seconds"]["bounded"] / full
            text += (f"; wall {ratio:.2f}x the full path's in the same run, against at most {TARGET_TIME}x "
                     f"({'met' if ratio <= TARGET_TIME else 'not met'})")
        lines.append(text + ".")
    return lines


def _committed(out: Path) -> dict:
    """The workloads of ``out``'s memory.json as the last commit has them ({} outside the repository)."""
    try:
        relative = (out / "memory.json").resolve().relative_to(REPO)
    except ValueError:
        return {}
    done = subprocess.run(["git", "show", f"HEAD:{relative}"], capture_output=True, text=True, cwd=REPO, check=False)
    return json.loads(done.stdout).get("workloads", {}) if done.returncode == 0 else {}


def _write(out: Path, report: dict, rerun: bool = True) -> None:
    """memory.json (the workloads run merged into those already there) and memory.md; ``rerun``: the
    workloads in ``report`` were just run (False: rewritten from the JSON, nothing replaced in it)."""
    import platform

    import torch

    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "note": "a shared 2-core host: other sessions' jobs ran beside these, so wall times are noisy"}
    out.mkdir(parents=True, exist_ok=True)
    committed = _committed(out)
    for name, workload in report["workloads"].items():  # the figures a rerun replaces, as HEAD has them
        before = committed.get(name)
        if before and before["peak_rss_mb"] != workload["peak_rss_mb"]:
            workload["replaced"] = {"commit": _last_commit(out / "memory.json"), "seconds": before["seconds"],
                                    "peak_rss_mb": before["peak_rss_mb"]}
    if (out / "memory.json").exists():  # a run of one workload keeps the other's last results
        earlier = json.loads((out / "memory.json").read_text())
        for name, workload in report["workloads"].items():  # and the figures it replaces, for comparison
            replaced = earlier.get("workloads", {}).get(name)
            if replaced and rerun:
                workload["earlier"] = replaced.get("earlier") or {
                    "commit": _last_commit(out / "memory.json"), "seconds": replaced["seconds"],
                    "peak_rss_mb": replaced["peak_rss_mb"]}
        report["workloads"] = {**earlier.get("workloads", {}), **report["workloads"]}
    (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| workload | path | s (median) | peak RSS (MiB) | vs head (else full): time | memory |",
             "|---|---|---|---|---|---|"]
    for name, w in report["workloads"].items():
        base = "head" if "head" in w["seconds"] else "full"
        base_s, base_m = w["seconds"].get(base), w["peak_rss_mb"].get(base)
        for path, s in w["seconds"].items():
            m = w["peak_rss_mb"][path]
            lines.append(f"| {name} ({'x'.join(map(str, w['shape']))}, {w['classes']} classes) | {path} | {s:.1f} | "
                         f"{m:.0f} | {f'{s / base_s:.2f}x' if base_s else ''} | {f'{m / base_m:.2f}x' if base_m else ''} |")
    lines.append("")
    for name, w in report["workloads"].items():
        lines.append(f"- {name}: {w['model']}.")
        if w.get("command"):
            load = "/".join(f"{x:.1f}" for x in w.get("load_average_at_start", []))
            lines.append(f"  - `{w['command']}`, backend {w['backend']}, host load average {load} (1/5/15 min) "
                         "as it started.")
        for key in ("bounded_vs_full", "bounded_vs_head"):
            if key in w:
                c = w[key]
                lines.append(f"  - masks {key.replace('_', ' ')}: {c['differ']} of {c['voxels']} voxels differ "
                             f"(bitwise equal: {c['bitwise_equal']}, same affine: {c['same_affine']}).")
    lines += _targets(report["workloads"])
    for name, w in report["workloads"].items():
        for key, what in (("replaced", "the run these replace"), ("earlier", "the first run")):
            if w.get(key) and (key == "replaced" or w.get("replaced", {}).get("commit") != w[key]["commit"]):
                e = w[key]
                shown = ", ".join(f"{p} {e['peak_rss_mb'][p]:.0f} MiB in {e['seconds'][p]:.1f} s" for p in e["seconds"])
                lines.append(f"- {name}, {what} (results committed in {e['commit']}): {shown}.")
    lines.append(f"\nhead = {report['head']} (the full-buffer code before bounded prediction, unpacked from git; "
                 "left out where it cannot load a model logged by this code); full/bounded = this code "
                 "with MEDSEG_PREDICT_SCORES=full/bounded; wb1000 runs the bounded path only (its full buffer "
                 "would hold ~100 GB of scores). Peak RSS is each child process's VmHWM (the whole process). "
                 f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
                 f"{report['machine']['torch']}; {report['machine']['note']}.")
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
