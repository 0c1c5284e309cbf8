"""Batch inference on Ray Data against the local path: ``medseg predict`` of the 52 held-out MSD
hippocampus scans with ``--engine local`` and ``--engine ray`` (1 and 2 actors of one CPU each).

Each configuration runs as its own ``medseg predict`` process (a fresh Ray runtime for the Ray ones,
started and stopped by the command), the ``configs/msd_hippocampus.yaml`` network freshly initialised
(speed does not depend on the weights), ``--backend torch``, no review page. Two figures per run:

- **wall**: the whole command, imports, model loading and (Ray) runtime and actor start included;
- **steady cases/s**: cases finished per second between the first and the last mask written (the
  masks' modification times), which is what a long cohort run converges to.

The local path at 1 thread is compared with 1 actor of 1 CPU, and at 2 threads with 2 actors of 1 CPU
(equal cores). Every run's masks are compared with the local 1-thread run's, byte for byte.

Usage: python benchmarks/bench_ray.py [--cases 52] [--repeats 1] [--out benchmarks/results] [--table-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
#: name -> (threads for torch in the local path, extra predict flags)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "local, 1 thread": (1, []),
    "ray, 1 actor x 1 CPU": (1, ["--engine", "ray", "--ray-actors", "1", "--ray-local-cpus", "2"]),
    "local, 2 threads": (2, []),
    "ray, 2 actors x 1 CPU": (1, ["--engine", "ray", "--ray-actors", "2", "--ray-local-cpus", "2"]),
}


def _log_model(workdir: Path) -> str:
    """Log the hippocampus network, freshly initialised, with its contract, as `medseg run` would."""
    from medseg import load_config
    from medseg.engine.loop import log_network
    from medseg.tasks.segmentation.training import build_network, model_contract
    from medseg.tracking import MlflowTracker

    cfg = load_config(REPO / "configs" / "msd_hippocampus.yaml", [])
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", "bench")
    tracker.start("bench-model", {})
    uri = log_network(build_network(cfg), cfg, model_contract(cfg), workdir, tracker)
    tracker.end()
    return str(uri)


def _run(name: str, model: str, tracking: str, scans: Path, out: Path) -> dict[str, object]:
    threads, flags = CONFIGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MEDSEG_BACKEND": "torch", "RAY_DEDUP_LOGS": "1"}
    command = [sys.executable, "-m", "medseg", "predict", "--model", model, "--tracking-uri", tracking, "--input",
               str(scans), "--output", str(out), "--no-progress", "--no-tracking", "--no-review", *flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    masks = sorted(out.glob("*.nii.gz"))
    times = sorted(p.stat().st_mtime for p in masks)
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    summary = json.loads((out / "predict_summary.json").read_text())
    return {"config": name, "cases": len(masks), "wall_s": round(wall, 2),
            "steady_cases_per_s": round(steady, 3) if steady else None,
            "driver_peak_rss_mb": round(float(summary["peak_rss_mb"]), 1),
            "masks_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in masks)).hexdigest()}


def _markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    reference = {r["config"]: r for r in rows}
    lines = ["# Batch inference on Ray Data against the local path", "",
             f"`python benchmarks/bench_ray.py --cases {meta['cases']} --repeats {meta['repeats']}` on "
             f"{meta['host']} ({meta['cpus']} CPUs), {meta['date']}. **The CPU was shared with other jobs while this "
             "ran** (other sessions' tests and benchmarks on the same 2 cores), so the figures are noisy and "
             "slower than on an idle machine; compare rows with each other, not with other results files.", "",
             f"{meta['cases']} held-out MSD hippocampus scans, the `configs/msd_hippocampus.yaml` network freshly "
             "initialised, torch backend, no review page; each row one `medseg predict` process (median of the "
             "repeats). *wall*: the whole command (imports, model, Ray runtime and actors included); *steady*: "
             "cases per second between the first and the last mask written. *same masks*: every mask equal, byte for "
             "byte, to the local 1-thread run's.", "",
             "| configuration | cases | wall (s) | steady cases/s | steady vs local at equal cores | same masks |",
             "|---|---|---|---|---|---|"]
    pairs = {"ray, 1 actor x 1 CPU": "local, 1 thread", "ray, 2 actors x 1 CPU": "local, 2 threads"}
    for row in rows:
        local = reference.get(pairs.get(str(row["config"]), ""))
        ratio = (f"{float(row['steady_cases_per_s']) / float(local['steady_cases_per_s']):.2f}x"  # type: ignore[arg-type]
                 if local and row["steady_cases_per_s"] and local["steady_cases_per_s"] else "")
        same = "yes" if row["masks_sha256"] == reference["local, 1 thread"]["masks_sha256"] else "no"
        lines.append(f"| {row['config']} | {row['cases']} | {row['wall_s']} | {row['steady_cases_per_s']} | "
                     f"{ratio} | {same} |")
    lines += ["", "The untrained network's masks hold every label, so *same masks* compares real label maps. A "
              "2-thread torch run could differ from the 1-thread masks in rare voxels (another summation order); "
              "the Ray actors run one thread each, as the 1-thread run does. On a loaded host the 2-thread local "
              "run is likely the one most hurt by the other jobs (its two threads wait for each other in every "
              "parallel region), which the one-thread processes are not: rerun this script on an idle host before "
              "drawing a conclusion from that row.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every configuration ``--repeats`` times and write ray.json and ray.md (or, with ``--table-only``,
    rewrite ray.md from an existing ray.json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=52)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--table-only", action="store_true", help="rewrite ray.md from OUT/ray.json")
    args = parser.parse_args(argv)
    if args.table_only:
        saved = json.loads((args.out / "ray.json").read_text())
        (args.out / "ray.md").write_text(_markdown(saved["rows"], saved["meta"]))
        return
    from medseg.data.manifest import read_manifest

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    scans = work / "scans"
    scans.mkdir()
    manifest = read_manifest(REPO / "data_manifests" / "msd_hippocampus.csv")
    for case in manifest.split("test")[: args.cases]:
        (scans / Path(case.images[0]).name).symlink_to(HIPPO / case.images[0])
    model, tracking = _log_model(work), f"sqlite:///{work / 'mlflow.db'}"
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for index, name in enumerate(CONFIGS):
            runs[name].append(_run(name, model, tracking, scans, work / f"out_{repeat}_{index}"))
            print(json.dumps(runs[name][-1]), flush=True)
    rows = [sorted(found, key=lambda r: float(r["wall_s"]))[len(found) // 2] for found in runs.values()]  # type: ignore[arg-type]
    meta = {"cases": args.cases, "repeats": args.repeats, "host": platform.node() or "this host",
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2) + "\n")
    (args.out / "ray.md").write_text(_markdown(rows, meta))


if __name__ == "__main__":
    main()
