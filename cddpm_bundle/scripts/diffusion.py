"""Batch preparation for training a denoiser that predicts x0 (the clean image) instead of the noise."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import Scheduler

from .uad.inference import brain_slices, to_model_range
from .uad.training import EpochSeeded, timestep_bounds

__all__ = ["X0PrepareBatch", "random_patches"]


def random_patches(
    shape: Sequence[int], size: int, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """(N, 1, H, W) bool: one ``size`` square (clipped to the slice) per slice at a uniformly random place."""
    n, _, h, w = shape
    ph, pw = min(size, h), min(size, w)
    top = torch.randint(0, h - ph + 1, (n,), device=device, generator=generator)
    left = torch.randint(0, w - pw + 1, (n,), device=device, generator=generator)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + ph)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + pw)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


class X0PrepareBatch(EpochSeeded, PrepareBatch):
    """Noise clean images to a random step and return ``(x_t, x0, (), {"timesteps", "condition"})``.

    With ``SupervisedTrainer`` and ``SimpleInferer`` the network is called as
    ``network(x_t, timesteps=t, condition=x)`` and the loss compares its output with the target x0, so the model
    learns to predict the clean image (cDDPM) while its encoder sees the clean input.

    Args:
        scheduler: owns the noise schedule (``add_noise``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps).
        noise: callable ``noise(like, generator=None)`` returning noise shaped like ``like`` (simplex or Gaussian).
        image_key: key of the clean images in [0, 1]: slices (B, 1, H, W), or volumes (B, 1, H, W, D) whose slices
            containing brain (``mask_key``, else foreground) are stacked into one batch (validation on whole volumes).
        mask_key: key of the brain masks, used for volumes only.
        timestep_range: steps are drawn uniformly from [low, high).
        patch_size: pDDPM: noise only one ``patch_size`` square per slice, at a random place, and keep the rest of the
            slice clean as context (x_t outside the patch is x0); None noises the whole slice.
        seed: if set, timesteps and noise come from a generator reset to this seed at the start of every epoch of the
            engine this object is attached to, so validation losses are comparable across epochs.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        noise: Callable[..., torch.Tensor],
        image_key: str = "image",
        mask_key: str = "mask",
        timestep_range: Sequence[int] | None = None,
        patch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.noise = noise
        self.image_key = image_key
        self.mask_key = mask_key
        self.timestep_range = timestep_bounds(timestep_range, scheduler.num_train_timesteps)
        self.patch_size = patch_size
        self.seed = seed

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        images = brain_slices(images, batchdata.get(self.mask_key))
        generator = self.seeded_generator(images.device)
        x0 = to_model_range(images)
        low, high = self.timestep_range
        timesteps = torch.randint(low, high, (images.shape[0],), device=images.device, generator=generator)
        noise = self.noise(x0, generator=generator)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        if self.patch_size:
            x_t = torch.where(random_patches(x0.shape, self.patch_size, generator, x0.device), x_t, x0)
        return x_t, x0, (), {"timesteps": timesteps, "condition": images}
