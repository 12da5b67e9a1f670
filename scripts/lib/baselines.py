"""Reference anomaly maps without a diffusion model: the intensity itself and the residual to a mean healthy image.

Repository code for ``scripts/benchmark.py``, not shipped in a bundle: a benchmark config names the inferer as
``lib.baselines.TemplateResidualInferer``, with ``scripts/`` on the bundle command's ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import Inferer
from torch import nn
from uad.inference import slice_volumes
from uad.postprocessing import residual_anomaly_map

__all__ = ["TemplateResidualInferer", "mean_healthy_image"]


@torch.inference_mode()
def mean_healthy_image(entries: Sequence[dict], preprocessing: Callable) -> torch.Tensor:
    """Voxel-wise mean of the preprocessed healthy images (1, 1, H, W, D), zero outside every brain mask."""
    loader = DataLoader(Dataset(list(entries), preprocessing), batch_size=1, shuffle=False)
    total = None
    for batch in loader:
        volumes, brain, _ = slice_volumes(batch["image"], batch["mask"])
        image = volumes * brain
        total = image if total is None else total + image
    if total is None:
        raise ValueError("no healthy images to average")
    return total / len(loader)


class TemplateResidualInferer(Inferer):
    """Anomaly map ``|x - template|`` with the same mask erosion and median filter as the diffusion bundles.

    ``template=None`` is the intensity-only baseline (the map is the intensity: hyperintense lesions only); a mean
    healthy image (:func:`mean_healthy_image`, or the path of a ``torch.save``-d tensor) is the mean-image baseline.
    The ``network`` argument is ignored: this is what a diffusion model has to beat. No network passes.
    """

    network_passes_per_slice = 0

    def __init__(
        self,
        template: torch.Tensor | str | os.PathLike | None = None,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        smooth_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(template, str | os.PathLike):
            template = torch.load(template, weights_only=True, map_location="cpu")
        self.template = template
        self.erosion_iterations = erosion_iterations
        self.median_kernel = median_kernel
        self.smooth_sigma = smooth_sigma

    def __call__(
        self,
        inputs: torch.Tensor,
        network: nn.Module | None = None,
        *args,
        mask: torch.Tensor | None = None,
        return_reconstruction: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        volumes, brain, restore = slice_volumes(inputs, mask)
        if self.template is None:
            recon = torch.zeros_like(volumes)
        else:
            template = self.template.to(volumes.device).float()
            if template.shape[-3:] != volumes.shape[-3:]:
                raise ValueError(f"template shape {tuple(template.shape)} does not match inputs {tuple(inputs.shape)}")
            recon = template.expand_as(volumes) * brain
        maps = residual_anomaly_map(
            volumes, recon, brain, self.erosion_iterations, self.median_kernel, smooth_sigma=self.smooth_sigma
        )
        return (restore(maps), restore(recon)) if return_reconstruction else restore(maps)
