"""How long CI's command takes: ``bash .ci/run`` (= ``make test``: a fresh venv, the dev install, the
suite) on a clean clone of a commit, timed, with the machine's load beside it.

    python benchmarks/time_suite.py [--commit HEAD] [--out benchmarks/results]

writes ``test_time.{json,md}``: one row per run, appended, so the record shows the suite's time
across commits. The clone sits beside this checkout (the suite reads ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


#: Seconds between two readings of the load average while the suite runs.
LOAD_SAMPLE_S = 30


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``LOAD_SAMPLE_S`` while CI's command runs: the load before and after
    alone missed other work that ran in the middle of a run (one such run took 27 min instead of 20)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(LOAD_SAMPLE_S):
            self.samples.append(os.getloadavg()[0])


def _run_ci(commit: str, clone: Path, log: Path) -> tuple[int, float, str, list[float]]:
    """(exit code, seconds, pytest's summary line, the load averages sampled meanwhile) of ``bash .ci/run``
    on a clean clone of ``commit``."""
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    sampler = LoadSampler()
    sampler.start()
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(["bash", ".ci/run"], cwd=clone, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    sampler.done.set()
    summary = next((line.strip("= \n") for line in reversed(log.read_text(encoding="utf-8").splitlines())
                    if re.search(r"\d+ passed", line)), "")
    return code, seconds, summary, sampler.samples


def _write(out: Path, row: dict) -> None:
    path = out / "test_time.json"
    rows = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps({"runs": rows}, indent=1) + "\n", encoding="utf-8")
    lines = ["| date (UTC) | commit | exit | minutes | load before -> after (1 min) | load during: mean, max | suite |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['date']} | `{r['commit'][:10]}` | {r['exit_code']} | {r['seconds'] / 60:.1f} | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f} | {_during(r)} | {r['summary']} |" for r in rows]
    notes = [f"- {r['date']} (`{r['commit'][:10]}`): {r['note']}" for r in rows if r.get("note")]
    lines += ["", "`python benchmarks/time_suite.py` runs `bash .ci/run` (CI's command: `make test`, a fresh venv, "
              "the dev install and the suite) on a clean clone of the commit and times it whole. Machine: "
              f"{platform.platform()}, {os.cpu_count()} CPUs. A run's load is the suite's own (two xdist "
              "workers and the processes its tests start) plus whatever else ran: compare the times of rows whose "
              f"load during is alike, and read the notes. Load during: the 1-minute load "
              f"average read every {LOAD_SAMPLE_S} s while the command ran (rows before it was recorded: -)."]
    lines += ["", "Notes on rows:", *notes] if notes else []
    (out / "test_time.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _during(row: dict) -> str:
    samples = row.get("load_during")
    return f"{sum(samples) / len(samples):.1f}, {max(samples):.1f}" if samples else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--note", help="what else ran on the machine meanwhile, kept with the row")
    parser.add_argument("--clone", type=Path, default=REPO.parent / "medseg-time-suite")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.commit], capture_output=True, text=True,
                            check=True).stdout.strip()
    load_before = os.getloadavg()[0]
    log = args.clone.parent / "medseg-time-suite.log"  # kept where a failing run can be read
    code, seconds, summary, during = _run_ci(commit, args.clone, log)
    row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": commit, "exit_code": code,
           "seconds": round(seconds, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
           "load_during": [round(load, 2) for load in during], "summary": summary,
           **({"note": args.note} if args.note else {})}
    _write(args.out, row)
    print(f"bash .ci/run on {commit[:10]}: exit {code} in {seconds / 60:.1f} min ({summary}); log: {log}")
    return code


if __name__ == "__main__":
    sys.exit(main())
