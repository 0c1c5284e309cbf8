"""Where folder inference spends its time, stage by stage: medseg's predict path against the MONAI
tutorial loop of benchmarks/bench_predict.py, on the same held-out MSD hippocampus scans in one run.

Stages, in seconds per case (the mean over the cases after the first, which warms both paths up):

- read: the file to an array (``LoadImaged``, with the tutorial's ``EnsureChannelFirstd``)
- preprocess: the rest of the image chain (type, value checks, orientation, spacing, normalisation)
- network: the network's forward passes (every window batch of the sliding window)
- sliding: the sliding window around them: cutting the windows, Gaussian blending, and (medseg) the
  softmax, the TTA/ensemble mean and the uncertainty sums
- invert: back onto the input's grid (``Invertd``) and the label map (argmax)
- write: the NIfTI mask out
- other: the rest of a case (medseg: input checks, uncertainty, volumes, QC, the report row)
- batch: what the folder costs beyond its cases, per case (medseg: discovery, the output folder's
  lock and stamp, the report, summary and QC files; the tutorial: listing the folder)

Model loading is timed once per run, apart. Each path runs in its own child process with its torch
threads set (``--threads``), the paths interleaved and their order alternated between repetitions;
the table gives the median over repetitions. The stages are timed by wrapping, in that process,
MONAI's ``apply_transform`` (each transform a ``Compose`` runs), ``Invertd``, the networks'
``forward``, medseg's case predictor (its ``samples``, slab ``sweep``, ``label_map`` and NIfTI writer),
the batch driver's per-case call and the tutorial loop's ``infer``; nothing in medseg changes. A nested stage's time is its own, not its
caller's (exclusive time), so the stages of a case add up to its wall time.

Usage: python benchmarks/profile_predict.py [--cases 52] [--repeats 3] [--threads 1,2] [--train-minutes M |
--hippocampus-model URI] [--label TEXT] [--out benchmarks/results] [--tiny]

The network is freshly initialised unless ``--hippocampus-model`` names a trained one or
``--train-minutes`` trains configs/msd_hippocampus.yaml for that long first (a mask's content changes
what writing it costs). ``--tiny`` (benchmarks/tiny.py): 2 cases, 1 repetition, 1 thread, a U-Net of
4-32 channels, the workers in this process; for the test suite, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from bench_predict import HIPPO, TINY_NETWORK, link_hippocampus_test_cases, log_fresh_model, tutorial_loop
from interleaved import in_process
from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
PATHS = ("monai", "medseg")
#: The per-case stages, in table order; a case's stages add up to its wall time.
CASE_STAGES = ("read", "preprocess", "network", "sliding", "invert", "write", "other")
STAGES = (*CASE_STAGES, "batch")
NAMES = {"monai": "plain MONAI", "medseg": "medseg"}


class StageClock:
    """Exclusive wall time per stage: entering a stage pauses the one it is called from."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.inclusive: dict[str, float] = defaultdict(float)  # with the stages called from it
        self._stack: list[str] = []
        self._mark = 0.0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = entered = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._mark
            self.inclusive[name] += now - entered
            self._mark = now

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` run inside stage ``name``."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return function(*args, **kwargs)
        return wrapper

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def transform_stage(transform: Any) -> str | None:
    """The stage of a transform a ``Compose`` applies (None for a nested ``Compose``: its own transforms count)."""
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        SaveImaged,
    )

    if isinstance(transform, Compose):
        return None
    if getattr(transform, "__name__", "") == "inverse":  # Compose.inverse's steps, inside Invertd
        return "invert"
    for types, stage in (((LoadImaged, EnsureChannelFirstd), "read"), ((Invertd, AsDiscreted), "invert"),
                         ((SaveImaged,), "write")):
        if isinstance(transform, types):
            return stage
    return "preprocess"


@contextlib.contextmanager
def timing_hooks(clock: StageClock) -> Iterator[None]:
    """Wrap, in this process, what each stage calls (see the module docstring); undone on exit."""
    import monai.transforms.compose as compose
    from monai.transforms import Invertd

    import medseg.engine.predict as batch
    import medseg.tasks.segmentation.predict as segmentation

    apply = compose.apply_transform

    def apply_timed(transform: Any, *args: Any, **kwargs: Any) -> Any:
        stage = transform_stage(transform)
        if stage is None:
            return apply(transform, *args, **kwargs)
        with clock.stage(stage):
            return apply(transform, *args, **kwargs)

    predictor = segmentation.SegmentationPredictor
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(compose, "apply_transform", apply_timed))
        stack.enter_context(mock.patch.object(Invertd, "__call__", clock.timed("invert", Invertd.__call__)))
        stack.enter_context(mock.patch.object(predictor, "samples", clock.timed("sliding", predictor.samples)))
        stack.enter_context(mock.patch.object(segmentation, "sweep", clock.timed("sliding", segmentation.sweep)))
        stack.enter_context(mock.patch.object(predictor, "label_map", clock.timed("invert", predictor.label_map)))
        stack.enter_context(mock.patch.object(segmentation, "write_nifti", clock.timed("write", segmentation.write_nifti)))
        stack.enter_context(mock.patch.object(batch, "predict_one_case", clock.timed("other", batch.predict_one_case)))
        yield


def time_forward(network: Any, clock: StageClock) -> None:
    """Time ``network``'s forward passes as the "network" stage (its own ``forward``, not its layers')."""
    network.forward = clock.timed("network", network.forward)


def _case_record(name: str, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    stages = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in CASE_STAGES}
    return {"case": name, "stages": stages, "total": sum(stages.values())}


def _run_medseg(args: argparse.Namespace, clock: StageClock) -> tuple[list[dict[str, Any]], str]:
    """medseg's folder inference (as bench_predict.py runs it): a record per case, and a SHA-256 of
    the report's values (voxels, volumes, uncertainty, QC) for a before/after comparison."""
    import medseg.engine.predict as batch
    from medseg import Predictor

    with clock.stage("load"):
        predictor = Predictor.from_uri(args.model, tracking_uri=args.tracking_uri, backend="torch")
    for network in predictor.model.networks:
        time_forward(network, clock)
    records: list[dict[str, Any]] = []
    one_case = batch.predict_one_case  # already timed as "other" by timing_hooks

    def recorded(predictor_: Any, case: Any, *rest: Any) -> Any:
        before = clock.snapshot()
        result = one_case(predictor_, case, *rest)
        records.append(_case_record(case.case_id, before, clock.snapshot()))
        return result

    with mock.patch.object(batch, "predict_one_case", recorded), clock.stage("batch"):
        report = predictor.predict_folder(Path(args.input), Path(args.output), overwrite=True, progress=False,
                                          review=False)
    failed = [r for r in report.results if r.status != "ok"]
    if failed:
        raise SystemExit(f"medseg failed {len(failed)} case(s): {failed[0].error}")
    values = json.dumps([[r.case_id, r.values] for r in report.results], sort_keys=True, default=str)
    return records, hashlib.sha256(values.encode()).hexdigest()


def _run_monai(args: argparse.Namespace, clock: StageClock) -> tuple[list[dict[str, Any]], None]:
    """The tutorial loop of bench_predict.py, a record per case."""
    with clock.stage("load"):
        loop = tutorial_loop(args.model, Path(args.output))
    loop.infer = clock.timed("sliding", loop.infer)  # type: ignore[method-assign]
    time_forward(loop.model, clock)
    records = []
    with clock.stage("batch"):
        for path in sorted(Path(args.input).glob("*.nii.gz")):
            before = clock.snapshot()
            with clock.stage("other"):
                loop(path)
            records.append(_case_record(path.name.removesuffix(".nii.gz"), before, clock.snapshot()))
    return records, None


def mask_digest(folder: Path) -> str:
    """SHA-256 over the voxel arrays (with dtype and shape) and affines of the ``*.nii.gz`` masks in ``folder``,
    by name: equal digests mean bitwise equal masks, whatever the compression of the files."""
    import nibabel as nib
    import numpy as np

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.nii.gz")):
        image = nib.load(path)
        array = np.asarray(image.dataobj)
        digest.update(f"{path.name} {array.dtype} {array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(np.asarray(image.affine, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _worker(args: argparse.Namespace) -> None:
    """Child process: one path at ``--threads`` threads; prints one JSON line."""
    import mlflow
    import torch

    import medseg.api  # noqa: F401 - imported before the clock starts, as in bench_predict.py's workers

    torch.set_num_threads(int(args.threads))
    mlflow.set_tracking_uri(args.tracking_uri)
    clock = StageClock()
    with timing_hooks(clock):
        started = time.perf_counter()
        records, values_digest = (_run_medseg if args.worker == "medseg" else _run_monai)(args, clock)
        wall = time.perf_counter() - started
    # the folder's own cost: all of it but its cases (stages it calls outside a case, such as a
    # transform run by discovery, count here); loading likewise whole
    batch_s = clock.inclusive["batch"] - sum(c["total"] for c in records)
    print(json.dumps({"path": args.worker, "threads": torch.get_num_threads(), "cases": records, "wall_s": wall,
                      "load_s": clock.inclusive["load"], "batch_s": batch_s,
                      "mask_digest": mask_digest(Path(args.output)) if args.worker == "medseg" else None,
                      "values_digest": values_digest}))


def _run_child(args: argparse.Namespace, path: str, threads: int, model: str, tracking: str, input_dir: Path,
               output_dir: Path) -> dict[str, Any]:
    worker = ["--worker", path, "--threads", str(threads), "--model", model, "--tracking-uri", tracking,
              "--input", str(input_dir), "--output", str(output_dir)]
    if args.tiny:
        return in_process(main, worker)
    done = subprocess.run([sys.executable, __file__, *worker], capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path} worker ({threads} threads) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_model(work: Path, minutes: float) -> tuple[str, str]:
    """Train configs/msd_hippocampus.yaml for ``minutes`` in ``work``; its model URI and tracking URI."""
    import medseg

    tracking = f"sqlite:///{work / 'mlflow.db'}"
    result = medseg.train(REPO / "configs" / "msd_hippocampus.yaml", progress=False, overrides=[
        f"data.root={HIPPO}", f"train.max_minutes={minutes}", "train.max_epochs=10000", f"output_dir={work / 'runs'}",
        f"tracking.uri={tracking}", "validation.overlays=0"])
    if result is None:  # pragma: no cover - only the non-main processes of a distributed run get None
        raise SystemExit("training returned no model")
    return result.model_uri, result.tracking_uri


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repetitions of each stage's mean seconds per case (the first case left out when there
    are more), the batch's seconds per case, and the shares of the total."""
    per_run = []
    for run in runs:
        cases = run["cases"][1:] or run["cases"]
        stages = {s: statistics.fmean(c["stages"][s] for c in cases) for s in CASE_STAGES}
        stages["batch"] = run["batch_s"] / len(run["cases"])
        per_run.append(stages)
    seconds = {s: statistics.median(r[s] for r in per_run) for s in STAGES}
    total = sum(seconds.values())
    return {"s_per_case": seconds, "total_s_per_case": total, "share": {s: seconds[s] / total for s in STAGES},
            "load_s": statistics.median(r["load_s"] for r in runs),
            "first_case_s": statistics.median(r["cases"][0]["total"] for r in runs),
            "case_median_s": statistics.median(statistics.median(c["total"] for c in r["cases"]) for r in runs),
            "cases": len(runs[0]["cases"]), "repeats": len(runs)}


def _commit() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--", "medseg")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes under medseg/" if dirty else "")


def table(label: str, result: dict[str, Any]) -> list[str]:
    """The Markdown tables (one per thread count) of one labelled run."""
    lines = [f"### {label}", "",
             f"Commit {result['commit']}; {result['model']}; load average {result['load_before'][0]:.2f} before, "
             f"{result['load_after'][0]:.2f} after (1 min)." + (
                 " **Other sessions shared the 2-core host during this run** (load above 2)."
                 if max(result["load_before"][0], result["load_after"][0]) > 2 else ""), ""]
    for threads, summary in result["threads"].items():
        plain, med = summary["monai"], summary["medseg"]
        lines += [f"{threads} torch thread(s), {med['cases']} cases, {med['repeats']} repetition(s), medians:", "",
                  "| stage | plain MONAI s/case | share | medseg s/case | share | plain / medseg |",
                  "|---|---|---|---|---|---|"]
        for stage in STAGES:
            p, m = plain["s_per_case"][stage], med["s_per_case"][stage]
            ratio = f"{p / m:.2f}x" if m > 0 else "-"
            lines.append(f"| {stage} | {p:.4f} | {plain['share'][stage]:.0%} | {m:.4f} | {med['share'][stage]:.0%} | "
                         f"{ratio} |")
        p, m = plain["total_s_per_case"], med["total_s_per_case"]
        lines += [f"| **total** | **{p:.4f}** | 100% | **{m:.4f}** | 100% | **{p / m:.2f}x** |", "",
                  f"Model load (once): plain {plain['load_s']:.2f} s, medseg {med['load_s']:.2f} s; first case "
                  f"(warm-up, left out of the means): plain {plain['first_case_s']:.3f} s, medseg "
                  f"{med['first_case_s']:.3f} s; median case: plain {plain['case_median_s']:.4f} s, medseg "
                  f"{med['case_median_s']:.4f} s ({plain['case_median_s'] / med['case_median_s']:.2f}x). medseg's "
                  f"masks: sha256 {summary['mask_digest'][:16]}, its report's values: sha256 "
                  f"{summary['values_digest'][:16]}.", ""]
    return lines


def write_results(out: Path, label: str, result: dict[str, Any]) -> None:
    """``predict_stages.json`` / ``.md`` in ``out``, keeping the runs of other labels already there."""
    path = out / "predict_stages.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}
    report["runs"][label] = result
    report["stages"] = {"case": list(CASE_STAGES), "all": list(STAGES)}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = ["Seconds per case in each stage of folder inference: plain MONAI's tutorial loop against medseg's "
             "predict path on the same held-out MSD hippocampus scans (`python benchmarks/profile_predict.py`; "
             "stages as its docstring defines them). Means over the cases after the first; ratio > 1: medseg "
             "spends less.", ""]
    for name, run in report["runs"].items():
        lines += table(name, run)
    if len(report["runs"]) > 1:
        outputs = {name: {(t["mask_digest"], t["values_digest"]) for t in run["threads"].values()}
                   for name, run in report["runs"].items()}
        same = len(set().union(*outputs.values())) == 1
        lines.append(f"medseg's masks and report values in the runs {', '.join(outputs)}: "
                     + ("bitwise the same (equal SHA-256 digests)." if same else "**not the same**: "
                        + "; ".join(f"{n}: {sorted(d)}" for n, d in outputs.items())))
        lines.append("")
    (out / "predict_stages.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=52)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--hippocampus-model", help="a trained hippocampus model (URI or folder)")
    parser.add_argument("--tracking-uri", help="the MLflow store of --hippocampus-model's URI")
    parser.add_argument("--train-minutes", type=float, help="train configs/msd_hippocampus.yaml this long first")
    parser.add_argument("--label", default="current", help="the name of this run in the results (before, after...)")
    add_tiny_arguments(parser)
    parser.add_argument("--worker", choices=PATHS)
    parser.add_argument("--model")
    parser.add_argument("--input")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.tiny:
        args.repeats, args.cases, args.threads = 1, min(args.cases, 2), "1"
    out = results_folder(args)
    work = scratch_folder("profile_predict_", args, out)
    load_before = list(os.getloadavg())
    if args.hippocampus_model:
        model, tracking = args.hippocampus_model, args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
        described = f"model {args.hippocampus_model}"
    elif args.train_minutes:
        model, tracking = _train_model(work, args.train_minutes)
        described = f"configs/msd_hippocampus.yaml trained {args.train_minutes:g} min in this run"
        print(f"trained: --hippocampus-model {model} --tracking-uri {tracking} reuses it", flush=True)
    else:
        model, tracking = log_fresh_model(work, REPO / "configs" / "msd_hippocampus.yaml",
                                          TINY_NETWORK if args.tiny else []), f"sqlite:///{work / 'mlflow.db'}"
        described = "freshly initialised configs/msd_hippocampus.yaml network" + (" (tiny)" if args.tiny else "")
    inputs = work / "in"
    link_hippocampus_test_cases(inputs, args.cases)
    threads = [int(t) for t in args.threads.split(",")]
    started = time.perf_counter()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for count in threads:
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        for repeat in range(args.repeats):
            for path in PATHS if repeat % 2 == 0 else tuple(reversed(PATHS)):
                result = _run_child(args, path, count, model, tracking, inputs, work / f"out_{path}_{count}")
                runs[path].append(result)
                print(f"{count} thread(s) repeat {repeat + 1} {path}: {result['wall_s']:.1f} s", flush=True)
        raw[str(count)] = runs
    digests = {(r["mask_digest"], r["values_digest"]) for runs in raw.values() for r in runs["medseg"]}
    summaries = {t: {**{p: summarise(runs[p]) for p in PATHS}, "mask_digest": sorted(digests)[0][0],
                     "values_digest": sorted(digests)[0][1]} for t, runs in raw.items()}
    import platform

    import torch

    result = {"commit": _commit(), "model": described, "model_uri": model, "tracking_uri": tracking, "cases": args.cases, "repeats": args.repeats,
              "threads": summaries, "masks_equal_across_runs": len(digests) == 1,
              "load_before": load_before, "load_after": list(os.getloadavg()),
              "seconds": time.perf_counter() - started,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "raw": raw}
    write_results(out, args.label, result)
    print((out / "predict_stages.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
