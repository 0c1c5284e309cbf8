"""Seeding and determinism switches of medseg/engine/runtime.py."""

from __future__ import annotations

import torch

from medseg.engine.runtime import seed_everything


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
