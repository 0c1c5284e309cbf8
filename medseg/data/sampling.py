"""The training sample stream: which case and which augmentation at every position of an epoch.

Position ``j`` of epoch ``e`` always holds the same case with the same augmentation, drawn
from seeds derived from ``(seed, e, j)`` alone. Nothing depends on how many processes or
loader workers share the stream, or on where a run was interrupted:

* with ``W`` processes of batch ``B``, process ``r`` takes positions ``r, r+W, r+2W, ...``, so
  global batch ``k`` is positions ``[k·B·W, (k+1)·B·W)`` whatever ``W`` is, and gradients
  averaged by DDP equal those of one process with batch ``B·W``;
* a resumed run starts at the first position it had not trained on and sees exactly what an
  uninterrupted run would have seen; resumed with another number of processes, it still trains
  every remaining position once (:func:`process_positions`), in other global batches.
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


def remaining_steps(iterations: int, global_batch: int, samples_done: int) -> int:
    """Steps left in an epoch of ``iterations`` steps of ``global_batch`` positions whose first
    ``samples_done`` positions are trained: enough whole steps to reach the epoch's end, 0 past it."""
    length = iterations * global_batch
    return max(0, -(-(length - samples_done) // global_batch))


def process_positions(iterations: int, batch_size: int, world_size: int, rank: int,
                      samples_done: int = 0) -> tuple[int, range]:
    """The stream length an epoch reaches and the positions of process ``rank`` after ``samples_done``.

    The positions left are trained in whole global batches from ``samples_done`` on: global
    batch ``k`` of what remains is ``[samples_done + k·B·W, samples_done + (k+1)·B·W)``, whatever
    ``samples_done`` is. A run resumed with another number of processes (another global batch)
    therefore starts at the first position not yet trained, whether or not that falls on a
    boundary of its own steps. Where the positions left are not a whole number of its steps, the
    last step runs on past the epoch's length into positions this epoch has not trained: a
    shorter step would leave some processes without a sample, and DDP cannot step a process that
    has none. No position is trained twice or left out; such an epoch trains up to ``B·W - B``
    positions more (a full epoch's length is rounded to whole steps anyway).

    Args:
        iterations: steps of a whole epoch.
        batch_size: samples per process and step (``B``).
        world_size: processes sharing the stream (``W``).
        rank: this process.
        samples_done: positions of the epoch already trained (0 for a fresh epoch).

    Returns:
        ``(length, positions)``: the stream length :func:`epoch_order` must cover, and this
        process's positions, in order.
    """
    global_batch = batch_size * world_size
    end = samples_done + remaining_steps(iterations, global_batch, samples_done) * global_batch
    return end, range(samples_done + rank, end, world_size)
