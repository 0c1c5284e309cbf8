"""The benchmarks read each other's files: a change of shape in one must not break another unseen
(`make bench` once failed after 14 minutes on a KeyError in bench_perf reading bench_predict's JSON)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

from tests.conftest import REPO


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_perf_reads_the_folder_inference_rows_bench_predict_writes() -> None:
    predicted = json.loads((REPO / "benchmarks" / "results" / "predict.json").read_text())
    rows = _bench("bench_perf")._folder_inference_rows(predicted)

    hippocampus = [r for r in predicted["rows"] if r["workload"] == "hippocampus" and r["path"] != "monai"]
    assert len(rows) == len(hippocampus) >= 1
    for row, source in zip(rows, hippocampus):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and cells[3] == f"**{source['vs_plain_monai']:.2f}x**"
