"""benchmarks/time_suite.py's record: the load sampled during a run and a row's note reach the page."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO


def _time_suite():
    spec = importlib.util.spec_from_file_location("time_suite", REPO / "benchmarks" / "time_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_show_the_load_during_a_run_and_their_notes(tmp_path: Path) -> None:
    time_suite = _time_suite()
    old = {"date": "2026-01-01 10:00", "commit": "a" * 40, "exit_code": 0, "seconds": 1200.0, "load_before": 0.1,
           "load_after": 2.0, "summary": "10 passed in 1190.00s"}  # recorded before the sampler existed
    new = {**old, "date": "2026-01-02 10:00", "commit": "b" * 40, "exit_code": 2, "seconds": 1500.0,
           "load_during": [2.0, 8.5, 3.5], "summary": "1 failed, 9 passed in 1490.00s", "note": "a benchmark ran"}
    time_suite._write(tmp_path, old)
    time_suite._write(tmp_path, new)
    assert [r["commit"][0] for r in json.loads((tmp_path / "test_time.json").read_text())["runs"]] == ["a", "b"]
    page = (tmp_path / "test_time.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| 2026")]
    assert rows[0].split("|")[6].strip() == "-"  # no samples: nothing is made up
    assert rows[1].split("|")[4:7] == [" 25.0 ", " 0.1 -> 2.0 ", " 4.7, 8.5 "]  # minutes; before -> after; mean, max
    assert "- 2026-01-02 10:00 (`bbbbbbbbbb`): a benchmark ran" in page
    assert "(`aaaaaaaaaa`)" not in page  # a row without a note has no note line


def test_the_sampler_reads_the_load_until_it_is_told_to_stop(monkeypatch) -> None:
    time_suite = _time_suite()
    monkeypatch.setattr(time_suite, "LOAD_SAMPLE_S", 0.01)
    sampler = time_suite.LoadSampler()
    sampler.start()
    while len(sampler.samples) < 3:
        sampler.done.wait(0.01)
    sampler.done.set()
    sampler.join(timeout=5)
    assert not sampler.is_alive() and all(load >= 0 for load in sampler.samples)
