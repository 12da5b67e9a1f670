"""Noise-prediction batches for training and validating the DDPM on brain slices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.engines import DiffusionPrepareBatch

from .uad.inference import brain_slices, to_model_range
from .uad.training import EpochSeeded, timestep_bounds

__all__ = ["NoisePredictionPrepareBatch"]


class NoisePredictionPrepareBatch(EpochSeeded, DiffusionPrepareBatch):
    """``DiffusionPrepareBatch`` on brain slices, with timesteps from a range and optionally seeded draws.

    Returns ``(x0, noise, (), {"noise", "timesteps"})`` like the parent, with x0 the images mapped to the model range
    [-1, 1], so ``DiffusionInferer`` noises x0 and the network's noise estimate is compared with ``noise``. With a
    ``seed``, attached to an engine (list it in its handlers), the generator is reset at every epoch start, so every
    validation round draws the same noise and timesteps and the validation loss is comparable across epochs.

    Args:
        num_train_timesteps: length of the noise schedule.
        timestep_range: timesteps are drawn uniformly from [low, high); default the whole schedule. AutoDDPM only
            denoises from the levels of its mask and re-sample stages at test time (below 200), so training there
            spends every step on them.
        seed: seed of the generator; None draws from the global RNG like the parent (training).
        image_key: key of the images in [0, 1]: slices (B, 1, H, W), or volumes (B, 1, H, W, D) whose slices
            containing brain (``mask_key``, else foreground) are stacked into one batch (validation on whole volumes).
        mask_key: key of the brain masks, used for volumes only.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        timestep_range: Sequence[int] | None = None,
        seed: int | None = None,
        image_key: str = "image",
        mask_key: str = "mask",
    ) -> None:
        DiffusionPrepareBatch.__init__(self, num_train_timesteps=num_train_timesteps)
        self.timestep_range = timestep_bounds(timestep_range, num_train_timesteps)
        self.seed = seed
        self.image_key = image_key
        self.mask_key = mask_key

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.shape, generator=self.seeded_generator(images.device), device=images.device)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.timestep_range
        generator = self.seeded_generator(images.device)
        return torch.randint(low, high, (images.shape[0],), device=images.device, generator=generator)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = brain_slices(batchdata[self.image_key], batchdata.get(self.mask_key))
        return super().__call__({"image": to_model_range(images)}, device, non_blocking, **kwargs)
