"""Seeded noise-prediction batches for validating the DDPM on whole healthy volumes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines import DiffusionPrepareBatch

from .uad.inference import brain_slices
from .uad.training import EpochSeeded

__all__ = ["SeededDiffusionPrepareBatch"]


class SeededDiffusionPrepareBatch(EpochSeeded, DiffusionPrepareBatch):
    """``DiffusionPrepareBatch`` for validation: brain slices of volumes, noise and timesteps from a seeded generator.

    Returns ``(x0, noise, (), {"noise", "timesteps"})`` like the parent, so ``DiffusionInferer`` noises x0 and the
    network's noise estimate is compared with ``noise``. Attached to an evaluator (list it in its handlers), the
    generator is reset at every epoch start, so every validation round draws the same noise and timesteps and the
    validation loss is comparable across epochs.

    Args:
        num_train_timesteps: timesteps are drawn uniformly from [0, num_train_timesteps).
        seed: seed of the generator; None draws unseeded like the parent.
        image_key: key of the images in the model range [-1, 1]: slices (B, 1, H, W), or volumes (B, 1, H, W, D)
            whose slices containing brain (``mask_key``) are stacked into one batch.
        mask_key: key of the brain masks, required for volumes.
    """

    def __init__(
        self, num_train_timesteps: int, seed: int | None = 0, image_key: str = "image", mask_key: str = "mask"
    ) -> None:
        DiffusionPrepareBatch.__init__(self, num_train_timesteps=num_train_timesteps)
        self.seed = seed
        self.image_key = image_key
        self.mask_key = mask_key

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=self.seeded_generator(images.device), device=images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        generator = self.seeded_generator(images.device)
        return torch.randint(0, self.num_train_timesteps, (images.shape[0],), device=images.device, generator=generator)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = batchdata[self.image_key]
        if images.ndim == 5 and self.mask_key not in batchdata:  # in [-1, 1] the foreground says nothing
            raise ValueError(f"volumes need a brain mask under {self.mask_key!r} to select their slices")
        images = brain_slices(images, batchdata.get(self.mask_key))
        return super().__call__({"image": images}, device, non_blocking, **kwargs)
