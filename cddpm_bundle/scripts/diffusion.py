"""Batch preparation for training a denoiser that predicts x0 (the clean image) instead of the noise."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from monai.networks.schedulers import Scheduler

from .uad.inference import stack_slices

__all__ = ["X0PrepareBatch"]


class X0PrepareBatch(PrepareBatch):
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
        seed: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.noise = noise
        self.image_key = image_key
        self.mask_key = mask_key
        low, high = timestep_range if timestep_range is not None else (0, scheduler.num_train_timesteps)
        if not 0 <= low < high <= scheduler.num_train_timesteps:
            raise ValueError(f"timestep_range must lie in [0, {scheduler.num_train_timesteps}], got {(low, high)}")
        self.timestep_range = (int(low), int(high))
        self.seed = seed
        self.generator: torch.Generator | None = None

    def attach(self, engine: Engine) -> None:
        """Reset the generator at every epoch start (use the object as a handler of the evaluator)."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())

    def reset(self) -> None:
        self.generator = None

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        images = torch.as_tensor(images)  # plain tensors: MetaTensor bookkeeping costs time and breaks tracing
        if images.ndim == 5:
            mask = batchdata.get(self.mask_key)
            brain = images > 0 if mask is None else torch.as_tensor(mask).to(images.device) > 0
            images = stack_slices(images, brain)[0]
        generator = self._generator(images.device)
        x0 = images * 2.0 - 1.0  # the diffusion model works in [-1, 1]
        low, high = self.timestep_range
        timesteps = torch.randint(low, high, (images.shape[0],), device=images.device, generator=generator)
        noise = self.noise(x0, generator=generator)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        return x_t, x0, (), {"timesteps": timesteps, "condition": images}
