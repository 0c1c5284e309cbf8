"""benchmarks/ab_bench.py reads each bench's perf.md into comparable figures (a known table, known answers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ab_bench  # noqa: E402

TABLE = """| workload | plain MONAI | medseg | medseg / plain |
|---|---|---|---|
| W1 data pipeline vs `Dataset` (patches/s, first / later epochs) | 7.65 / 10.15 | 10.08 / 91.61 | 1.32x / **9.03x** |
| W2 training step (samples/s; GFLOP/s, % of 83 peak) | 1.04; 32, 38% | 1.19; 36, 44% | **1.15x** |
| W2 training step (bf16 autocast) | - | - | not run: --no-bf16 |
| W3 sliding window ct192 (192x192x128) (s/volume; peak RSS GiB; Dice vs plain fp32) | 6.3; 1.1 | 4.5; 1.1; 1.0000 | **1.40x** |
| W4 hippocampus training epoch (s, later epochs) | 43.3 | 20.0 | **2.17x** |
| W4 folder inference, 20 hippocampus scans, torch (scans/min) | 704 | 697 | **0.99x** |
"""


def test_ratios_and_medseg_speeds_come_out_of_a_perf_table() -> None:
    ratios = ab_bench.ratios(TABLE)
    speeds = ab_bench.medseg_figures(TABLE)

    assert set(ratios) == set(speeds) == {
        "W1 data pipeline vs `Dataset` (patches/s, first / later epochs)", "W2 training step (samples/s; GFLOP/s)",
        "W3 sliding window ct192 (192x192x128) (s/volume; peak RSS GiB; Dice vs plain fp32)",
        "W4 hippocampus training epoch (s, later epochs)", "W4 folder inference, 20 hippocampus scans, torch (scans/min)"}
    assert ratios["W1 data pipeline vs `Dataset` (patches/s, first / later epochs)"] == 9.03  # the later epochs'
    assert speeds["W1 data pipeline vs `Dataset` (patches/s, first / later epochs)"] == 91.61
    assert speeds["W2 training step (samples/s; GFLOP/s)"] == 1.19
    assert speeds["W3 sliding window ct192 (192x192x128) (s/volume; peak RSS GiB; Dice vs plain fp32)"] == \
        pytest.approx(1 / 4.5)  # seconds become a speed
    assert speeds["W4 hippocampus training epoch (s, later epochs)"] == pytest.approx(0.05)


def test_the_change_compares_medians_and_is_positive_when_after_is_faster() -> None:
    before = [ab_bench.figures(TABLE), ab_bench.figures(TABLE.replace("| 20.0 |", "| 25.0 |"))]
    after = [ab_bench.figures(TABLE.replace("| 20.0 |", "| 18.0 |"))] * 2

    rows = {r["workload"]: r for r in ab_bench.compare(before, after)}

    epoch = rows["W4 hippocampus training epoch (s, later epochs)"]["medseg"]
    assert epoch["before"] == pytest.approx([1 / 20, 1 / 25]) and epoch["change"] == pytest.approx(
        (1 / 18) / ((1 / 20 + 1 / 25) / 2) - 1)
    assert rows["W2 training step (samples/s; GFLOP/s)"]["ratio"]["change"] == 0
