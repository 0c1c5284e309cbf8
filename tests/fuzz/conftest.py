"""The fuzz suite's tally: printed after the run, and written as a report by ``make fuzz``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.hostile import TALLY, with_memory_limit, write_report

#: ``make fuzz`` sets this to benchmarks/results/fuzz.json.
REPORT_ENV = "MEDSEG_FUZZ_REPORT"


@pytest.fixture(autouse=True)
def _machine_with_little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers that claim more than half of 512 MiB must be refused before anything is allocated."""
    for key, value in with_memory_limit().items():
        monkeypatch.setenv(key, value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.total:
        return
    terminalreporter.write_line(f"fuzz: {TALLY.total} hostile inputs tried, {len(TALLY.escapes)} escapes "
                                f"({len({k for k, _ in TALLY.outcomes})} classes)")
    report = os.environ.get(REPORT_ENV)
    if report:
        write_report(Path(report))
        terminalreporter.write_line(f"fuzz: report written to {report} and {Path(report).with_suffix('.md')}")
