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

    pDDPM (``patch_size``): each step noises one ``patch_size`` square at a time, the rest of the slice clean as
    context, over a grid of squares ``patch_stride`` apart (the last one flush with the border); each pixel's
    reconstruction is the mean of the x0 estimates of the squares that cover it.

    Args:
        scheduler: owns the noise schedule used to noise the input (``add_noise``).
        noise: callable ``noise(like, generator=None)`` (simplex or Gaussian), the noise type used in training.
        timesteps: noise levels of the ensemble, e.g. (250, 500, 750); (500,) for the single reconstruction.
        patch_size, patch_stride: pDDPM's squares (None: the whole slice at once, cDDPM); stride default half a patch.
        slice_size: the (H, W) of the model grid, for :attr:`network_passes_per_slice`.
        batch_size, erosion_iterations, median_kernel, smooth_sigma, seed, amp, brain_box_multiple: see
            ``SliceAnomalyInferer``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        noise: Callable[..., torch.Tensor],
        timesteps: Sequence[int] = (250, 500, 750),
        patch_size: int | None = None,
        patch_stride: int | None = None,
        slice_size: Sequence[int] | None = None,
        batch_size: int = 50,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        smooth_sigma: float = 0.0,
        seed: int | None = 0,
        amp: bool = False,
        brain_box_multiple: int | None = None,
    ) -> None:
        super().__init__(batch_size, erosion_iterations, median_kernel, smooth_sigma, seed, amp, brain_box_multiple)
        if not timesteps or not all(0 <= t < scheduler.num_train_timesteps for t in timesteps):
            raise ValueError(f"timesteps must be in [0, {scheduler.num_train_timesteps}), got {timesteps}")
        self.scheduler = scheduler
        self.noise = noise
        self.timesteps = tuple(int(t) for t in timesteps)
        if patch_size is not None and patch_size < 1 or patch_stride is not None and patch_stride < 1:
            raise ValueError(f"patch_size and patch_stride must be positive, got {patch_size}, {patch_stride}")
        self.patch_size = patch_size
        self.patch_stride = patch_stride or (max(patch_size // 2, 1) if patch_size else None)
        self.slice_size = tuple(slice_size) if slice_size is not None else None

    def patch_starts(self, length: int) -> list[int]:
        """The first index of each square along an axis of ``length`` (one square: the whole axis)."""
        if not self.patch_size or self.patch_size >= length:
            return [0]
        starts = list(range(0, length - self.patch_size + 1, self.patch_stride))
        return starts if starts[-1] == length - self.patch_size else [*starts, length - self.patch_size]

    def square_masks(self, h: int, w: int, device: torch.device) -> list[torch.Tensor]:
        """(1, 1, H, W) bool masks of the squares noised one at a time (one covering the slice without patches)."""
        ph, pw = min(self.patch_size or h, h), min(self.patch_size or w, w)
        masks = []
        for top in self.patch_starts(h):
            for left in self.patch_starts(w):
                square = torch.zeros((1, 1, h, w), dtype=torch.bool, device=device)
                square[..., top : top + ph, left : left + pw] = True
                masks.append(square)
        return masks

    @property
    def network_passes_per_slice(self) -> int:
        if not self.patch_size or self.slice_size is None:
            return len(self.timesteps)
        h, w = self.slice_size
        return len(self.timesteps) * len(self.patch_starts(h)) * len(self.patch_starts(w))

    def reconstruct_slices(
        self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """The noise-ensemble reconstruction of slices (N, 1, H, W) in [0, 1] (``network(x_t, timesteps=t,
        condition=x) -> x0``), ``{"reconstruction"}`` in [0, 1]; ``brain`` is not used."""
        x0 = to_model_range(slices)
        masks = self.square_masks(*slices.shape[-2:], slices.device)
        recon, cover = torch.zeros_like(slices), torch.zeros_like(slices)
        for t in self.timesteps:
            steps = torch.full((slices.shape[0],), t, device=slices.device, dtype=torch.long)
            noise = self.noise(x0, generator=generator)
            x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=steps)
            for square in masks:
                with self.autocast(slices.device):
                    x0_hat = network(torch.where(square, x_t, x0), timesteps=steps, condition=slices)
                recon += torch.where(square, from_model_range(x0_hat.float()), 0.0)
                cover += square
        return {"reconstruction": recon / cover}
