"""The sample stream: a function of (seed, epoch, position), whoever draws it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandSpatialCropSamplesd

from medseg.data.sampling import (
    EpochSamples,
    epoch_order,
    process_positions,
    remaining_steps,
    split_transforms,
)


def _cases(n: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": torch.from_numpy(rng.normal(size=(1, 13, 11, 9)).astype(np.float32)), "case_id": f"c{i}"}
            for i in range(n)]


AUGMENT = Compose([RandSpatialCropSamplesd(keys="image", roi_size=(6, 5, 4), num_samples=2, random_size=False),
                   RandFlipd(keys="image", prob=0.5, spatial_axis=0),
                   RandGaussianNoised(keys="image", prob=0.5, std=0.1)])


def _stream(world: int, rank: int, epoch: int = 0, start: int = 0, iterations: int = 4, batch: int = 1) -> list:
    cases = _cases()
    length, positions = process_positions(iterations, batch, world, rank, samples_done=start)
    samples = EpochSamples(cases, AUGMENT, epoch_order(len(cases), length, 7, epoch), positions, seed=7, epoch=epoch)
    return [samples[i] for i in range(len(samples))]


def test_processes_split_each_global_batch_without_gaps_or_overlap() -> None:
    length, one = process_positions(iterations=3, batch_size=4, world_size=1, rank=0)
    _, r0 = process_positions(iterations=3, batch_size=2, world_size=2, rank=0)
    _, r1 = process_positions(iterations=3, batch_size=2, world_size=2, rank=1)
    assert length == 12
    for k in range(3):  # global batch k: the same positions however many processes share it
        assert sorted([*r0[2 * k:2 * k + 2], *r1[2 * k:2 * k + 2]]) == list(one[4 * k:4 * k + 4])
    _, resumed = process_positions(iterations=3, batch_size=2, world_size=2, rank=1, samples_done=8)
    assert list(resumed) == list(r1[4:])


def _positions_by_step(iterations: int, batch: int, world: int, samples_done: int = 0) -> list[list[int]]:
    """The positions each global step trains (all processes together), from ``samples_done`` on."""
    per_rank = [list(process_positions(iterations, batch, world, r, samples_done)[1]) for r in range(world)]
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1, f"processes would take different numbers of steps: {counts}"  # DDP would hang
    (count,) = counts
    assert count % batch == 0, "a step would be short on some process"
    return [sorted(p for rank in per_rank for p in rank[k * batch:(k + 1) * batch]) for k in range(count // batch)]


@pytest.mark.parametrize(("world_before", "world_after"), [(1, 2), (2, 1), (1, 3), (3, 2), (2, 4), (4, 2), (3, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_resuming_with_another_process_count_trains_every_position_of_the_epoch_once(world_before: int,
                                                                                  world_after: int,
                                                                                  batch: int) -> None:
    n_cases = 13  # epochs of whole steps: 12, 12 and 13 positions for 1, 2 and 3 processes of batch 1
    before_iterations = n_cases // (batch * world_before)
    after_iterations = n_cases // (batch * world_after)
    after_batch = batch * world_after
    length = after_iterations * after_batch
    for steps_done in range(before_iterations + 1):
        done = [p for step in _positions_by_step(before_iterations, batch, world_before)[:steps_done] for p in step]
        samples_done = steps_done * batch * world_before
        assert sorted(done) == list(range(samples_done))  # what a checkpoint's samples_done stands for
        rest = _positions_by_step(after_iterations, batch, world_after, samples_done)
        assert len(rest) == remaining_steps(after_iterations, after_batch, samples_done)
        assert all(len(step) == after_batch for step in rest)  # every step a whole global batch
        trained = [p for step in rest for p in step]
        assert len(set(trained)) == len(trained), "a position trained twice after resuming"
        assert not set(trained) & set(done), "a position trained before and after resuming"
        # Nothing of the epoch is left out, and the remainder starts at the first untrained position,
        # with no gap; a remainder that is not whole steps runs on past the epoch's end by less than
        # one step (see process_positions).
        assert sorted(done + trained) == list(range(len(done) + len(trained)))
        assert len(done) + len(trained) >= length
        assert len(done) + len(trained) - length < after_batch or not trained
        if samples_done % after_batch == 0 and samples_done <= length:
            assert len(done) + len(trained) == length


def test_remaining_steps_rounds_up_to_whole_steps_and_stops_at_the_epochs_end() -> None:
    assert remaining_steps(iterations=3, global_batch=2, samples_done=0) == 3
    assert remaining_steps(iterations=3, global_batch=2, samples_done=3) == 2  # positions 3..6
    assert remaining_steps(iterations=3, global_batch=2, samples_done=4) == 1
    assert remaining_steps(iterations=3, global_batch=2, samples_done=6) == 0
    assert remaining_steps(iterations=3, global_batch=2, samples_done=9) == 0  # past the end: nothing left
    length, positions = process_positions(3, 1, 2, 1, samples_done=9)
    assert not positions


def test_a_longer_stream_keeps_the_cases_of_the_shorter_one() -> None:
    """A resumed epoch may run a step past its length: the positions it already has keep their cases."""
    assert epoch_order(5, 12, seed=3, epoch=1)[:7] == epoch_order(5, 7, seed=3, epoch=1)


def test_a_position_holds_the_same_augmented_sample_for_any_process_count() -> None:
    single = _stream(world=1, rank=0, iterations=4, batch=2)
    rank1 = _stream(world=2, rank=1, iterations=4, batch=1)
    for k, item in enumerate(rank1):  # rank 1 holds odd positions
        for a, b in zip(item, single[2 * k + 1]):
            assert a["case_id"] == b["case_id"]
            assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))


def test_a_resumed_stream_continues_where_it_stopped_and_epochs_differ() -> None:
    whole = _stream(world=1, rank=0, iterations=4)
    tail = _stream(world=1, rank=0, iterations=4, start=2)
    for a, b in zip(tail, whole[2:]):
        assert torch.equal(torch.as_tensor(a[0]["image"]), torch.as_tensor(b[0]["image"]))
    other_epoch = _stream(world=1, rank=0, epoch=1, iterations=4)
    assert not all(torch.equal(torch.as_tensor(a[0]["image"]), torch.as_tensor(b[0]["image"]))
                   for a, b in zip(other_epoch, whole))


def test_loader_workers_do_not_change_the_batches() -> None:
    cases = _cases()
    length, positions = process_positions(4, 2, 1, 0)
    order = epoch_order(len(cases), length, 3, 0)

    def batches(workers: int) -> list[torch.Tensor]:
        samples = EpochSamples(cases, AUGMENT, order, positions, seed=3, epoch=0)
        return [torch.as_tensor(b["image"]) for b in DataLoader(samples, batch_size=2, num_workers=workers)]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def test_epoch_order_visits_every_case_before_repeating_and_the_cache_stays_untouched() -> None:
    order = epoch_order(5, 12, seed=1, epoch=0)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    cases = _cases()
    before = cases[0]["image"].clone()
    EpochSamples(cases, AUGMENT, [0] * 4, range(4), seed=1, epoch=0)[0]
    assert torch.equal(cases[0]["image"], before)


def test_split_transforms_keeps_the_deterministic_prefix_for_the_cache() -> None:
    from monai.transforms import ScaleIntensityd

    prefix, rest = split_transforms(Compose([ScaleIntensityd(keys="image"), *AUGMENT.transforms]))
    assert len(prefix.transforms) == 1 and len(rest.transforms) == 3
    prefix, rest = split_transforms(Compose([ScaleIntensityd(keys="image")]))
    assert rest is None


def test_patch_sampling_never_writes_into_the_cached_volumes(tmp_path) -> None:
    """EpochSamples skips CacheDataset's per-sample deep copy before a patch sampler: every
    transform of the config then makes new tensors, which this checks for all of them."""
    import nibabel as nib
    from monai.data import CacheDataset

    from medseg.config import (
        AffineAug,
        BiasFieldAug,
        ContrastAug,
        ElasticAug,
        FlipAug,
        GammaAug,
        GibbsAug,
        KSpaceSpikeAug,
        NoiseAug,
        PatchConfig,
        PreprocessConfig,
        Rot90Aug,
    )
    from medseg.data.transforms import training_transforms
    from tests.conftest import make_case

    image, label, affine = make_case((25, 29, 21), seed=4)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lbl.nii.gz")
    augment = [FlipAug(name="flip", prob=1.0), Rot90Aug(name="rot90", prob=1.0), AffineAug(name="affine", prob=1.0),
               ElasticAug(name="elastic", prob=1.0), NoiseAug(name="noise", prob=1.0), GammaAug(name="gamma", prob=1.0),
               ContrastAug(name="contrast", prob=1.0), BiasFieldAug(name="bias_field", prob=1.0),
               KSpaceSpikeAug(name="kspace_spike", prob=1.0), GibbsAug(name="gibbs", prob=1.0)]
    for sampler in ("pos_neg", "per_class", "uniform"):
        chain = training_transforms(PreprocessConfig(), PatchConfig(size=(8, 8, 8), sampler=sampler), augment, 3, 3)
        prefix, rest = split_transforms(chain)
        cache = CacheDataset([{"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lbl.nii.gz")}], prefix,
                             progress=False)
        before = {k: v.clone() for k, v in cache[0].items() if isinstance(v, torch.Tensor)}
        samples = EpochSamples(cache, rest, [0] * 6, range(6), seed=1, epoch=0)
        assert not samples.copy_item
        for i in range(len(samples)):
            patches = samples[i]
            assert all(p["image"].shape[1:] == (8, 8, 8) for p in patches)
            for patch in patches:
                patch["image"].add_(1.0)  # whatever later code does to a batch stays out of the cache
        for key, value in before.items():
            assert torch.equal(cache[0][key], value), f"{sampler}: cached {key} changed"


def test_precomputed_sampler_indices_draw_the_same_patches(tmp_path) -> None:
    import nibabel as nib

    from medseg.config import PatchConfig, PreprocessConfig
    from medseg.data.transforms import patch_sampler, preprocessing, training_transforms
    from tests.conftest import make_case

    image, label, affine = make_case((25, 29, 21), seed=5)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lbl.nii.gz")
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lbl.nii.gz")}
    for sampler in ("pos_neg", "per_class"):
        patch = PatchConfig(size=(8, 8, 8), sampler=sampler, samples_per_volume=3)
        fast = training_transforms(PreprocessConfig(), patch, [], 3, 3)
        slow = Compose([*preprocessing(PreprocessConfig(), min_size=patch.size), patch_sampler(patch, 3)])
        for seed in range(3):
            fast.set_random_state(seed=seed)
            slow.set_random_state(seed=seed)
            a, b = fast(dict(item)), slow(dict(item))
            assert len(a) == len(b) == 3
            for pa, pb in zip(a, b, strict=True):
                assert torch.equal(torch.as_tensor(pa["image"]), torch.as_tensor(pb["image"]))
                assert torch.equal(torch.as_tensor(pa["label"]), torch.as_tensor(pb["label"]))
                assert not any(k.endswith("_indices") for k in pa), "sampler indices must not reach a batch"
