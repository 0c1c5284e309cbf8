"""Reconstruction networks: a residual U-Net, the same with data consistency, and an unrolled cascade.

Every network maps the acquisition's input (N, C, H, W) to the image (N, 1, H, W):

* ``unet``: ``x + U(x)`` on the zero-filled image (MRI; complex or magnitude), the FBP (CT:
  FBPConvNet) or the noisy image (denoising); the U-Net learns the artefact, not the image.
* ``unet_dc``: the same, then the measured k-space lines are put back (hard data consistency),
  so the output never contradicts the measurement.
* ``cascade``: ``model.cascades`` rounds of (residual U-Net, data consistency) with separate
  weights, a small unrolled network in the style of Schlemper et al.'s DC-CNN.

The U-Net is MONAI's; padding to a size its strides divide uses MONAI's reconstruction helpers,
so slices of any size go through.
"""

from __future__ import annotations

import math

import torch
from monai.apps.reconstruction.networks.nets.utils import divisible_pad_t, inverse_divisible_pad_t
from monai.networks.nets import UNet
from torch import nn

from medseg.config import UNetModelConfig
from medseg.engine.models import create_model, register_model
from medseg.errors import ModelError
from medseg.tasks.reconstruction.config import ReconConfig, ReconProblem, ReconstructionModelConfig
from medseg.tasks.reconstruction.operators import MRI_CHANNELS, data_consistency, fft2c, unpack_mri_input


class ResidualUNet(nn.Module):
    """``x + std * U((x - mean) / std)``: per-image, per-channel normalisation (fastMRI's NormUnet)
    so the U-Net sees the same scale whatever the image's brightness, and padding to ``factor``.

    ``restored`` fewer channels than ``channels`` (2.5D super-resolution: a slice and its
    neighbours in, the slice out): the U-Net corrects the middle ``restored`` channels of ``x``.
    """

    def __init__(self, cfg: UNetModelConfig, channels: int, restored: int | None = None):
        super().__init__()
        self.restored = channels if restored is None else restored
        self.first = (channels - self.restored) // 2
        given = tuple(cfg.strides or (2,) * (len(cfg.channels) - 1))
        strides = tuple(s for s in given if isinstance(s, int))
        if len(strides) != len(given):
            raise ModelError(f"model.strides {list(given)}: reconstruction U-Nets take one stride per level (an "
                             "int for both axes of a slice), not one per axis")
        self.factor = math.prod(strides)
        self.unet = UNet(spatial_dims=2, in_channels=channels, out_channels=self.restored, channels=cfg.channels,
                         strides=strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout)
        # zero-initialised output layer: the network starts as the identity (the baseline) and
        # learns the correction, instead of first unlearning a random one (SkipInit / ReZero)
        self.head = nn.Conv2d(self.restored, self.restored, kernel_size=1)
        for param in self.head.parameters():  # weight and bias
            nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        padded, pads = divisible_pad_t((x - mean) / std, k=self.factor)
        delta = inverse_divisible_pad_t(self.head(self.unet(padded)), pads)
        kept = slice(self.first, self.first + self.restored)
        return x[:, kept] + delta * std[:, kept]


class ImageRestorer(nn.Module):
    """Residual U-Net restoring a one-channel image (CT: FBPConvNet; denoising; super-resolution),
    from it alone or from it and its neighbours (``channels`` > 1, the image in the middle)."""

    def __init__(self, cfg: UNetModelConfig, channels: int = 1):
        super().__init__()
        self.block = ResidualUNet(cfg, channels, restored=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MriReconstructor(nn.Module):
    """Zero-filled image (and mask) in, magnitude image out: ``stages`` residual U-Nets, each
    followed by data consistency when ``dc``.

    Args:
        cfg: U-Net widths, depth, normalisation.
        stages: 1 for ``unet`` / ``unet_dc``, ``model.cascades`` for ``cascade``.
        dc: put the measured k-space lines back after every U-Net.
        complex_input: the U-Net sees (real, imaginary); otherwise the magnitude.
    """

    def __init__(self, cfg: UNetModelConfig, stages: int, dc: bool, complex_input: bool):
        super().__init__()
        self.dc = dc
        self.complex_input = complex_input
        self.blocks = nn.ModuleList(ResidualUNet(cfg, 2 if complex_input else 1) for _ in range(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.complex_image(x).abs()

    def complex_image(self, x: torch.Tensor) -> torch.Tensor:
        """The complex reconstruction (N, 1, H, W) before the magnitude is taken."""
        if x.shape[1] != MRI_CHANNELS:
            raise ValueError(f"MRI reconstruction input must have {MRI_CHANNELS} channels (zero-filled real, "
                             f"imaginary, mask); got shape {tuple(x.shape)}")
        zero_filled, mask = unpack_mri_input(x)
        # F(zero-filled) is exactly the measured lines (zero elsewhere): the adjoint of A = M F
        measured = mask * fft2c(zero_filled) if self.dc else None
        image = zero_filled
        for block in self.blocks:
            if self.complex_input:
                out = block(torch.cat([image.real, image.imag], dim=1))
                image = torch.complex(out[:, 0:1].float(), out[:, 1:2].float())
            else:
                image = block(image.abs()).float().to(torch.complex64)
            if measured is not None:
                image = data_consistency(image, measured, mask)
        return image


TASK = "reconstruction"


@register_model(TASK, "unet")
def _unet(model: ReconstructionModelConfig, recon: ReconConfig) -> nn.Module:
    """Residual U-Net: FBPConvNet for CT, a residual denoiser, or the MRI image-domain network."""
    if ReconProblem(recon.problem) == ReconProblem.SR:
        return ImageRestorer(model, 2 * recon.sr.context + 1)
    if ReconProblem(recon.problem) != ReconProblem.MRI:
        return ImageRestorer(model)
    return MriReconstructor(model, 1, dc=False, complex_input=recon.input == "complex")


@register_model(TASK, "unet_dc")
def _unet_dc(model: ReconstructionModelConfig, recon: ReconConfig) -> nn.Module:
    """The U-Net followed by hard data consistency (MRI)."""
    return MriReconstructor(model, 1, dc=True, complex_input=recon.input == "complex")


@register_model(TASK, "cascade")
def _cascade(model: ReconstructionModelConfig, recon: ReconConfig) -> nn.Module:
    """``model.cascades`` rounds of (U-Net, data consistency) (Schlemper et al. 2018)."""
    return MriReconstructor(model, model.cascades, dc=True, complex_input=recon.input == "complex")


def create_reconstruction_model(model: ReconstructionModelConfig, recon: ReconConfig) -> nn.Module:
    """The network named by ``model.name`` for the configured acquisition."""
    return create_model(TASK, model.name, model, recon)
