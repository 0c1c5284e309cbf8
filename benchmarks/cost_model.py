"""The cost of predicting a cohort on a cluster, fitted to the committed measurements.

Reads three results files (never measures anything itself):

- ``ray.json`` (``benchmarks/bench_ray.py``): hippocampus scans on Ray actors of one CPU each, cases
  per second once running, and the whole command's wall time;
- ``predict.json`` (``benchmarks/bench_predict.py``): seconds per case of ``medseg predict`` on
  hippocampus scans and, when it ran its CT workload, on a 512x512x300 CT;
- ``memory.json`` (``benchmarks/bench_memory.py``): peak resident memory and wall time of a
  512x512x300 CT predicted slab by slab (the bounded path ``medseg predict`` takes by default).

and writes ``cost_model.json`` and ``cost_model.md``: core-seconds and cases per hour per core of a
CT-sized and a hippocampus-sized case, the memory of one actor, and for a cohort of CTs the
core-hours, the wall time on N machines of C cores and M GB (actors per machine bounded by cores or
by memory, whichever binds first) and the storage of the masks. Every input figure is written with
its file and key; every other number is an assumption given as an option below, and the Markdown
says each one. No GPU was measured in these files, so no GPU figure is given.

Usage: python benchmarks/cost_model.py [--cohort 100000] [--machines 10] [--cores 32] [--memory-gb 128]
       [--ct-shape 512,512,300] [--results benchmarks/results] [--out benchmarks/results] [--tiny]
``--tiny`` (benchmarks/tiny.py) computes the same model from the same committed files (it takes a
second) and writes it to ``--out`` or a new temporary folder, never to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiny import RESULTS, add_tiny_arguments, results_folder

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO.parent / "shared" / "data" / "msd_task04_hippocampus"
HIPPO_MANIFEST = REPO / "data_manifests" / "msd_hippocampus.csv"
#: ray.json's row of one actor with one CPU: one core's throughput, nothing shared.
RAY_ONE_CORE = {"config": "ray, 1 actor x 1 CPU"}
#: Where each input comes from and the command that writes it (for the error when one is missing).
SOURCES = {"ray.json": "python benchmarks/bench_ray.py --cases 52 --repeats 3",
           "predict.json": "make bench-predict",
           "memory.json": "python benchmarks/bench_memory.py --skip-wb"}
#: One step of a key: a field name, or the row of a list whose fields have these values.
Step = str | dict[str, str]


@dataclass(frozen=True)
class Figure:
    """One measured input: its value and where it was read (file under the results folder, key path)."""

    value: Any
    unit: str
    file: str
    path: tuple[Step, ...]

    @property
    def key(self) -> str:
        """The key path as one string: ``rows[workload=ct512, path=medseg].s_per_case``."""
        parts = []
        for step in self.path:
            if isinstance(step, dict):
                parts[-1] += "[" + ", ".join(f"{k}={v}" for k, v in step.items()) + "]"
            else:
                parts.append(step)
        return ".".join(parts)


class Inputs:
    """The results files, read once; :meth:`get` records every figure taken from them."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.data, self.used = folder, {}, {}
        for name, command in SOURCES.items():
            path = folder / name
            if not path.is_file():
                raise SystemExit(f"{path}: missing. Expected the committed measurements ({', '.join(SOURCES)}) in "
                                 f"--results {folder}; got no {name}. Fix: write it with `{command}`, or point "
                                 "--results at the folder that holds them.")
            self.data[name] = json.loads(path.read_text(encoding="utf-8"))

    def get(self, name: str, file: str, path: Sequence[Step], unit: str, optional: bool = False) -> Figure | None:
        """The value at ``path`` in ``file``, recorded under ``name``; None for a missing optional one.

        Raises:
            SystemExit: a required key is not in the file (which key, what the file holds there).
        """
        node: Any = self.data[file]
        for step in path:
            if isinstance(step, dict):
                rows = [r for r in node if all(r.get(k) == v for k, v in step.items())] if isinstance(node, list) else []
                found = rows[0] if len(rows) == 1 else None
            else:
                found = node.get(step) if isinstance(node, dict) else None
            if found is None:
                if optional:
                    return None
                figure = Figure(None, unit, file, tuple(path))
                raise SystemExit(f"{self.folder / file}: expected a value at {figure.key}; got none at {step} (the "
                                 f"file's shape changed?). Fix: rewrite it with `{SOURCES[file]}`, or update "
                                 "benchmarks/cost_model.py to the new keys.")
            node = found
        self.used[name] = Figure(node, unit, file, tuple(path))
        return self.used[name]

    def value(self, name: str, file: str, path: Sequence[Step], unit: str) -> Any:
        figure = self.get(name, file, path, unit)
        assert figure is not None  # required: get raised otherwise
        return figure.value


def hippocampus_voxels(cases: int) -> tuple[float | None, str]:
    """Mean voxels of the first ``cases`` test cases of the hippocampus manifest (the scans bench_ray
    predicts), from their NIfTI headers; None when the data are not on this machine."""
    import nibabel as nib

    from medseg.data.manifest import read_manifest

    where = f"{HIPPO_MANIFEST.relative_to(REPO)} split test, first {cases} cases: mean of the headers' dim[1]*dim[2]*dim[3]"
    if not HIPPO.is_dir():
        return None, f"{where} (not computed: {HIPPO} is absent)"
    scans = [HIPPO / case.images[0] for case in read_manifest(HIPPO_MANIFEST).split("test")[:cases]]
    return statistics.fmean(math.prod(nib.load(scan).shape[:3]) for scan in scans), where


@dataclass(frozen=True)
class CaseCost:
    """What one case costs on CPUs, from one measurement."""

    case: str
    measured_by: str
    core_seconds: float
    actor_mib: float

    @property
    def cases_per_hour_per_core(self) -> float:
        return 3600 / self.core_seconds


def case_costs(inputs: Inputs) -> dict[str, CaseCost]:
    """Core-seconds and actor memory per case: each source of the CT and of the hippocampus case."""
    threads = inputs.value("predict_threads", "predict.json", ["machine", "threads"], "threads")
    hippo_rss = inputs.value("hippocampus_predict_peak_rss", "predict.json",
                             ["rows", {"workload": "hippocampus", "path": "medseg"}, "peak_rss_mb"], "MiB")
    ct_rss = inputs.value("ct_bounded_peak_rss", "memory.json", ["workloads", "ct300", "peak_rss_mb", "bounded"], "MiB")
    costs = {}
    ct_s = inputs.get("ct_predict_s_per_case", "predict.json", ["rows", {"workload": "ct512", "path": "medseg"},
                                                                 "s_per_case"], "s", optional=True)
    if ct_s is not None:
        costs["ct_predict"] = CaseCost("CT", "predict.json: seconds per case, model already loaded, x its torch threads",
                                       ct_s.value * threads, ct_rss)
    ct_wall = inputs.value("ct_bounded_seconds", "memory.json", ["workloads", "ct300", "seconds", "bounded"], "s")
    cpus = inputs.value("memory_cpus", "memory.json", ["machine", "cpus"], "CPUs")
    costs["ct_memory"] = CaseCost("CT", "memory.json: the whole predict process (load, predict, write) x the CPUs",
                                  ct_wall * cpus, ct_rss)
    rate = inputs.value("hippocampus_ray_cases_per_s", "ray.json", ["rows", RAY_ONE_CORE, "steady_cases_per_s"],
                        "cases/s")
    costs["hippocampus_ray"] = CaseCost("hippocampus", "ray.json: 1 actor x 1 CPU, steady cases/s", 1 / rate, hippo_rss)
    hippo_s = inputs.value("hippocampus_predict_s_per_case", "predict.json",
                           ["rows", {"workload": "hippocampus", "path": "medseg"}, "s_per_case"], "s")
    costs["hippocampus_predict"] = CaseCost("hippocampus", "predict.json: seconds per case x its torch threads",
                                            hippo_s * threads, hippo_rss)
    return costs


@dataclass(frozen=True)
class Cluster:
    """The machines a cohort runs on (assumptions, from the options)."""

    machines: int
    cores: int
    memory_gb: int
    cores_per_actor: int
    reserved_memory: float

    def actors_per_machine(self, actor_mib: float) -> tuple[int, str]:
        """Actors one machine holds, and what bounds them ("cores" or "memory")."""
        by_cores = self.cores // self.cores_per_actor
        by_memory = math.floor(self.memory_gb * 1024 * (1 - self.reserved_memory) / actor_mib)
        return (by_cores, "cores") if by_cores <= by_memory else (by_memory, "memory")


@dataclass(frozen=True)
class Scaling:
    """How a cohort CT differs from the measured one (voxels) and what that does to time and memory."""

    measured_voxels: int
    cohort_voxels: int
    process_base_mib: float

    @property
    def factor(self) -> float:
        return self.cohort_voxels / self.measured_voxels

    def actor_mib(self, measured_mib: float) -> float:
        """A process's fixed part (Python, torch, a model, a small case) plus the rest scaled with voxels."""
        return self.process_base_mib + (measured_mib - self.process_base_mib) * self.factor


def project(cost: CaseCost, cohort: int, cluster: Cluster, scaling: Scaling, startup_s: float,
            mask_bytes: int) -> dict[str, Any]:
    """The cohort on the cluster with one CT case cost: core-hours, actors, wall time, mask storage."""
    core_seconds = cost.core_seconds * scaling.factor
    actor_mib = scaling.actor_mib(cost.actor_mib)
    actors, bound = cluster.actors_per_machine(actor_mib)
    per_hour = cluster.machines * actors * cluster.cores_per_actor * 3600 / core_seconds if actors else 0.0
    return {"measured_by": cost.measured_by, "core_seconds_per_case": core_seconds,
            "core_hours": cohort * core_seconds / 3600, "actor_mib": actor_mib, "actors_per_machine": actors,
            "actors_bound_by": bound, "cores_busy_per_machine": actors * cluster.cores_per_actor,
            "cluster_cases_per_hour": per_hour,
            "wall_hours": cohort / per_hour + startup_s / 3600 if per_hour else None,
            "mask_bytes_per_case": mask_bytes, "mask_terabytes": cohort * mask_bytes / 1e12}


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected three positive whole numbers like 512,512,300; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1; got {text}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1; got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=_positive, default=100_000, help="CTs in the cohort (assumption; 100000)")
    parser.add_argument("--machines", type=_positive, default=10, help="machines in the cluster (assumption; 10)")
    parser.add_argument("--cores", type=_positive, default=32, help="CPU cores per machine (assumption; 32)")
    parser.add_argument("--memory-gb", type=_positive, default=128, help="memory per machine, GiB (assumption; 128)")
    parser.add_argument("--cores-per-actor", type=_positive, default=1,
                        help="CPUs each actor reserves, --ray-cpus-per-actor (assumption; 1, as ray.json measured)")
    parser.add_argument("--reserved-memory", type=_fraction, default=0.3,
                        help="share of each machine's memory not for actors: Ray's object store takes 30%% by "
                             "default (assumption; 0.3)")
    parser.add_argument("--ct-shape", type=_parse_shape, default=None,
                        help="voxels of a cohort CT, X,Y,Z (assumption; default the measured CT's shape)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder holding ray.json, predict.json and memory.json (default benchmarks/results)")
    add_tiny_arguments(parser)
    return parser.parse_args(argv)


def build_report(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every input read, the per-case costs, the GPU statement and the cohort projection, as one JSON object."""
    import numpy as np

    from medseg.tasks.segmentation.bounded import label_dtype

    inputs = Inputs(args.results)
    costs = case_costs(inputs)
    shape = inputs.value("ct_shape", "memory.json", ["workloads", "ct300", "shape"], "voxels")
    classes = inputs.value("ct_classes", "memory.json", ["workloads", "ct300", "classes"], "classes")
    wall = inputs.value("ray_wall_s", "ray.json", ["rows", RAY_ONE_CORE, "wall_s"], "s")
    cases = inputs.value("ray_cases", "ray.json", ["rows", RAY_ONE_CORE, "cases"], "cases")
    inputs.value("ray_driver_peak_rss", "ray.json", ["rows", RAY_ONE_CORE, "driver_peak_rss_mb"], "MiB")
    torch_builds = {file: inputs.value(f"torch_{file.split('.')[0]}", file, ["machine", "torch"], "build")
                    for file in ("predict.json", "memory.json")}
    startup_s = wall - (cases - 1) / inputs.used["hippocampus_ray_cases_per_s"].value
    hippo_voxels, hippo_where = hippocampus_voxels(cases)
    cohort_shape = args.ct_shape or tuple(shape)
    scaling = Scaling(math.prod(shape), math.prod(cohort_shape), costs["hippocampus_predict"].actor_mib)
    mask_bytes = scaling.cohort_voxels * np.dtype(label_dtype(dict.fromkeys(range(classes), ""))).itemsize
    cluster = Cluster(args.machines, args.cores, args.memory_gb, args.cores_per_actor, args.reserved_memory)
    voxels = {"CT": scaling.measured_voxels, "hippocampus": hippo_voxels}
    per_case = {name: {"case": c.case, "measured_by": c.measured_by, "core_seconds": c.core_seconds,
                       "cases_per_hour_per_core": c.cases_per_hour_per_core, "actor_mib": c.actor_mib,
                       "core_us_per_voxel": c.core_seconds * 1e6 / voxels[c.case] if voxels[c.case] else None}
                for name, c in costs.items()}
    scenarios = {name: project(c, args.cohort, cluster, scaling, startup_s, mask_bytes)
                 for name, c in costs.items() if c.case == "CT"}
    derived = {"ct_voxels_measured": scaling.measured_voxels, "ct_shape_cohort": list(cohort_shape),
               "ct_voxels_cohort": scaling.cohort_voxels, "voxel_factor": scaling.factor,
               "hippocampus_voxels_mean": hippo_voxels, "hippocampus_voxels_from": hippo_where,
               "ray_startup_s": startup_s, "mask_bytes_per_voxel": mask_bytes // scaling.cohort_voxels}
    gpu = {"cases_per_hour_per_gpu": None,
           "why": "No committed results file holds a GPU measurement: predict.json and memory.json were measured "
                  f"with torch {' and '.join(sorted(set(torch_builds.values())))} on CPUs, ray.json on CPU actors"}
    return {"command": command, "cluster": vars(cluster) | {"cohort": args.cohort},
            "inputs": {name: {"value": f.value, "unit": f.unit, "file": f.file, "key": f.key, "path": list(f.path)}
                       for name, f in inputs.used.items()},
            "derived": derived, "per_case": per_case, "gpu": gpu,
            "projection": {"cohort": args.cohort, "scenarios": scenarios},
            "assumptions": assumptions(args, derived)}


def assumptions(args: argparse.Namespace, derived: dict[str, Any]) -> list[dict[str, Any]]:
    """Each assumption the model makes: its option (None: built into the model) and what it says."""
    shape = "x".join(map(str, derived["ct_shape_cohort"]))
    return [
        {"option": "--cohort", "value": args.cohort, "says": "CTs in the cohort."},
        {"option": "--machines / --cores / --memory-gb", "value": [args.machines, args.cores, args.memory_gb],
         "says": "the cluster: identical machines, every core and GiB available to the batch."},
        {"option": "--reserved-memory", "value": args.reserved_memory,
         "says": "the share of a machine's memory left out of the actors' (Ray's object store takes 30% by default; "
                 "the operating system, the raylet and, on the head, the driver live in it too)."},
        {"option": "--cores-per-actor", "value": args.cores_per_actor,
         "says": "CPUs per actor; an actor of c CPUs is taken to finish a case c times faster (perfect thread "
                 "scaling), so core-seconds per case do not depend on it."},
        {"option": "--ct-shape", "value": shape,
         "says": "voxels of a cohort CT. Time per case scales linearly with voxels (sliding-window patches are "
                 "proportional to them); an actor's memory is a fixed part (the hippocampus predict process's peak) "
                 "plus the measured CT's remainder scaled with voxels."},
        {"option": None, "value": None,
         "says": "core-seconds = wall seconds x the torch threads (predict.json's machine.threads; memory.json "
                 "records none, so its machine.cpus: torch's default, which predict.json's threads equal on its "
                 "host): every thread counted busy for the whole time, an upper bound on the CPU time."},
        {"option": None, "value": None,
         "says": "the two CT figures bracket the cost: predict.json's is seconds per case with the model already "
                 "loaded, on the full-buffer path of its day; memory.json's is a whole predict process on the "
                 "bounded path, on a 2-core host shared with other jobs (its note says so)."},
        {"option": None, "value": None,
         "says": "predict.json's ct512 workload is the same 512x512x300 CT and lean U-Net (8-16-32-64, patch "
                 "96x96x64, overlap 0.25) as memory.json's ct300, with 2 classes against 3 (bench_predict.py's and "
                 "bench_memory.py's code say so; predict.json records neither shape nor classes)."},
        {"option": None, "value": None,
         "says": "memory per actor is a local predict process's peak RSS (VmHWM): an actor holds the same things "
                 "(Python, torch, one model, one case); memory.json's bounded path is the one medseg predict takes "
                 "for such a CT by default."},
        {"option": None, "value": None,
         "says": "a long batch runs at ray.json's steady rate; the rest of its measured command (Ray's runtime and "
                 "actor start, model loading) is paid once, not per case."},
        {"option": None, "value": None,
         "says": "masks are stored at most at one label per voxel of the CT's grid in the label type medseg "
                 "writes (uint8 for up to 256 classes); gzip shrinks them by a factor not measured here. Inputs, "
                 "probabilities (--save-probabilities) and the review page are not counted."},
        {"option": None, "value": None,
         "says": "no GPU figure: none was measured, so none is projected."},
    ]


def _num(x: float | None) -> str:
    if x is None:
        return "absent"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The results page: per-case costs, the projection, the inputs with their keys, the assumptions."""
    cluster, derived = report["cluster"], report["derived"]
    shape = "x".join(map(str, derived["ct_shape_cohort"]))
    lines = [f"# Cost model: {cluster['cohort']:,} CTs on {cluster['machines']} machines of {cluster['cores']} cores "
             f"and {cluster['memory_gb']} GiB", "",
             f"`{report['command']}` from the committed measurements (ray.json, predict.json, memory.json in "
             "benchmarks/results; each figure's file and key are listed below). This script measures nothing: "
             "every other number is an assumption, listed at the end with the option that sets it.", "",
             "**Per case, on CPUs.** Core-seconds: the wall seconds of one case times the cores it held.", "",
             "| case | measured by | core-seconds per case | cases/hour per core | memory per actor (MiB) | "
             "core-microseconds per voxel |", "|---|---|---|---|---|---|"]
    for c in report["per_case"].values():
        lines.append(f"| {c['case']} | {c['measured_by']} | {_num(c['core_seconds'])} | "
                     f"{_num(c['cases_per_hour_per_core'])} | {_num(c['actor_mib'])} | {_num(c['core_us_per_voxel'])} |")
    per_voxel = [c["core_us_per_voxel"] for c in report["per_case"].values() if c["core_us_per_voxel"]]
    lines += ["", f"Voxels per case: CT {derived['ct_voxels_measured']:,}; hippocampus "
              f"{_num(derived['hippocampus_voxels_mean'])} ({derived['hippocampus_voxels_from']}). The cost of a "
              f"voxel differs up to {max(per_voxel) / min(per_voxel):.1f}x between these rows (other networks, "
              "other ways of timing, a small case's fixed work: reading, writing, the model call), so the model scales time with voxels "
              "only from the measured CT to a cohort CT, never from the hippocampus to a CT.", "",
              f"**Per GPU: absent.** {report['gpu']['why']}; a GPU's cases/hour has to be measured on one "
              "(a `medseg predict --device cuda` batch's steady rate) before it can be projected.", "",
              f"**The cohort**: {cluster['cohort']:,} CTs of {shape} voxels, {cluster['machines']} machines x "
              f"{cluster['cores']} cores x {cluster['memory_gb']} GiB, {cluster['cores_per_actor']} CPU(s) per actor, "
              f"{cluster['reserved_memory']:.0%} of memory kept from the actors.", "",
              "| CT time from | core-seconds per CT | core-hours | actors per machine (bound by) | cases/hour, whole "
              "cluster | wall time (hours) | masks (TB, uncompressed) |", "|---|---|---|---|---|---|---|"]
    for p in report["projection"]["scenarios"].values():
        lines.append(f"| {p['measured_by'].split(':')[0]} | {_num(p['core_seconds_per_case'])} | {_num(p['core_hours'])} "
                     f"| {p['actors_per_machine']} ({p['actors_bound_by']}; {_num(p['actor_mib'])} MiB each) | "
                     f"{_num(p['cluster_cases_per_hour'])} | {_num(p['wall_hours'])} | {_num(p['mask_terabytes'])} |")
    lines += ["", f"Wall time includes the batch's start once ({_num(derived['ray_startup_s'])} s, from ray.json). "
              f"Masks: {derived['mask_bytes_per_voxel']} byte(s) per voxel.", "",
              "**Measured inputs.**", "", "| input | value | file | key |", "|---|---|---|---|"]
    for name, f in report["inputs"].items():
        value = f["value"] if isinstance(f["value"], (str, list)) else _num(f["value"])
        lines.append(f"| {name} | {value} {f['unit']} | {f['file']} | `{f['key']}` |")
    lines += ["", "**Assumptions.**", ""]
    for a in report["assumptions"]:
        option = f"`{a['option']} {a['value']}`: " if a["option"] else ""
        lines.append(f"- {option}{a['says']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Read the measurements, write cost_model.json and cost_model.md to the results folder."""
    import sys

    from medseg.io.atomic import atomic_write_text

    args = parse_args(argv)
    out = results_folder(args)
    command = " ".join(["python benchmarks/cost_model.py", *(sys.argv[1:] if argv is None else argv)])
    report = build_report(args, command)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cost_model.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(out / "cost_model.md", text)
    print(text)


if __name__ == "__main__":
    main()
