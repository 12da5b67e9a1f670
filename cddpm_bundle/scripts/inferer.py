"""cDDPM test-time reconstruction and anomaly map, as one MONAI ``Inferer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler
from torch import nn

from .uad.inference import brain_box, slice_volumes, stack_slices
from .uad.postprocessing import residual_anomaly_map

__all__ = ["CDDPMAnomalyInferer"]


class CDDPMAnomalyInferer(Inferer):
    """Single-step reconstruction of every brain slice and the residual anomaly map.

    For each step t of ``timesteps``: noise the image to x_t with fresh noise and take the network's x0 estimate; the
    reconstruction is the mean of these estimates (the noise ensemble; one step t = 500 without it). The anomaly map
    is ``|x - x_hat|`` inside the eroded brain mask, 3D median filtered (see ``residual_anomaly_map``).

    Called as ``inferer(inputs, network)`` (MONAI Label, Deploy) or ``inferer(inputs, network, mask=mask)``.

    Args:
        scheduler: owns the noise schedule used to noise the input (``add_noise``).
        noise: callable ``noise(like, generator=None)`` (simplex or Gaussian), the noise type used in training.
        timesteps: noise levels of the ensemble, e.g. (250, 500, 750); (500,) for the single reconstruction.
        batch_size: slices per network call.
        erosion_iterations: iterations of the per-slice cross erosion of the brain mask.
        median_kernel: size of the 3D median filter (1 disables it).
        seed: seed of the noise, so repeated calls give the same map; None draws fresh noise.
        amp: run the network under autocast (fp16 on CUDA, bf16 on CPU).
        brain_box_multiple: run the network on the brain's bounding box only (sides rounded up to this multiple), as
            networks trained on brain-box crops (``configs/brain_crop.json``) expect; None runs whole slices.
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
        super().__init__()
        if not timesteps or not all(0 <= t < scheduler.num_train_timesteps for t in timesteps):
            raise ValueError(f"timesteps must be in [0, {scheduler.num_train_timesteps}), got {timesteps}")
        self.scheduler = scheduler
        self.noise = noise
        self.timesteps = tuple(int(t) for t in timesteps)
        self.batch_size = batch_size
        self.erosion_iterations = erosion_iterations
        self.median_kernel = median_kernel
        self.seed = seed
        self.amp = amp
        self.brain_box_multiple = brain_box_multiple

    @property
    def network_passes_per_slice(self) -> int:
        return len(self.timesteps)

    @torch.inference_mode()
    def reconstruct(self, slices: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """Reconstruct a stack of slices (N, 1, H, W) in [0, 1]; returns (N, 1, H, W) in [0, 1]."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=slices.device).manual_seed(self.seed)
        autocast_dtype = torch.float16 if slices.device.type == "cuda" else torch.bfloat16
        recon = torch.zeros_like(slices)
        for start in range(0, slices.shape[0], self.batch_size):
            x = slices[start : start + self.batch_size]
            x0 = x * 2.0 - 1.0
            for t in self.timesteps:
                steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                x_t = self.scheduler.add_noise(
                    original_samples=x0, noise=self.noise(x0, generator=generator), timesteps=steps
                )
                with torch.autocast(slices.device.type, dtype=autocast_dtype, enabled=self.amp):
                    x0_hat = network(x_t, timesteps=steps, condition=x)
                recon[start : start + x.shape[0]] += (x0_hat.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        return recon / len(self.timesteps)

    def __call__(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args,
        mask: torch.Tensor | None = None,
        return_reconstruction: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            inputs: volumes (B, 1, H, W, D) in [0, 1] (axial slices along D), or a slice stack (N, 1, H, W).
            network: the denoiser ``network(x_t, timesteps=t, condition=x) -> x0``.
            mask: brain masks shaped like ``inputs``; without one, the foreground ``inputs > 0`` is used.
            return_reconstruction: also return the reconstruction.

        Returns:
            the anomaly map shaped like ``inputs`` (and the reconstruction).
        """
        volumes, brain, restore = slice_volumes(inputs, mask)
        slices, index = stack_slices(volumes, brain)
        if self.brain_box_multiple:
            rows, cols = brain_box(brain.permute(0, 4, 1, 2, 3)[index], self.brain_box_multiple)
            recon_slices = slices.clone()  # outside the brain box: the input itself (zero residual)
            recon_slices[..., rows, cols] = self.reconstruct(slices[..., rows, cols].contiguous(), network)
        else:
            recon_slices = self.reconstruct(slices, network)
        recon = volumes.clone()  # slices without brain are not run: their residual is zero
        recon.permute(0, 4, 1, 2, 3)[index] = recon_slices
        maps = residual_anomaly_map(volumes, recon, brain, self.erosion_iterations, self.median_kernel)
        return (restore(maps), restore(recon)) if return_reconstruction else restore(maps)
