"""Where the memory of one bounded (slab by slab) segmentation prediction goes, stage by stage.

One child process predicts bench_memory.py's ct300 scan (a 512x512x300 int16 CT, 3 classes, lean U-Net
8-16-32-64, patch 96x96x64, the default backend) with ``MEDSEG_PREDICT_SCORES=bounded``. A thread reads
the process's ``VmRSS`` (with ``RssAnon`` and ``RssFile``) from ``/proc/self/status`` every 5 ms;
markers around the imports, the model's loading, each transform of the preprocessing chain, the sweep
(its first slab and the rest), the inversion and the writing name the stage each sample falls in.
Per stage it records the resident memory as the stage starts and the highest sample inside it;
``VmHWM`` is the whole process's peak. (tracemalloc sees only Python's own allocations, not torch's.)

Usage: python benchmarks/profile_memory.py [--out benchmarks/results] [--tiny]
Writes memory_stages.json and memory_stages.md. ``--tiny``: a 45x38x29 scan, patch 16, U-Net 4-32.
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
    for name in ("--worker-model", "--tracking-uri", "--input", "--output"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    if args.worker_model:
        args.model = args.worker_model
        _worker(args)
        return
    import bench_memory

    out = results_folder(args)
    work = scratch_folder("profile_memory_", args, out)
    shape, spacing = bench_memory.TINY_CT if args.tiny else ((512, 512, 300), (0.7, 0.7, 1.5))
    (work / "in").mkdir()
    bench_memory._make_ct(work / "in" / "ct.nii.gz", shape, spacing)
    patch = bench_memory.TINY_PATCH if args.tiny else "96,96,64"
    model = bench_memory._log_model(work, [f"patch.size=[{patch}]", *bench_memory.CT_MODEL,
                                           *(bench_memory.TINY_NETWORK if args.tiny else [])], "ct300")
    done = subprocess.run([sys.executable, __file__, "--worker-model", model, "--tracking-uri",
                           f"sqlite:///{work / 'mlflow.db'}", "--input", str(work / "in"), "--output", str(work / "out")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(shape=list(shape), patch=patch, command="python benchmarks/profile_memory.py"
                  + (" --tiny" if args.tiny else ""), host="a shared 2-core host: other sessions' jobs ran beside this one")
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_stages.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "memory_stages.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"Bounded prediction of a {'x'.join(map(str, result['shape']))} CT (3 classes, patch "
             f"{result['patch'].replace(',', 'x')}, backend {result['backend']}): {result['seconds']:.0f} s, "
             f"peak RSS (VmHWM, whole process) {result['vm_hwm_mib']} MiB.", "",
             "| stage | RSS at its start (MiB) | anonymous | file-backed | highest sample in it (MiB) |",
             "|---|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['rss_at_start_mib']} | {s['anon_mib']} | {s['file_mib']} | "
                     f"{s['peak_in_stage_mib']} |")
    lines += ["", f"Written by `{result['command']}` (OMP_NUM_THREADS=1) on {result['host']}. A stage runs from its "
              "row to the next; 'highest sample' is the highest VmRSS read every 5 ms inside it."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
