"""Seeding and determinism switches of medseg/engine/runtime.py."""

from __future__ import annotations

import os

import pytest
import torch

from medseg.engine.runtime import configure_threads, seed_everything


def test_a_non_deterministic_run_undoes_an_earlier_runs_demand_and_leaves_it_off_otherwise() -> None:
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        seed_everything(1, deterministic=False)  # already off: nothing to undo
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        a = torch.rand(3)
        seed_everything(1, deterministic=False)
        assert torch.equal(a, torch.rand(3))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize(("configured", "omp", "processes", "expected"), [
    (3, "1", 1, 3),  # the config's count wins
    (None, "1", 1, 1),  # else OMP_NUM_THREADS, as a user on a shared machine sets it
    (None, "2", 2, 2),
    (None, None, 1, "cores"),  # else the cores, shared between the processes here
    (None, None, 2, "half"),
    (None, "0", 1, "cores"),  # not a positive count: ignored, as OpenMP does
    (None, "two", 1, "cores"),
])
def test_threads_are_the_configured_count_else_omp_num_threads_else_the_cores_shared(
        configured, omp, processes, expected, monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        got = configure_threads(configured, processes)
    finally:
        torch.set_num_threads(before)
    assert got == {"cores": cores, "half": max(1, cores // 2)}.get(expected, expected)
