"""Post-processing of reconstruction residuals into anomaly maps (torch, runs on the input's device).

Volumes are shaped (H, W, D) with D the axial slices (last axis); leading batch/channel axes are allowed where noted.
The pipeline is: residual ``|x - x_hat|`` (optionally times a per-voxel weight) -> times the brain mask eroded per
axial slice -> 3D median filter -> times the eroded mask again -> (optionally) Gaussian smoothing -> times the
eroded mask again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

__all__ = ["erode_mask_per_slice", "gaussian_smooth", "median_filter_3d", "residual_anomaly_map"]

# voxels gathered at once by the median filter (window values included), bounds its memory use
_MEDIAN_CHUNK_ELEMENTS = 2**25


def erode_mask_per_slice(mask: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Binary erosion of every axial slice with the 2D cross (4-neighbour) structuring element.

    Pixels outside the image count as background (like ``scipy.ndimage.binary_erosion(..., border_value=0)``).

    Args:
        mask: (..., H, W, D) binary mask (bool or numeric, non-zero is foreground).
        iterations: number of erosion steps.

    Returns:
        (..., H, W, D) eroded mask with the dtype of ``mask``.
    """
    eroded = mask != 0
    for _ in range(iterations):
        # pad H and W by one background pixel, then a pixel survives only if it and its 4 neighbours are foreground
        padded = F.pad(eroded, (0, 0, 1, 1, 1, 1), value=False)
        eroded = (
            eroded
            & padded[..., :-2, 1:-1, :]
            & padded[..., 2:, 1:-1, :]
            & padded[..., 1:-1, :-2, :]
            & padded[..., 1:-1, 2:, :]
        )
    return eroded.to(mask.dtype)


def median_filter_3d(volume: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """3D median filter with zero padding (same as ``scipy.ndimage.median_filter(mode="constant", cval=0)``).

    ``monai.networks.layers.median_filter`` pads by replication, so it differs from the scipy reference at the
    borders; this function pads with zeros, which matches masked anomaly maps (zero outside the brain).

    A single-slice volume (D = 1, 2D data) is filtered in-plane (a ``kernel_size``-square window): a cubic window
    would be mostly zero padding there and zero the whole map.

    Args:
        volume: (H, W, D) or (B, 1, H, W, D) volume.
        kernel_size: odd edge length of the cubic window.

    Returns:
        filtered volume, same shape and dtype as ``volume``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
    if volume.ndim not in (3, 5):
        raise ValueError(f"expected (H, W, D) or (B, 1, H, W, D), got shape {tuple(volume.shape)}.")
    spatial = volume.shape[-3:]
    vols = volume.reshape(-1, *spatial)
    r = kernel_size // 2
    kd, rd = (kernel_size, r) if spatial[2] > 1 else (1, 0)
    padded = F.pad(vols, (rd, rd, r, r, r, r))
    rows_per_chunk = max(1, _MEDIAN_CHUNK_ELEMENTS // (spatial[1] * spatial[2] * kernel_size**2 * kd))
    out = torch.empty_like(vols)
    for b in range(vols.shape[0]):
        for h0 in range(0, spatial[0], rows_per_chunk):
            h1 = min(h0 + rows_per_chunk, spatial[0])
            # (h, W, D, k, k, kd) sliding windows of the padded slab, flattened to (h, W, D, k * k * kd)
            windows = padded[b, h0 : h1 + 2 * r].unfold(0, kernel_size, 1).unfold(1, kernel_size, 1)
            windows = windows.unfold(2, kd, 1).reshape(h1 - h0, spatial[1], spatial[2], -1)
            out[b, h0:h1] = windows.median(dim=-1).values
    return out.reshape(volume.shape)


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing with zero padding (same as ``scipy.ndimage.gaussian_filter(mode="constant")``, kernel
    truncated at 4 sigma).

    ``sigma`` is in voxels, the same along each axis; a single-slice volume (D = 1, 2D data) is smoothed in-plane, like
    :func:`median_filter_3d`.

    Args:
        volume: (H, W, D) or (B, 1, H, W, D) volume.
        sigma: standard deviation of the kernel in voxels (positive).

    Returns:
        smoothed volume, same shape and dtype as ``volume``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if volume.ndim not in (3, 5):
        raise ValueError(f"expected (H, W, D) or (B, 1, H, W, D), got shape {tuple(volume.shape)}.")
    spatial = volume.shape[-3:]
    vols = volume.reshape(-1, 1, *spatial)
    if spatial[2] == 1:
        vols = vols[..., 0]
    dtype = torch.promote_types(volume.dtype, torch.float32)
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="sampled", normalize=True)
    smoothed = separable_filtering(vols.to(dtype), [kernel.to(volume.device, dtype)] * (vols.ndim - 2), mode="zeros")
    return smoothed.to(volume.dtype).reshape(volume.shape)


def residual_anomaly_map(
    image: torch.Tensor,
    reconstruction: torch.Tensor,
    brain_mask: torch.Tensor,
    erosion_iterations: int = 3,
    median_kernel: int = 5,
    weight: torch.Tensor | None = None,
    smooth_sigma: float = 0.0,
) -> torch.Tensor:
    """Anomaly map from an input and its pseudo-healthy reconstruction.

    Order: ``r = |x - x_hat|``, times ``weight`` if given; ``r = r * m`` with ``m`` the brain mask eroded per axial
    slice; ``r = median(r)`` (3D, zero padding); ``r = r * m`` again, so the filter cannot spread residual out of the
    eroded brain; with ``smooth_sigma`` > 0, ``r = gaussian(r) * m`` (zero padding): the smoothing spreads only
    residual from inside the eroded brain, and the smoothed map of a stored unsmoothed one is the same.

    Args:
        image: (H, W, D) or (B, 1, H, W, D) input in [0, 1].
        reconstruction: reconstruction, same shape and range as ``image``.
        brain_mask: brain mask, same shape as ``image``.
        erosion_iterations: erosion steps of the per-slice cross structuring element.
        median_kernel: edge length of the cubic median window.
        weight: per-voxel weight of the residual (e.g. AutoDDPM's likelihood map), same shape as ``image``.
        smooth_sigma: sigma in voxels of the Gaussian smoothing after the median filter (0 disables it).

    Returns:
        anomaly map, same shape as ``image``, float, zero outside the eroded brain mask.
    """
    if not smooth_sigma >= 0:
        raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma}.")
    eroded = erode_mask_per_slice(brain_mask != 0, erosion_iterations).to(image.dtype)
    residual = (image - reconstruction).abs()
    if weight is not None:
        residual = residual * weight
    residual = median_filter_3d(residual * eroded, median_kernel) * eroded
    return gaussian_smooth(residual, smooth_sigma) * eroded if smooth_sigma > 0 else residual
