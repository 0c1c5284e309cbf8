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
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_ci(commit: str, clone: Path, log: Path) -> tuple[int, float, str]:
    """(exit code, seconds, pytest's summary line) of ``bash .ci/run`` on a clean clone of ``commit``."""
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(["bash", ".ci/run"], cwd=clone, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    summary = next((line.strip("= \n") for line in reversed(log.read_text(encoding="utf-8").splitlines())
                    if re.search(r"\d+ passed", line)), "")
    return code, seconds, summary


def _write(out: Path, row: dict) -> None:
    path = out / "test_time.json"
    rows = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps({"runs": rows}, indent=1) + "\n", encoding="utf-8")
    lines = ["| date (UTC) | commit | exit | minutes | load before -> after (1 min) | suite |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['date']} | `{r['commit'][:10]}` | {r['exit_code']} | {r['seconds'] / 60:.1f} | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f} | {r['summary']} |" for r in rows]
    lines += ["", "`python benchmarks/time_suite.py` runs `bash .ci/run` (CI's command: `make test`, a fresh venv, "
              "the dev install and the suite) on a clean clone of the commit and times it whole. Machine: "
              f"{platform.platform()}, {os.cpu_count()} CPUs. A load above the CPU count before or after means "
              "other work shared the machine and the time is longer than an idle machine's."]
    (out / "test_time.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--clone", type=Path, default=REPO.parent / "medseg-time-suite")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.commit], capture_output=True, text=True,
                            check=True).stdout.strip()
    load_before = os.getloadavg()[0]
    log = args.clone.parent / "medseg-time-suite.log"  # kept where a failing run can be read
    code, seconds, summary = _run_ci(commit, args.clone, log)
    row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": commit, "exit_code": code,
           "seconds": round(seconds, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
           "summary": summary}
    _write(args.out, row)
    print(f"bash .ci/run on {commit[:10]}: exit {code} in {seconds / 60:.1f} min ({summary}); log: {log}")
    return code


if __name__ == "__main__":
    sys.exit(main())
