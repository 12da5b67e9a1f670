"""cDDPM test-time reconstruction and anomaly map, as one MONAI ``Inferer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import Scheduler
from torch import nn

from .uad.inference import SliceAnomalyInferer, from_model_range, to_model_range

__all__ = ["CDDPMAnomalyInferer"]


class CDDPMAnomalyInferer(SliceAnomalyInferer):
    """Single-step reconstruction of every brain slice and the residual anomaly map.

    For each step t of ``timesteps``: noise the image to x_t with fresh noise and take the network's x0 estimate; the
    reconstruction is the mean of these estimates (the noise ensemble; one step t = 500 without it). The anomaly map
    is ``|x - x_hat|`` inside the eroded brain mask, 3D median filtered (see ``SliceAnomalyInferer``).

    Args:
        scheduler: owns the noise schedule used to noise the input (``add_noise``).
        noise: callable ``noise(like, generator=None)`` (simplex or Gaussian), the noise type used in training.
        timesteps: noise levels of the ensemble, e.g. (250, 500, 750); (500,) for the single reconstruction.
        batch_size, erosion_iterations, median_kernel, seed, amp, brain_box_multiple: see ``SliceAnomalyInferer``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        noise: Callable[..., torch.Tensor],
        timesteps: Sequence[int] = (250, 500, 750),
        batch_size: int = 50,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        seed: int | None = 0,
        amp: bool = False,
        brain_box_multiple: int | None = None,
    ) -> None:
        super().__init__(batch_size, erosion_iterations, median_kernel, seed, amp, brain_box_multiple)
        if not timesteps or not all(0 <= t < scheduler.num_train_timesteps for t in timesteps):
            raise ValueError(f"timesteps must be in [0, {scheduler.num_train_timesteps}), got {timesteps}")
        self.scheduler = scheduler
        self.noise = noise
        self.timesteps = tuple(int(t) for t in timesteps)

    @property
    def network_passes_per_slice(self) -> int:
        return len(self.timesteps)

    def reconstruct_slices(
        self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """The noise-ensemble reconstruction of slices (N, 1, H, W) in [0, 1] (``network(x_t, timesteps=t,
        condition=x) -> x0``), ``{"reconstruction"}`` in [0, 1]; ``brain`` is not used."""
        x0 = to_model_range(slices)
        recon = torch.zeros_like(slices)
        for t in self.timesteps:
            steps = torch.full((slices.shape[0],), t, device=slices.device, dtype=torch.long)
            noise = self.noise(x0, generator=generator)
            x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=steps)
            with self.autocast(slices.device):
                x0_hat = network(x_t, timesteps=steps, condition=slices)
            recon += from_model_range(x0_hat.float())
        return {"reconstruction": recon / len(self.timesteps)}
