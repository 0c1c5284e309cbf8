"""The loop's speed choices: which loader, optimiser, memory order and device the data take."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medseg.config import CacheMode, OptimConfig, Task
from medseg.data.datasets import DeviceCache, cached_bytes
from medseg.errors import UsageError
from medseg.engine.loop import augment_on_device, loader_workers, make_optimizer
from medseg.engine.runtime import to_channels_last, use_channels_last


def _cfg(cache=CacheMode.MEMORY, on_device=None, workers=None, task=Task.SEGMENTATION):
    return SimpleNamespace(task=task, data=SimpleNamespace(cache=cache, augment_on_device=on_device),
                           train=SimpleNamespace(num_workers=workers))


def test_cached_data_load_in_process_and_uncached_data_in_workers() -> None:
    assert loader_workers(_cfg()) == 0
    assert loader_workers(_cfg(cache=CacheMode.DISK)) == 0
    assert loader_workers(_cfg(cache=CacheMode.NONE)) == 2
    assert loader_workers(_cfg(workers=3)) == 3


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
