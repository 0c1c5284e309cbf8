"""The probe's step time on a CPU that other work is crowding: the fastest wall time, said to be
crowded when the process never had its cores, so the planner keeps the default layout and precision."""

from __future__ import annotations

import pytest
import torch

from medseg.planning.probe import BUSY_CPU_SHARE, ProbeResult, _step_seconds, crowded, crowded_probe_notes

CPU = torch.device("cpu")


@pytest.fixture
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_quiet_machine_keeps_the_fastest_wall_time(two_threads: object) -> None:
    # (wall s, loss, CPU s): both threads busy ~90 % of each step
    steps = [(0.020, 1.0, 0.036), (0.018, 1.0, 0.033), (0.025, 1.0, 0.045)]

    seconds, note = _step_seconds(steps, CPU)

    assert seconds == 0.018 and note == ""


def test_a_crowded_machine_is_said_and_its_timings_choose_nothing(two_threads: object) -> None:
    # the same work (~0.034 CPU s) while other processes held the cores: 3-6x the wall time
    steps = [(0.110, 1.0, 0.036), (0.060, 1.0, 0.034), (0.140, 1.0, 0.035)]

    seconds, note = _step_seconds(steps, CPU)
    result = ProbeResult("lean U-Net", "bf16", True, seconds, None, note=note)

    assert seconds == 0.060 and note.startswith("machine busy") and "16%" in note  # the median step's share
    assert crowded(result)
    assert "Plan again when the machine is quiet" in crowded_probe_notes([result])[0]
    assert crowded_probe_notes([ProbeResult("lean U-Net", "fp32", True, 0.018, None)]) == []


def test_the_busy_threshold_is_a_median_so_one_interrupted_step_does_not_count(two_threads: object) -> None:
    quiet, interrupted = (0.018, 1.0, 0.033), (0.200, 1.0, 0.034)
    assert 0.033 / (0.018 * 2) >= BUSY_CPU_SHARE

    seconds, note = _step_seconds([quiet, interrupted, quiet], CPU)

    assert seconds == 0.018 and note == ""


def test_a_gpu_step_is_its_wall_time() -> None:
    steps = [(0.110, 1.0, 0.001), (0.090, 1.0, 0.001)]

    assert _step_seconds(steps, torch.device("cuda")) == (0.090, "")
