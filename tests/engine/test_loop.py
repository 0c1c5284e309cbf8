"""The loop's choices (loader, optimiser, memory order, the device the data take) and its saved state."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from medseg.config import CacheMode, OptimConfig
from medseg.data.datasets import DeviceCache, cached_bytes
from medseg.engine.loop import LoopState, _restate_position, augment_on_device, loader_workers, make_optimizer
from medseg.engine.runtime import to_channels_last, use_channels_last
from medseg.errors import UsageError


def _cfg(cache=CacheMode.MEMORY, on_device=None, workers=None, batch_size=1):
    return SimpleNamespace(data=SimpleNamespace(cache=cache, augment_on_device=on_device),
                           train=SimpleNamespace(num_workers=workers, batch_size=batch_size))


def test_cached_data_load_in_process_and_uncached_data_in_workers() -> None:
    assert loader_workers(_cfg()) == 0
    assert loader_workers(_cfg(cache=CacheMode.DISK)) == 0
    assert loader_workers(_cfg(cache=CacheMode.NONE)) == 2
    assert loader_workers(_cfg(workers=3)) == 3


def test_a_task_default_for_loader_workers_yields_to_the_config() -> None:
    assert loader_workers(_cfg(), task_default=2) == 2  # reconstruction simulates each measurement per sample
    assert loader_workers(_cfg(workers=0), task_default=2) == 0


def test_augmentation_stays_on_the_cpu_without_a_gpu_and_asking_for_it_says_why() -> None:
    data = [{"image": torch.zeros(1, 4, 4, 4)}]
    assert not augment_on_device(_cfg(), torch.device("cpu"), 0, data)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        augment_on_device(_cfg(on_device=True), torch.device("cpu"), 0, data)


def test_device_cache_moves_each_item_once_and_keeps_other_values() -> None:
    base = [{"image": torch.ones(1, 3, 3, 3), "label": torch.zeros(1, 3, 3, 3, dtype=torch.uint8), "case_id": "a"}]
    cache = DeviceCache(base, torch.device("cpu"))
    first = cache[0]
    assert cache[0] is first and first["case_id"] == "a"
    assert torch.equal(first["image"], base[0]["image"])
    assert cached_bytes(base) == 27 * 4 + 27


def test_optimisers_are_fused_and_equal_the_per_tensor_loop() -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Conv3d(2, 3, 3), torch.nn.Conv3d(2, 3, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = SimpleNamespace(optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=1e-3))
    fused = make_optimizer(cfg, nets[0])
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=1e-3)
    x = torch.randn(2, 2, 5, 6, 7)
    for _ in range(3):
        for net, opt in zip(nets, (fused, loop), strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_channels_last_is_the_3d_default_and_changes_layout_not_values() -> None:
    assert use_channels_last(None, 3) and not use_channels_last(None, 2) and not use_channels_last(False, 3)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.PReLU())
    x = torch.randn(2, 1, 9, 10, 11)
    expected = net(x)
    fast = to_channels_last(net, 3)
    got = fast(to_channels_last(x, 3))
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(got, expected, atol=1e-5)
    assert to_channels_last(torch.zeros(3), 3).shape == (3,)  # not a batch: left alone


def test_loop_state_round_trips_through_the_checkpoint_and_reads_old_checkpoints() -> None:
    state = LoopState(epoch=2, iteration=3, samples_done=6, partial_losses=[0.5, 0.25, 0.125], best_metric=0.75,
                      best_epoch=2, elapsed=12.5, history=[{"epoch": 1, "train/loss": 0.9}], stale_validations=1)
    assert LoopState.from_json(state.to_json(), saved_global_batch=2) == state
    assert LoopState.from_json(LoopState().to_json(), 1).best_metric == -math.inf
    # Written before samples_done existed: the position was iteration steps of the global batch then.
    old = {"epoch": 1, "iteration": 3, "partial_losses": [0.5] * 3, "best_metric": -math.inf, "best_epoch": -1,
           "elapsed": 4.0, "history": [], "stale_validations": 0}
    restored = LoopState.from_json(json.dumps(old), saved_global_batch=4)
    assert restored.samples_done == 12 and restored.iteration == 3 and not restored.stopped_early


def _restated(samples_done: int, epoch: int, batch: int, world: int, iterations: int, cache=CacheMode.DISK):
    state = LoopState(epoch=epoch, iteration=-1, samples_done=samples_done)
    budget = SimpleNamespace(step_count=-1)
    _restate_position(state, _cfg(cache=cache, batch_size=batch), SimpleNamespace(world_size=world),
                      SimpleNamespace(iterations=iterations), budget, saved_world=3 - world)
    return state, budget.step_count


def test_a_resumed_position_is_restated_in_the_steps_of_the_new_process_count(caplog) -> None:
    # 6 cases, batch 1. One process stopped after 3 of 6 steps (positions 0-2); two processes have
    # 3 steps of 2 per epoch: step 1 of them starts at position 3, the epoch ends after step 2.
    with caplog.at_level(logging.WARNING, logger="medseg.engine.loop"):
        state, step_count = _restated(samples_done=3, epoch=1, batch=1, world=2, iterations=3)
    assert (state.iteration, state.samples_done, step_count) == (1, 3, 1 * 3 + 1)
    # Two processes stopped after 2 of 3 steps (positions 0-3): one process continues at its step 4.
    with caplog.at_level(logging.WARNING, logger="medseg.engine.loop"):
        state, step_count = _restated(samples_done=4, epoch=1, batch=1, world=1, iterations=6)
    assert (state.iteration, state.samples_done, step_count) == (4, 4, 1 * 6 + 4)
    assert "will not match an uninterrupted one" in caplog.text
    assert "shards" not in caplog.text  # one shared stream: the very positions carry over


def test_resuming_a_memory_cache_with_another_process_count_warns_that_its_shards_change(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medseg.engine.loop"):
        _restated(samples_done=4, epoch=0, batch=1, world=1, iterations=6, cache=CacheMode.MEMORY)
    assert "the shards change with the process count" in caplog.text
