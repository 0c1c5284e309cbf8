"""Where the memory of one bounded (slab by slab) segmentation prediction goes, stage by stage.

One child process predicts bench_memory.py's ct300 scan (a 512x512x300 int16 CT, 3 classes, lean U-Net
8-16-32-64, patch 96x96x64, the default backend) with ``MEDSEG_PREDICT_SCORES=bounded``. A thread reads
the process's ``VmRSS`` (with ``RssAnon`` and ``RssFile``) from ``/proc/self/status`` every 5 ms;
markers around the imports, the model's loading, each transform of the preprocessing chain, the sweep
(its first slab and the rest), the inversion and the writing name the stage each sample falls in.
Per stage it records the resident memory as the stage starts and the highest sample inside it;
``VmHWM`` is the whole process's peak. (tracemalloc sees only Python's own allocations, not torch's.)

``--workload wb``: bench_memory.py's whole-body scan instead (512x512x``--depth`` int16, 0.8x0.8x1.5 mm,
an untrained 100-class head resampling to 1.5 mm, patch 96x96x64). Each workload's profile replaces its
own in the results and keeps the other's.

Usage: python benchmarks/profile_memory.py [--workload ct300|wb] [--depth 1000] [--out benchmarks/results] [--tiny]
Writes memory_stages.json and memory_stages.md. ``--tiny``: a 45x38x29 scan (``wb``: 37x33x50, 5 classes),
patch 16, U-Net 4-32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tiny import add_tiny_arguments, results_folder, scratch_folder

REPO = Path(__file__).resolve().parents[1]
#: The workloads, in the order memory_stages.md shows them.
TITLES = {"ct300": "ct300: a CT, 3 classes, no resampling", "wb": "wb: a whole-body CT, 100 classes, resampled"}


class StageSampler:
    """The stage now running, and per stage the resident memory at its start and its highest sample."""

    def __init__(self, interval_s: float = 0.005):
        self.stage = "python start"
        self.order: list[str] = []
        self.at_start: dict[str, dict[str, int]] = {}
        self.peak: dict[str, int] = {}
        self.mark(self.stage)
        threading.Thread(target=self._sample, args=(interval_s,), daemon=True).start()

    @staticmethod
    def status() -> dict[str, int]:
        """VmRSS, RssAnon, RssFile and VmHWM in MiB."""
        keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if line.startswith(keys)}

    def mark(self, stage: str) -> None:
        self.stage = stage
        if stage not in self.at_start:
            self.order.append(stage)
            self.at_start[stage] = self.status()
            self.peak[stage] = self.at_start[stage]["VmRSS"]

    def _sample(self, interval_s: float) -> None:
        while True:
            rss, stage = self.status()["VmRSS"], self.stage
            self.peak[stage] = max(self.peak.get(stage, 0), rss)
            time.sleep(interval_s)

    def around(self, owner: Any, name: str, stage: str) -> None:
        """Mark ``stage`` when ``owner.name`` is called and ``stage (after)`` when it returns."""
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def marked(*args: Any, **kwargs: Any) -> Any:
            self.mark(stage)
            try:
                return inner(*args, **kwargs)
            finally:
                self.mark(f"{stage} (after)")

        setattr(owner, name, marked)


def _hook_stages(sampler: StageSampler) -> None:
    """Markers in the preprocessing chain, the sweep and the writing (this process only)."""
    from monai.transforms import Compose

    import medseg.tasks.segmentation.bounded as bounded
    from medseg.tasks.segmentation import predict

    def chain(self: Compose, data: Any, *args: Any, **kwargs: Any) -> Any:
        for transform in self.transforms:
            sampler.mark(f"preprocess: {type(transform).__name__}")
            data = transform(data)
        sampler.mark("preprocess: done")
        return data

    Compose.__call__ = chain  # type: ignore[method-assign]
    streamed: Callable[..., Iterator[Any]] = bounded.stream_logits

    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, slab in enumerate(streamed(*args, **kwargs)):
            sampler.mark("sweep: later slabs" if i else "sweep: first slab out")
            yield slab

    bounded.stream_logits = stream  # type: ignore[assignment]
    sampler.around(predict, "sweep", "sweep: network and first slab")
    sampler.around(predict.SegmentationPredictor, "_invert_bounded", "inversion to the input's grid")
    sampler.around(predict.SlabResampler, "finish", "slab resampling done")
    sampler.around(predict, "write_nifti", "writing the mask")


def _worker(args: argparse.Namespace) -> None:
    sampler = StageSampler()
    import medseg
    from medseg.tasks.segmentation import predict  # noqa: F401  (the predictor's imports, counted here)

    sampler.mark("model loading")
    os.environ["MEDSEG_PREDICT_SCORES"] = "bounded"
    predictor = medseg.Predictor.from_uri(args.model, tracking_uri=args.tracking_uri)
    _hook_stages(sampler)
    started = time.perf_counter()
    batch = predictor.predict_folder(Path(args.input), Path(args.output), overwrite=True, progress=False, review=False)
    seconds = time.perf_counter() - started
    sampler.mark("done")
    time.sleep(0.02)
    if any(r.status != "ok" for r in batch.results):
        raise SystemExit(f"prediction failed: {[r.error for r in batch.results]}")
    stages = [{"stage": s, "rss_at_start_mib": sampler.at_start[s]["VmRSS"], "anon_mib": sampler.at_start[s]["RssAnon"],
               "file_mib": sampler.at_start[s]["RssFile"], "peak_in_stage_mib": sampler.peak[s]} for s in sampler.order]
    print(json.dumps({"seconds": seconds, "vm_hwm_mib": sampler.status()["VmHWM"], "stages": stages,
                      "backend": os.environ.get("MEDSEG_BACKEND", "auto")}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_arguments(parser)
    parser.add_argument("--workload", choices=["ct300", "wb"], default="ct300")
    parser.add_argument("--depth", type=int, default=1000, help="slices of the wb scan (512x512xDEPTH)")
    for name in ("--worker-model", "--tracking-uri", "--input", "--output"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    if args.worker_model:
        args.model = args.worker_model
        _worker(args)
        return
    out = results_folder(args)
    work = scratch_folder("profile_memory_", args, out)
    (work / "in").mkdir()
    shape, patch, classes, model = _workload(args, work)
    done = subprocess.run([sys.executable, __file__, "--worker-model", model, "--tracking-uri",
                           f"sqlite:///{work / 'mlflow.db'}", "--input", str(work / "in"), "--output", str(work / "out")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    result.update(shape=list(shape), patch=patch, classes=classes, workload=args.workload,
                  command=f"python benchmarks/profile_memory.py {shown}".strip(), load_average_at_end=[
                      round(x, 2) for x in os.getloadavg()],
                  host="a shared 2-core host: other sessions' jobs ran beside this one")
    out.mkdir(parents=True, exist_ok=True)
    saved = _saved(out / "memory_stages.json")
    saved[args.workload] = result  # the other workload's profile stays
    (out / "memory_stages.json").write_text(json.dumps({"workloads": saved}, indent=2) + "\n")
    (out / "memory_stages.md").write_text("\n".join(f"### {TITLES[w]}\n\n{markdown(saved[w])}" for w in TITLES
                                                    if w in saved))
    print(markdown(result))


def _saved(path: Path) -> dict[str, dict]:
    """The profiles memory_stages.json holds, by workload (a file written before workloads: ct300's alone)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return saved["workloads"] if "workloads" in saved else {"ct300": saved}


def _workload(args: argparse.Namespace, work: Path) -> tuple[tuple[int, ...], str, int, str]:
    """The scan (written to ``work``/in) and the model (logged in ``work``) of ``args.workload``:
    (shape, patch, classes, model URI)."""
    import bench_memory

    network = bench_memory.TINY_NETWORK if args.tiny else []
    patch = bench_memory.TINY_PATCH if args.tiny else "96,96,64"
    if args.workload == "ct300":
        shape, spacing = bench_memory.TINY_CT if args.tiny else ((512, 512, 300), (0.7, 0.7, 1.5))
        bench_memory._make_ct(work / "in" / "ct.nii.gz", shape, spacing)
        return shape, patch, 3, bench_memory._log_model(work, [f"patch.size=[{patch}]", *bench_memory.CT_MODEL,
                                                              *network], "ct300")
    shape, spacing = bench_memory.TINY_WB if args.tiny else ((512, 512, args.depth), (0.8, 0.8, 1.5))
    classes = bench_memory.TINY_WB_CLASSES if args.tiny else 100
    bench_memory._make_ct(work / "in" / "wb.nii.gz", shape, spacing)
    labels = "{" + ", ".join(f"{i}: c{i}" for i in range(classes)) + "}"
    return shape, patch, classes, bench_memory._log_model(
        work, [f"patch.size=[{patch}]", *bench_memory.CT_MODEL, f"data.labels={labels}",
               "preprocess.spacing=[1.5,1.5,1.5]", *network], "wb")


def markdown(result: dict) -> str:
    lines = [f"Bounded prediction of a {'x'.join(map(str, result['shape']))} CT ({result.get('classes', 3)} "
             f"classes{', resampled to 1.5 mm' if result.get('workload') == 'wb' else ''}, patch "
             f"{result['patch'].replace(',', 'x')}, backend {result['backend']}): {result['seconds']:.0f} s, "
             f"peak RSS (VmHWM, whole process) {result['vm_hwm_mib']} MiB.", "",
             "| stage | RSS at its start (MiB) | anonymous | file-backed | highest sample in it (MiB) |",
             "|---|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['rss_at_start_mib']} | {s['anon_mib']} | {s['file_mib']} | "
                     f"{s['peak_in_stage_mib']} |")
    load = "/".join(f"{x:.1f}" for x in result.get("load_average_at_end", []))
    host = result["host"] + (f" (load average {load}, 1/5/15 min, at its end)" if load else "")
    lines += ["", f"Written by `{result['command']}` (OMP_NUM_THREADS=1) on {host}. A stage runs from its "
              "row to the next; 'highest sample' is the highest VmRSS read every 5 ms inside it."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
