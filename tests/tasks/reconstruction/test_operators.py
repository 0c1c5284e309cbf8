"""The measurement models, data consistency, losses and fastMRI metrics of the reconstruction task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medseg.tasks.reconstruction.config import ReconConfig, ReconstructionLossConfig
from medseg.tasks.reconstruction.operators import (
    Acquisition,
    CartesianOperator,
    add_noise,
    cartesian_mask,
    case_seed,
    create_reconstruction_loss,
    data_consistency,
    fft2c,
    ifft2c,
    sparse_view_fbp,
    undersample,
    unpack_mri_input,
    volume_metrics,
)


def _complex(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g, dtype=torch.float64),
                         torch.randn(shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["equispaced", "random"])
@pytest.mark.parametrize("acceleration, fraction", [(4, 0.08), (8, 0.04)])
def test_masks_follow_fastmri_and_reproduce_from_the_seed(kind: str, acceleration: int, fraction: float) -> None:
    width = 97  # odd on purpose
    mask = cartesian_mask(kind, width, acceleration, fraction, seed=case_seed("hippocampus_001"))
    again = cartesian_mask(kind, width, acceleration, fraction, seed=case_seed("hippocampus_001"))
    other = [cartesian_mask(kind, width, acceleration, fraction, seed=case_seed(f"case_{i}")) for i in range(8)]
    assert torch.equal(mask, again)
    assert any(not torch.equal(mask, m) for m in other)  # the seed matters
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    centre = int(round(width * fraction))
    pad = (width - centre + 1) // 2
    assert mask[pad:pad + centre].all()  # the fully sampled centre (fastMRI's placement)
    lines = float(mask.sum())
    assert width / acceleration * 0.6 <= lines <= width / acceleration * 1.6


def test_case_seed_is_stable_across_processes() -> None:
    # crc32-based: the same number on every machine and Python (hash() is salted per process)
    assert case_seed("hippocampus_001") == case_seed("hippocampus_001")
    assert case_seed("hippocampus_001") != case_seed("hippocampus_003")
    assert case_seed("abc") == 891568578


def test_operator_keeps_exactly_the_masked_lines_and_equals_its_adjoint() -> None:
    h, w = 23, 40
    mask = cartesian_mask("random", w, 4, 0.08, seed=3).double()
    op = CartesianOperator(mask)
    x = _complex((2, 1, h, w), 0)
    y = _complex((2, 1, h, w), 1)
    ax = op.forward(x)
    measured = mask.bool()
    assert torch.count_nonzero(ax[..., ~measured]) == 0
    assert torch.allclose(ax[..., measured], fft2c(x)[..., measured])
    # <A x, y> == <x, A^H y>
    lhs = torch.sum(ax * y.conj())
    rhs = torch.sum(x * op.adjoint(y).conj())
    assert torch.allclose(lhs, rhs, atol=1e-10)
    # the FFT pair is unitary: a round trip is the identity and energy is kept
    assert torch.allclose(ifft2c(fft2c(x)), x, atol=1e-12)
    assert math.isclose(float(fft2c(x).abs().pow(2).sum()), float(x.abs().pow(2).sum()), rel_tol=1e-10)


def test_data_consistency_leaves_measured_kspace_untouched() -> None:
    h, w = 31, 26
    mask = cartesian_mask("equispaced", w, 4, 0.08, seed=5).double()
    truth = _complex((1, 1, h, w), 2)
    measured = mask * fft2c(truth)
    estimate = _complex((1, 1, h, w), 3)  # anything the network might say
    corrected = fft2c(data_consistency(estimate, measured, mask))
    lines = mask.bool()
    assert torch.allclose(corrected[..., lines], fft2c(truth)[..., lines], atol=1e-10)
    assert torch.allclose(corrected[..., ~lines], fft2c(estimate)[..., ~lines], atol=1e-10)


def test_undersample_packs_the_zero_filled_image_and_the_mask() -> None:
    target = torch.rand(3, 1, 21, 34, dtype=torch.float32)
    mask = cartesian_mask("equispaced", 34, 4, 0.08, seed=1)
    x = undersample(target, mask)
    assert x.shape == (3, 3, 21, 34)
    zero_filled, unpacked_mask = unpack_mri_input(x)
    expected = CartesianOperator(mask).adjoint(fft2c(target.to(torch.complex64)))
    assert torch.allclose(zero_filled, expected, atol=1e-5)
    assert torch.equal(unpacked_mask[0, 0, 0], mask)
    # fully sampled: the zero-filled image is the image
    full = undersample(target, torch.ones(34))
    assert torch.allclose(full[:, 0:1], target, atol=1e-5)
    assert torch.allclose(full[:, 1:2], torch.zeros_like(target), atol=1e-5)


def test_metrics_match_scikit_image_on_a_hand_made_pair() -> None:
    rng = np.random.default_rng(7)
    target = rng.random((3, 1, 29, 22)) * 3.0  # a data range that is not 1
    pred = target + rng.normal(0, 0.2, target.shape)
    ours = volume_metrics(torch.from_numpy(pred), torch.from_numpy(target))
    t, p = target[:, 0], pred[:, 0]
    peak = float(t.max())
    assert ours["psnr"] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=peak), abs=1e-6)
    skimage_ssim = np.mean([structural_similarity(a, b, data_range=peak) for a, b in zip(t, p)])
    assert ours["ssim"] == pytest.approx(skimage_ssim, abs=1e-5)
    assert ours["nmse"] == pytest.approx(float(np.sum((t - p) ** 2) / np.sum(t ** 2)), rel=1e-9)
    perfect = volume_metrics(torch.from_numpy(target), torch.from_numpy(target))
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["nmse"] == 0 and perfect["psnr"] == math.inf


@pytest.mark.parametrize("name", ["l1", "l2", "huber", "log_cosh", "ssim", "l1_ssim"])
def test_losses_are_zero_on_the_target_and_grow_with_the_error(name: str) -> None:
    loss = create_reconstruction_loss(ReconstructionLossConfig(name=name))
    torch.manual_seed(0)
    target = torch.rand(2, 1, 24, 19)
    small = target + 0.02 * torch.randn_like(target)
    large = target + 0.3 * torch.randn_like(target)
    assert float(loss(target, target)) == pytest.approx(0.0, abs=1e-5)
    assert 0 < float(loss(small, target)) < float(loss(large, target))
    pred = large.clone().requires_grad_(True)
    loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()


def test_log_cosh_stays_finite_for_huge_errors() -> None:
    loss = create_reconstruction_loss(ReconstructionLossConfig(name="log_cosh"))
    value = float(loss(torch.full((1, 1, 4, 4), 1e4), torch.zeros(1, 1, 4, 4)))
    assert value == pytest.approx(1e4 - math.log(2), rel=1e-6)


def test_sparse_view_fbp_is_close_with_many_views_and_worse_with_few() -> None:
    y, x = np.mgrid[-1:1:64j, -1:1:64j]
    image = ((x / 0.5) ** 2 + (y / 0.3) ** 2 <= 1).astype(np.float32)
    dense, sparse = sparse_view_fbp(image, 180), sparse_view_fbp(image, 20)
    assert dense.shape == sparse.shape == image.shape
    assert np.abs(dense - image).mean() < np.abs(sparse - image).mean()


def test_noise_is_seeded_and_rician_noise_is_non_negative() -> None:
    image = torch.zeros(2, 1, 16, 15)
    rician = add_noise(image, "rician", 0.1, torch.Generator().manual_seed(1))
    again = add_noise(image, "rician", 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(rician, again) and (rician >= 0).all()
    # Rician noise of a zero signal is Rayleigh: mean sigma * sqrt(pi / 2)
    gaussian = add_noise(torch.zeros(1, 1, 200, 200), "gaussian", 0.1, torch.Generator().manual_seed(2))
    assert float(gaussian.std()) == pytest.approx(0.1, rel=0.05)
    big = add_noise(torch.zeros(1, 1, 200, 200), "rician", 0.1, torch.Generator().manual_seed(3))
    assert float(big.mean()) == pytest.approx(0.1 * math.sqrt(math.pi / 2), rel=0.05)


def test_acquisition_names_the_baseline_and_channels() -> None:
    slices = torch.rand(2, 1, 20, 18)
    mri = Acquisition(ReconConfig(problem="mri"))
    inputs = mri.degrade(slices, seed=4)
    assert mri.in_channels == inputs.shape[1] == 3 and mri.baseline_name == "zero_filled"
    assert torch.allclose(mri.baseline(inputs), torch.sqrt(inputs[:, 0:1] ** 2 + inputs[:, 1:2] ** 2))
    assert torch.equal(inputs, mri.degrade(slices, seed=4))  # same seed, same mask
    noisy = Acquisition(ReconConfig(problem="denoise", noise="gaussian", noise_level=0.1))
    assert noisy.baseline_name == "noisy" and noisy.degrade(slices, seed=1).shape == slices.shape
    ct = Acquisition(ReconConfig(problem="ct", views=30))
    assert ct.baseline_name == "fbp" and ct.degrade(slices, seed=0).shape == slices.shape
