"""The cDDPM network: an image encoder whose latent conditions a diffusion UNet through cross-attention."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

__all__ = ["ConditionedDiffusionModel"]


class ConditionedDiffusionModel(nn.Module):
    """Denoiser ``(x_t, timesteps, condition) -> x0 estimate`` conditioned on a latent of the clean image.

    The encoder maps the clean input image (B, 1, H, W) in [0, 1] to a latent (B, d); it enters the UNet as a
    cross-attention context of shape (B, 1, d). Without an encoder the model is an unconditioned DDPM (ablation) and
    ``condition`` is ignored.

    Args:
        unet: a ``DiffusionModelUNet``, with ``with_conditioning=True`` and ``cross_attention_dim=d`` iff an encoder
            is given.
        encoder: image encoder producing (B, d), e.g. ``monai.networks.nets.ResNet(..., num_classes=d)``, or None.
    """

    def __init__(self, unet: DiffusionModelUNet, encoder: nn.Module | None = None) -> None:
        super().__init__()
        conditioned = bool(unet.with_conditioning)
        if (encoder is not None) != conditioned:
            raise ValueError(
                "the UNet's with_conditioning must be True exactly when an encoder is given "
                f"(encoder={'set' if encoder is not None else 'None'}, with_conditioning={conditioned})"
            )
        self.unet = unet
        self.encoder = encoder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: noisy images x_t in [-1, 1], (B, 1, H, W).
            timesteps: diffusion steps, (B,).
            condition: clean images in [0, 1], (B, 1, H, W); required when the model has an encoder.

        Returns:
            the network output, (B, 1, H, W) (the x0 estimate for cDDPM).
        """
        context = None
        if self.encoder is not None:
            if condition is None:
                raise ValueError("this model is conditioned: pass the clean image as `condition`")
            context = self.encoder(condition).unsqueeze(1)
        return self.unet(x, timesteps, context=context)
