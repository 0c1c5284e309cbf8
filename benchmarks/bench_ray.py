"""Batch inference on Ray Data against the local path: ``medseg predict`` with ``--engine local`` and
``--engine ray`` (1 and 2 actors of one CPU each) on two workloads:

- ``hippocampus``: the 52 held-out MSD hippocampus scans, the ``configs/msd_hippocampus.yaml`` network;
- ``ct512``: ``--ct-cases`` (5) synthetic 512x512x300 int16 CTs (bench_predict.py's generator, one
  volume written and copied, so every case has the same content) with bench_predict.py's ct512 network
  (a lean 3D U-Net, 96x96x64 patch, overlap 0.25, CT window).

Each configuration runs as its own ``medseg predict`` process (a fresh Ray runtime of 2 CPUs for the Ray
ones, started and stopped by the command: the actors' CPUs, the reading and writing workers sharing
them), the networks freshly initialised (speed does not depend on the weights), ``--backend torch``, no
review page. Two figures per run:

- **wall**: the whole command, imports, model loading and (Ray) runtime and actor start included;
- **steady cases/s**: cases finished per second between the first and the last mask written (the
  masks' modification times), which is what a long cohort run converges to.

The local path at 1 thread is compared with 1 actor of 1 CPU, and at 2 threads with 2 actors of 1 CPU
(equal cores). Every run's masks are compared with the local 1-thread run's, byte for byte. The Ray
runs also record the largest peak memory of the network's actors (``predict_summary.json``).

Usage: python benchmarks/bench_ray.py [--cases 52] [--ct-cases 5] [--repeats 1] [--out benchmarks/results]
[--table-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_predict import _make_ct, link_hippocampus_test_cases, log_fresh_model

REPO = Path(__file__).resolve().parents[1]
#: bench_predict.py's ct512 network: the size a CT model would use.
CT_NETWORK = ["patch.size=[96,96,64]", "model.channels=[8,16,32,64]", "validation.overlap=0.25",
              "preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-160,240]",
              "data.labels={0: background, 1: organ}"]
CT_SHAPE = (512, 512, 300)
#: name -> (threads for torch in the local path, extra predict flags)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "local, 1 thread": (1, []),
    "ray, 1 actor x 1 CPU": (1, ["--engine", "ray", "--ray-actors", "1", "--ray-local-cpus", "2"]),
    "local, 2 threads": (2, []),
    "ray, 2 actors x 1 CPU": (1, ["--engine", "ray", "--ray-actors", "2", "--ray-local-cpus", "2"]),
}


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
    actors = [float(w["peak_rss_mb"]) for w in (summary.get("ray") or {}).get("workers", {}).values()]
    row = {"config": name, "cases": len(masks), "wall_s": round(wall, 2),
           "steady_cases_per_s": round(steady, 3) if steady else None,
           "driver_peak_rss_mb": round(float(summary["peak_rss_mb"]), 1),
           "masks_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in masks)).hexdigest()}
    if actors:
        row["actor_peak_rss_mb"] = max(actors)
    return row


#: Each Ray configuration and the local one at equal cores.
PAIRS = {"ray, 1 actor x 1 CPU": "local, 1 thread", "ray, 2 actors x 1 CPU": "local, 2 threads"}


def _table(rows: list[dict[str, object]]) -> list[str]:
    """One workload's rows: wall, steady rate, the ratio to the local run at equal cores, memory, same masks."""
    reference = {r["config"]: r for r in rows}
    lines = ["| configuration | cases | wall (s) | steady cases/s | steady vs local at equal cores | "
             "largest actor peak RSS (MiB) | same masks |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        local = reference.get(PAIRS.get(str(row["config"]), ""))
        ratio = (f"{float(row['steady_cases_per_s']) / float(local['steady_cases_per_s']):.2f}x"  # type: ignore[arg-type]
                 if local and row["steady_cases_per_s"] and local["steady_cases_per_s"] else "")
        same = "yes" if row["masks_sha256"] == reference["local, 1 thread"]["masks_sha256"] else "no"
        lines.append(f"| {row['config']} | {row['cases']} | {row['wall_s']} | {row['steady_cases_per_s']} | "
                     f"{ratio} | {row.get('actor_peak_rss_mb', '')} | {same} |")
    return lines


def _markdown(report: dict[str, object]) -> str:
    meta: dict[str, object] = report["meta"]  # type: ignore[assignment]
    command = meta.get("command") or f"python benchmarks/bench_ray.py --cases {meta['cases']} --repeats {meta['repeats']}"
    lines = ["# Batch inference on Ray Data against the local path", "",
             f"`{command}` on {meta['host']} ({meta['cpus']} CPUs), {meta['date']}"
             f"{', load average ' + str(meta['load_average']) + ' at the start' if meta.get('load_average') else ''}. "
             "**The host was shared with other sessions while this ran** (their tests and benchmarks on the same "
             "2 cores), so the figures are noisy and slower than on an idle machine; compare rows with each other, "
             "not with other results files.", "",
             "Each row one `medseg predict` process (median of the repeats), torch backend, freshly initialised "
             "networks, no review page. *wall*: the whole command (imports, model, Ray runtime and actors "
             "included); *steady*: cases per second between the first and the last mask written; *largest actor "
             "peak RSS*: the network actor's peak resident memory (`predict_summary.json`). *same masks*: every "
             "mask equal, byte for byte, to the local 1-thread run's. "
             f"{meta.get('stages') or 'The Ray runs predicted each case in one stage.'}"
             f"{' ' + str(meta['note']) if meta.get('note') else ''}", "",
             f"## {meta['cases']} held-out MSD hippocampus scans", "",
             "The `configs/msd_hippocampus.yaml` network.", "", *_table(report["rows"])]  # type: ignore[arg-type]
    ct = report.get("ct512")
    if isinstance(ct, dict):
        shape = "x".join(str(n) for n in ct["shape"])
        lines += ["", f"## {ct['cases']} synthetic {shape} CTs", "",
                  "bench_predict.py's CT generator (int16, 0.7x0.7x1.5 mm, a body-shaped ellipse with noise; one "
                  "volume written and copied, so the cases have the same content) and its ct512 network (a lean "
                  "3D U-Net, 96x96x64 patch, overlap 0.25, CT window, 2 classes).", "", *_table(ct["rows"])]
    lines += ["", "*At equal cores*: each Ray runtime has 2 CPUs. With three stages the reading and writing "
              "workers reserve no CPU and run beside the network's actors, so the 1-actor row is a pipeline that "
              "may use the second core for reading and writing while its actor runs the network on one thread: "
              "its ratio to the 1-thread local run is not one core against one core. The 2-actor row and the "
              "2-thread local run both have the 2 cores.", "",
              "The untrained networks' masks hold every label, so *same masks* compares real label maps. A "
              "2-thread torch run could differ from the 1-thread masks in rare voxels (another summation order); "
              "the Ray actors run one thread each, as the 1-thread run does. On a loaded host the 2-thread local "
              "run is likely the one most hurt by the other jobs (its two threads wait for each other in every "
              "parallel region), which the one-thread processes are not: rerun this script on an idle host before "
              "drawing a conclusion from that row.", ""]
    return "\n".join(lines)


def _measure(model: str, tracking: str, scans: Path, work: Path, repeats: int, tag: str) -> tuple[list, dict]:
    """Every configuration ``repeats`` times on ``scans``: the median rows (by wall time) and every run."""
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in CONFIGS}
    for repeat in range(repeats):
        for index, name in enumerate(CONFIGS):
            runs[name].append(_run(name, model, tracking, scans, work / f"out_{tag}_{repeat}_{index}"))
            print(json.dumps({"workload": tag, **runs[name][-1]}), flush=True)
    rows = [sorted(found, key=lambda r: float(r["wall_s"]))[len(found) // 2] for found in runs.values()]  # type: ignore[arg-type]
    return rows, runs


def _fresh_model(folder: Path, overrides: list[str]) -> tuple[str, str]:
    """A freshly initialised network logged in its own folder and MLflow store: (model URI, tracking URI)."""
    folder.mkdir(parents=True)
    return log_fresh_model(folder, REPO / "configs" / "msd_hippocampus.yaml", overrides), f"sqlite:///{folder / 'mlflow.db'}"


def _ct_scans(folder: Path, cases: int) -> Path:
    """``cases`` copies of one synthetic 512x512x300 CT (bench_predict.py's), each its own file."""
    folder.mkdir(parents=True)
    _make_ct(folder / "ct_0.nii.gz", CT_SHAPE)
    for index in range(1, cases):
        shutil.copy(folder / "ct_0.nii.gz", folder / f"ct_{index}.nii.gz")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Run every configuration ``--repeats`` times on each workload and write ray.json and ray.md (or, with
    ``--table-only``, rewrite ray.md from an existing ray.json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=52, help="hippocampus scans (default 52)")
    parser.add_argument("--ct-cases", type=int, default=5, help="synthetic 512x512x300 CTs (default 5; 0: none)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--table-only", action="store_true", help="rewrite ray.md from OUT/ray.json")
    args = parser.parse_args(argv)
    if args.table_only:
        saved = json.loads((args.out / "ray.json").read_text())
        (args.out / "ray.md").write_text(_markdown(saved))
        return
    meta = {"cases": args.cases, "ct_cases": args.ct_cases, "repeats": args.repeats,
            "command": f"OMP_NUM_THREADS=1 python benchmarks/bench_ray.py --cases {args.cases} --ct-cases "
                       f"{args.ct_cases} --repeats {args.repeats}",
            "host": platform.node() or "this host", "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(), "load_average": round(os.getloadavg()[0], 1),
            "stages": "The Ray runs predicted each case in three Ray Data stages: reading and preprocessing, "
                      "the network (the actors), inversion and writing (`medseg.engine.ray_stages`)."}
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    scans = work / "scans"
    link_hippocampus_test_cases(scans, args.cases)
    report: dict[str, object] = {"meta": meta}
    report["rows"], report["runs"] = _measure(*_fresh_model(work / "hippocampus", []), scans, work, args.repeats,
                                              "hippocampus")
    if args.ct_cases:
        rows, runs = _measure(*_fresh_model(work / "ct512", CT_NETWORK), _ct_scans(work / "ct", args.ct_cases), work,
                              args.repeats, "ct512")
        report["ct512"] = {"cases": args.ct_cases, "shape": list(CT_SHAPE), "rows": rows, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "ray.md").write_text(_markdown(report))


if __name__ == "__main__":
    main()
