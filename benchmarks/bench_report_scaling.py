"""How the batch report's cost grows with the number of cases: ``predict_folder`` with a
predictor that does no work, so that what is timed is the driver's own bookkeeping (the
per-case report rows, the final ``predictions.csv``, ``qc_summary.json``, ``review.html`` and
``predict_summary.json``).

Each size runs in a child process of its own (``--one N``), which prints one JSON line: the
seconds of ``predict_folder``, the bytes written into ``predictions.csv`` (every append and
every whole-file write counted) and the number of whole-file writes of it. The parent collects
the sizes into ``benchmarks/results/predict_report_scaling.json`` and ``.md`` (merging with
what is there, keyed by ``--label``, so a "before" and an "after" sit side by side).

Usage:
    python benchmarks/bench_report_scaling.py --sizes 1000 4000 20000 --label after
    python benchmarks/bench_report_scaling.py --sizes 1000 4000 20000 --label before --timeout 600
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _one(n: int) -> dict[str, Any]:
    """Child: predict ``n`` cases with a do-nothing predictor; count what went into the report."""
    import builtins

    import torch

    from medseg.engine import predict as driver
    from medseg.engine.model_loading import LoadedModel
    from medseg.engine.predict import predict_folder
    from medseg.engine.results import CaseResult, PredictOptions
    from medseg.io.discovery import Discovery, InputCase

    class NoWork:
        output_columns = ()
        value_columns = ("value", "qc_flag", "qc_reason")

        def expected_outputs(self, case: Any, output_dir: Path) -> dict[str, Path]:
            return {}

        def predict_case(self, case: Any, output_dir: Path) -> CaseResult:
            return CaseResult(case.case_id, str(case.path), "ok", values={"value": 0.5, "qc_flag": False, "qc_reason": ""})

        def values_of_finished(self, case: Any, outputs: dict[str, Path]) -> dict[str, Any]:
            return {}

        def summarise(self, results: Any) -> tuple[dict[str, Any], dict[str, float]]:
            return {}, {}

    counts = {"bytes": 0, "whole_writes": 0}
    real_open, real_write_text = builtins.open, Path.write_text

    def counting_write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if "predictions" in self.name:
            counts["bytes"] += len(data.encode())
            counts["whole_writes"] += 1
        return real_write_text(self, data, *args, **kwargs)

    class Counted:
        def __init__(self, handle: Any):
            self._handle = handle

        def write(self, data: str) -> int:
            counts["bytes"] += len(data.encode())
            return int(self._handle.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: Any) -> None:
            self._handle.close()

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if "predictions" in os.fspath(file) if isinstance(file, (str, os.PathLike)) else False:
            if any(m in mode for m in "wa"):
                return Counted(handle)
        return handle

    Path.write_text = counting_write_text  # type: ignore[method-assign]
    builtins.open = counting_open
    with tempfile.TemporaryDirectory() as tmp:
        cases = [InputCase(f"case_{i:06d}", Path(tmp) / "in" / f"case_{i:06d}.nii.gz", "file") for i in range(n)]
        model = LoadedModel((), {"task": "bench"}, ("bench",), (None,), weights_sha256=("0" * 64,))
        started = time.perf_counter()
        report = predict_folder(NoWork(), model, Path(tmp) / "in", Path(tmp) / "out",  # type: ignore[arg-type]
                                PredictOptions(progress=False), torch.device("cpu"),
                                found=Discovery(cases=cases))
        seconds = time.perf_counter() - started
        rows = len(report.report.read_text().splitlines()) - 1
    Path.write_text = real_write_text  # type: ignore[method-assign]
    builtins.open = real_open
    del driver
    return {"rows": n, "rows_in_report": rows, "seconds": round(seconds, 3),
            "report_bytes_written": counts["bytes"], "report_whole_file_writes": counts["whole_writes"]}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _render(record: dict[str, Any]) -> str:
    lines = ["# predict: report cost against the number of cases", "",
             "A do-nothing predictor, so the time is the batch driver's own bookkeeping (report rows, final",
             "predictions.csv, qc_summary.json, review.html, predict_summary.json). One child process per size.",
             "", "| label | rows | seconds | bytes written to predictions.csv | whole-file writes of it | "
                 "seconds / 1k rows |", "|---|---|---|---|---|---|"]
    for label, entry in record["runs"].items():
        for row in entry["sizes"]:
            if row.get("timed_out"):
                lines.append(f"| {label} | {row['rows']} | > {row['seconds']} (stopped) | | | |")
                continue
            per_k = row["seconds"] / row["rows"] * 1000
            lines.append(f"| {label} | {row['rows']} | {row['seconds']:.2f} | {row['report_bytes_written']:,} | "
                         f"{row['report_whole_file_writes']} | {per_k:.3f} |")
    lines.append("")
    for label, entry in record["runs"].items():
        lines.append(f"- {label}: `{entry['command']}` on {entry['date']}, commit {entry['commit']} "
                     f"({entry['note']}); {entry['machine']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 20000])
    parser.add_argument("--label", default="after")
    parser.add_argument("--note", default="working tree")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per size before it is stopped")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one)))
        return
    sizes = []
    for n in args.sizes:
        command = [sys.executable, __file__, "--one", str(n)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
            sizes.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            sizes.append({"rows": n, "seconds": round(time.perf_counter() - started, 1), "timed_out": True})
        print(json.dumps(sizes[-1]), flush=True)
    path = args.out / "predict_report_scaling.json"
    record = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    record["runs"][args.label] = {
        "command": " ".join(["python", "benchmarks/bench_report_scaling.py", *sys.argv[1:]]),
        "date": dt.date.today().isoformat(), "commit": _commit(), "note": args.note,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "sizes": sizes}
    path.write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "predict_report_scaling.md").write_text(_render(record))


if __name__ == "__main__":
    main()
