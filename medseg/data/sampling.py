"""The training sample stream: which case and which augmentation at every position of an epoch.

Position ``j`` of epoch ``e`` always holds the same case with the same augmentation, drawn
from seeds derived from ``(seed, e, j)`` alone. Nothing depends on how many processes or
loader workers share the stream, or on where a run was interrupted:

* with ``W`` processes of batch ``B``, process ``r`` takes positions ``r, r+W, r+2W, ...``, so
  global batch ``k`` is positions ``[k·B·W, (k+1)·B·W)`` whatever ``W`` is, and gradients
  averaged by DDP equal those of one process with batch ``B·W``;
* a resumed run starts at the first position it had not trained on and sees exactly what an
  uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.transforms.traits import MultiSampleTrait
from torch.utils.data import Dataset


def stream_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (NumPy ``SeedSequence``), for any number of parts."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def epoch_order(n_items: int, length: int, seed: int, epoch: int) -> list[int]:
    """Case indices for ``length`` positions: seeded shuffles of ``range(n_items)``, back to back."""
    if n_items < 1:
        raise ValueError("epoch_order: no items to sample from")
    order: list[int] = []
    round_ = 0
    while len(order) < length:
        generator = torch.Generator().manual_seed(stream_seed(seed, epoch, round_, 0x5EED))
        order.extend(torch.randperm(n_items, generator=generator).tolist())
        round_ += 1
    return order[:length]


def split_transforms(transform: Compose) -> tuple[Compose, Compose | None]:
    """``(deterministic prefix, random rest)`` of a chain: the prefix is what caching datasets store."""
    first_random = next((i for i, t in enumerate(transform.transforms) if isinstance(t, Randomizable)), None)
    if first_random is None:
        return transform, None
    return Compose(transform.transforms[:first_random]), Compose(transform.transforms[first_random:])


class EpochSamples(Dataset):
    """One process's share of one epoch: ``positions`` of the stream, each augmented from its own seed.

    Args:
        base: dataset of preprocessed cases (cached or not), indexed by case.
        augment: the random part of the chain (patch sampling, augmentation), or None.
        order: case index per stream position (:func:`epoch_order`).
        positions: the stream positions this process trains on, in order.
        seed: the run's seed.
        epoch: 0-based epoch.
    """

    def __init__(self, base: Any, augment: Compose | None, order: Sequence[int], positions: Sequence[int],
                 seed: int, epoch: int):
        self.base = base
        self.augment = augment
        self.order = order
        self.positions = list(positions)
        self.seed = seed
        self.epoch = epoch
        # A patch sampler first takes views of the cached volume and every later transform makes
        # new tensors, so the cache is never written and the copy CacheDataset would make of the
        # whole volume (per sample) is not needed; any other chain augments a deep copy.
        first = augment.transforms[0] if augment is not None and augment.transforms else None
        self.copy_item = not isinstance(first, MultiSampleTrait)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Any:
        position = self.positions[index]
        # The cache must stay pristine for the next epoch (tests/data/test_sampling.py checks it).
        item = self.base[self.order[position]]
        item = copy.deepcopy(item) if self.copy_item else dict(item)
        if self.augment is None:
            return item
        self.augment.set_random_state(seed=stream_seed(self.seed, self.epoch, position))
        return self.augment(item)


def process_positions(iterations: int, batch_size: int, world_size: int, rank: int,
                      start_iteration: int = 0) -> tuple[int, range]:
    """Stream length of an epoch and the positions of process ``rank`` from ``start_iteration`` on."""
    global_batch = batch_size * world_size
    length = iterations * global_batch
    return length, range(start_iteration * global_batch + rank, length, world_size)
