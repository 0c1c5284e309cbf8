"""Reconstruction: the simulated acquisitions, data consistency, losses and fastMRI metrics.

Everything here works on 2D slices of images scaled to [0, 1] (the fully sampled ground truth):

* **MRI**: single-coil Cartesian sampling. k-space is the centred, orthonormal 2D FFT of the
  slice (MONAI's ``fftn_centered_t``); a 1D mask along the phase-encode axis (the slice's last
  axis, fastMRI's columns) keeps whole lines. Masks are MONAI's fastMRI-convention
  ``EquispacedKspaceMask`` / ``RandomKspaceMask``: a fully sampled centre plus equispaced or
  random lines up to the acceleration. The network sees the zero-filled image.
* **CT**: parallel-beam sinograms (scikit-image ``radon``) at a few views, filtered
  back-projection (``iradon``, ramp filter) as input and baseline (FBPConvNet, Jin et al. 2017).
* **Denoising**: additive Gaussian or Rician noise.
* **Super-resolution**: thick slices through-plane from the slice profile, interpolated back onto
  the thin grid (:mod:`~medseg.tasks.reconstruction.slice_profile`); the 2D slices cross the
  thick axis, so each slice holds it, and linear interpolation is the baseline.

A training sample draws its mask or noise from the sample stream's seed; validation, test and
``predict`` draw it from the case id, so every run and every machine scores the same measurements.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask
from monai.losses import SSIMLoss
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.blocks.fft_utils_t import fftn_centered_t, ifftn_centered_t
from torch import nn

from medseg.tasks.reconstruction.config import (
    MaskKind,
    NoiseKind,
    ReconConfig,
    ReconProblem,
    ReconstructionLoss,
    ReconstructionLossConfig,
)
from medseg.tasks.reconstruction.neighbours import neighbour_channels
from medseg.tasks.reconstruction.slice_profile import thick_slices, upsample

#: channels of an MRI network input: zero-filled real, zero-filled imaginary, sampling mask
MRI_CHANNELS = 3
#: fastMRI's SSIM: 7x7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03 (scikit-image's defaults)
SSIM_WINDOW = 7


# ----------------------------------------------------------------------------------- k-space


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes of a complex tensor."""
    return torch.view_as_complex(fftn_centered_t(torch.view_as_real(image), spatial_dims=2).contiguous())


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (and its adjoint: the transform is unitary)."""
    return torch.view_as_complex(ifftn_centered_t(torch.view_as_real(kspace), spatial_dims=2).contiguous())


def case_seed(case_id: str, salt: int = 0) -> int:
    """A seed from a case id that is the same in every process, run and Python version (unlike ``hash``)."""
    return (zlib.crc32(case_id.encode("utf-8")) + 0x9E3779B1 * salt) & 0x7FFFFFFF


def cartesian_mask(kind: MaskKind | str, width: int, acceleration: float, center_fraction: float,
                   seed: int) -> torch.Tensor:
    """A fastMRI Cartesian mask over ``width`` phase-encode lines (1 = measured), float32 of shape (width,).

    The pattern is MONAI's (``EquispacedKspaceMask``: equispaced lines from a random offset;
    ``RandomKspaceMask``: each line with the probability that gives the acceleration on average),
    always with ``round(width * center_fraction)`` centre lines.
    """
    cls = EquispacedKspaceMask if str(kind) == MaskKind.EQUISPACED.value else RandomKspaceMask
    maker = cls(center_fractions=[center_fraction], accelerations=[acceleration], spatial_dims=1, is_complex=False)
    maker.set_random_state(seed=seed)
    maker(torch.zeros(1, width))  # MONAI builds the mask while masking; a dummy line is enough
    return torch.as_tensor(maker.mask, dtype=torch.float32).reshape(width)


class CartesianOperator:
    """The single-coil forward model ``A = M F`` and its adjoint ``A^H = F^H M``.

    Args:
        mask: (W,) or broadcastable to the k-space; 1 where a line is measured.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.mask * fft2c(image)

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        return ifft2c(self.mask * kspace)


def data_consistency(image: torch.Tensor, measured: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the k-space lines of ``image`` that were measured by the measurements (noise-free, hard DC).

    Args:
        image: complex estimate (..., H, W).
        measured: complex k-space (..., H, W), zero where not measured.
        mask: broadcastable to the k-space, 1 on measured lines.
    """
    return ifft2c(mask * measured + (1 - mask) * fft2c(image))


def undersample(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Network input for one or more slices: ``(..., 3, H, W)`` = zero-filled real, imaginary and the mask.

    Args:
        target: real slices (..., 1, H, W), the fully sampled magnitude images.
        mask: (W,) sampling mask.
    """
    zero_filled = CartesianOperator(mask).adjoint(fft2c(target[..., 0, :, :].to(torch.complex64)))
    mask_plane = mask.to(target.dtype).expand(target.shape[-2], -1).expand(*target.shape[:-3], -1, -1)
    return torch.stack([zero_filled.real, zero_filled.imag, mask_plane], dim=-3)


def unpack_mri_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(zero-filled complex image (B, 1, H, W), mask (B, 1, 1, W))`` from a network input (B, 3, H, W)."""
    zero_filled = torch.complex(x[:, 0:1].float(), x[:, 1:2].float())
    return zero_filled, x[:, 2:3, :1, :].float()


# ----------------------------------------------------------------------------------- CT and noise


def projection_angles(views: int) -> np.ndarray:
    """``views`` angles in degrees evenly spread over [0, 180)."""
    return np.linspace(0.0, 180.0, views, endpoint=False)


def sparse_view_fbp(image: np.ndarray, views: int) -> np.ndarray:
    """Filtered back-projection (ramp filter) of a 2D image from a ``views``-angle parallel-beam sinogram."""
    from skimage.transform import iradon, radon

    theta = projection_angles(views)
    # circle=False: real images are not zero outside the inscribed circle
    sinogram = radon(image.astype(np.float64), theta=theta, circle=False)
    fbp = iradon(sinogram, theta=theta, circle=False, filter_name="ramp", output_size=max(image.shape))
    return _crop_centre(fbp, image.shape).astype(np.float32)


def _crop_centre(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    starts = [(a - s) // 2 for a, s in zip(array.shape, shape)]
    return array[tuple(slice(b, b + s) for b, s in zip(starts, shape))]


def add_noise(image: torch.Tensor, kind: NoiseKind | str, level: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian ``x + n`` or Rician ``|x + n1 + i n2|`` noise of standard deviation ``level``."""
    n1 = torch.randn(image.shape, generator=generator, dtype=image.dtype) * level
    if str(kind) == NoiseKind.GAUSSIAN.value:
        return image + n1
    n2 = torch.randn(image.shape, generator=generator, dtype=image.dtype) * level
    return torch.sqrt((image + n1) ** 2 + n2 ** 2)


# ----------------------------------------------------------------------------------- the acquisition


class Acquisition:
    """Simulates the configured measurement of 2D slices and names the classical baseline.

    ``degrade(slices, seed)`` turns fully sampled slices (N, 1, H, W) into network inputs;
    ``baseline(inputs)`` is what a scanner would show without the network (zero-filled magnitude,
    FBP or the noisy image).
    """

    def __init__(self, cfg: ReconConfig):
        self.cfg = cfg
        self.problem = ReconProblem(cfg.problem)

    @property
    def in_channels(self) -> int:
        if self.problem == ReconProblem.SR:
            return 2 * self.cfg.sr.context + 1
        return MRI_CHANNELS if self.problem == ReconProblem.MRI else 1

    @property
    def baseline_name(self) -> str:
        return {ReconProblem.MRI: "zero_filled", ReconProblem.CT: "fbp", ReconProblem.DENOISE: "noisy",
                ReconProblem.SR: "trilinear"}[self.problem]

    @property
    def degrades_before_padding(self) -> bool:
        """Super-resolution: thick slices are laid from the volume's first slice, not from the zero
        padding a slice gets to reach the network's size, so they are simulated before it."""
        return self.problem == ReconProblem.SR

    @property
    def through_plane_dim(self) -> int:
        """Super-resolution: the dimension of a slice batch (N, 1, H, W) that is the thick axis."""
        in_plane = [a for a in (0, 1, 2) if a != self.cfg.slice_axis]
        return 2 + in_plane.index(self.cfg.sr.axis)

    def mask(self, width: int, seed: int) -> torch.Tensor:
        c = self.cfg
        return cartesian_mask(c.mask, width, c.acceleration, c.resolved_center_fraction(), seed)

    def thick_input(self, slices: torch.Tensor) -> torch.Tensor:
        """Super-resolution: the thick slices of ``slices`` (N, 1, H, W) interpolated back onto their thin grid."""
        dim, sr = self.through_plane_dim, self.cfg.sr
        return upsample(thick_slices(slices, dim, sr), dim, sr.factor, thin_slices=slices.shape[dim])

    def degrade(self, slices: torch.Tensor, seed: int, fbp: torch.Tensor | None = None) -> torch.Tensor:
        """Network inputs (N, C, H, W) for ``slices`` (N, 1, H, W); one mask/noise draw from ``seed``.

        For CT the FBP, and for super-resolution the thick slices, are deterministic and usually
        computed once per volume beforehand (``fbp``). Super-resolution with ``recon.sr.context``
        takes ``slices`` as one volume's consecutive slices: each gets its neighbours as channels.
        """
        if self.problem == ReconProblem.MRI:
            return undersample(slices, self.mask(slices.shape[-1], seed))
        if self.problem == ReconProblem.SR:
            if fbp is not None:
                return fbp
            return neighbour_channels(self.thick_input(slices), self.cfg.sr.context)
        if self.problem == ReconProblem.CT:
            if fbp is not None:
                return fbp
            return torch.stack([torch.from_numpy(sparse_view_fbp(s[0].numpy(), self.cfg.views))[None] for s in slices])
        generator = torch.Generator().manual_seed(seed)
        return add_noise(slices, self.cfg.noise, self.cfg.noise_level, generator)

    def baseline(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classical reconstruction (N, 1, H, W) from network inputs."""
        if self.problem == ReconProblem.MRI:
            return torch.sqrt(inputs[:, 0:1] ** 2 + inputs[:, 1:2] ** 2)
        if self.problem == ReconProblem.SR:  # the slice itself is the middle of its neighbours
            centre = self.cfg.sr.context
            return inputs[:, centre:centre + 1]
        return inputs[:, 0:1]


def fbp_volume(volume: np.ndarray, views: int, slice_axis: int) -> np.ndarray:
    """:func:`sparse_view_fbp` of every slice of a (X, Y, Z) volume along ``slice_axis``."""
    moved = np.moveaxis(volume, slice_axis, 0)
    out = np.stack([sparse_view_fbp(s, views) for s in moved])
    return np.moveaxis(out, 0, slice_axis)


# ----------------------------------------------------------------------------------- losses


class LogCoshLoss(nn.Module):
    """mean(log(cosh(pred - target))), written to stay finite for large errors."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = (pred - target).float()
        return (d.abs() + torch.nn.functional.softplus(-2 * d.abs()) - math.log(2.0)).mean()


class SsimLoss(nn.Module):
    """1 - SSIM on image batches (N, 1, H, W), MONAI's ``SSIMLoss`` with fastMRI's window and a
    per-image data range (the target's maximum), so a dim slice weighs as much as a bright one."""

    def __init__(self) -> None:
        super().__init__()
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=SSIM_WINDOW)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = target.detach().float().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return self.ssim(pred.float() / scale, target.float() / scale)


class MixedL1Ssim(nn.Module):
    """``(1 - a) * L1 + a * (1 - SSIM)`` (Zhao, Gallo, Frosio and Kautz, 2017)."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight
        self.ssim = SsimLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * nn.functional.l1_loss(pred.float(), target.float()) + self.weight * self.ssim(pred, target)


def create_reconstruction_loss(cfg: ReconstructionLossConfig) -> nn.Module:
    """The configured image loss ``loss(prediction, target)`` on (N, 1, H, W) batches."""
    name = ReconstructionLoss(cfg.name)
    if name == ReconstructionLoss.L1:
        return nn.L1Loss()
    if name == ReconstructionLoss.L2:
        return nn.MSELoss()
    if name == ReconstructionLoss.HUBER:
        return nn.HuberLoss(delta=cfg.huber_delta)
    if name == ReconstructionLoss.LOG_COSH:
        return LogCoshLoss()
    if name == ReconstructionLoss.SSIM:
        return SsimLoss()
    if name == ReconstructionLoss.L1_SSIM:
        return MixedL1Ssim(cfg.ssim_weight)
    raise ValueError(f"loss.name {cfg.name} is not a reconstruction loss")  # pragma: no cover - config validates


# ----------------------------------------------------------------------------------- metrics


def ssim_slices(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM of each slice pair (N,), fastMRI's definition (= scikit-image ``structural_similarity``
    with its defaults: 7x7 uniform window, sample covariance, mean over the valid region)."""
    ssim_map, _ = compute_ssim_and_cs(pred.double(), target.double(), spatial_dims=2, kernel_size=[SSIM_WINDOW] * 2,
                                      kernel_sigma=[1.5, 1.5], data_range=data_range, kernel_type="uniform",
                                      k1=0.01, k2=0.03)
    return ssim_map.flatten(1).mean(1)


def volume_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """fastMRI's per-volume metrics of slices (N, 1, H, W): NMSE, PSNR and SSIM, with the data range
    the volume's maximum; SSIM is the mean over slices."""
    pred, target = pred.double(), target.double()
    peak = float(target.max())
    mse = float(((pred - target) ** 2).mean())
    energy = float((target ** 2).sum())
    nmse = float(((pred - target) ** 2).sum()) / energy if energy > 0 else float("nan")
    psnr = 10 * math.log10(peak ** 2 / mse) if mse > 0 and peak > 0 else float("inf")
    ssim = float(ssim_slices(pred, target, peak).mean()) if peak > 0 else float("nan")
    return {"nmse": nmse, "psnr": psnr, "ssim": ssim}


def summarise(rows: Sequence[dict[str, Any]], prefix: str, baseline: str) -> dict[str, float]:
    """Mean per-volume metrics of the model and the baseline, and the gains (model - baseline)."""
    out: dict[str, float] = {}
    for metric in ("psnr", "ssim", "nmse"):
        model = [float(r[metric]) for r in rows if math.isfinite(float(r[metric]))]
        base = [float(r[f"{baseline}_{metric}"]) for r in rows if math.isfinite(float(r[f"{baseline}_{metric}"]))]
        out[f"{prefix}/{metric}"] = float(np.mean(model)) if model else float("nan")
        out[f"{prefix}/{baseline}_{metric}"] = float(np.mean(base)) if base else float("nan")
        out[f"{prefix}/{metric}_gain"] = out[f"{prefix}/{metric}"] - out[f"{prefix}/{baseline}_{metric}"]
    return out


__all__ = ["Acquisition", "CartesianOperator", "add_noise", "cartesian_mask", "case_seed",
           "create_reconstruction_loss", "data_consistency", "fbp_volume", "fft2c", "ifft2c", "sparse_view_fbp",
           "summarise", "undersample", "unpack_mri_input", "volume_metrics"]
