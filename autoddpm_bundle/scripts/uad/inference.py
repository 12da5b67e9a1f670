"""Shape handling shared by the anomaly inferers: volumes in, brain slices through the network, maps out."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

__all__ = ["MaskedPrepareBatch", "brain_box", "brain_slices", "slice_volumes", "stack_slices"]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MetaTensor metadata: per-slice ops on batched metadata are slow and can fail to collate."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def slice_volumes(
    inputs: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Bring inferer inputs to volumes (B, 1, H, W, D) with boolean brain masks.

    Args:
        inputs: volumes (B, 1, H, W, D) or a slice stack (N, 1, H, W), intensities in [0, 1].
        mask: brain masks shaped like ``inputs``; None uses the foreground ``inputs > 0`` (skull-stripped data).

    Returns:
        the volumes (plain float tensors), the masks, and a function mapping volume-shaped results back to the
        layout of ``inputs``.
    """
    if inputs.ndim not in (4, 5) or inputs.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W, D) volumes or (N, 1, H, W) slices, got {tuple(inputs.shape)}")
    volumes = _plain(inputs).float()
    brain = volumes > 0 if mask is None else _plain(mask).to(volumes.device) > 0
    if brain.shape != volumes.shape:
        raise ValueError(f"mask shape {tuple(brain.shape)} does not match inputs {tuple(volumes.shape)}")

    def restore(v: torch.Tensor) -> torch.Tensor:
        out = v if inputs.ndim == 5 else v[0].permute(3, 0, 1, 2)
        if isinstance(inputs, MetaTensor):  # keep the input's metadata, as MONAI inferers do (Invertd needs it)
            out = MetaTensor(out)
            out.copy_meta_from(inputs)
        return out

    if inputs.ndim == 4:  # slice stack (N, 1, H, W) -> one volume (1, 1, H, W, N)
        volumes, brain = (s.permute(1, 2, 3, 0).unsqueeze(0) for s in (volumes, brain))
    return volumes, brain, restore


def stack_slices(volumes: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices that contain brain, stacked as a batch.

    Args:
        volumes: (B, 1, H, W, D).
        brain: boolean masks (B, 1, H, W, D).

    Returns:
        slices (N, 1, H, W) and the boolean index (B, D) of the slices taken, so that
        ``volumes.permute(0, 4, 1, 2, 3)[index]`` selects them.
    """
    index = brain.any(dim=(1, 2, 3))  # (B, D)
    return volumes.permute(0, 4, 1, 2, 3)[index], index


def brain_box(brain: torch.Tensor, multiple: int) -> tuple[slice, slice]:
    """In-plane bounding box of the brain over a slice stack, grown (centred, inside the image) to sides that are
    multiples of ``multiple``: the crop of networks trained on brain-box crops (``configs/brain_crop.json``).

    Args:
        brain: boolean masks (N, 1, H, W).
        multiple: side lengths are rounded up to a multiple of this (the UNet's total downsampling).

    Returns:
        the row and column slices of the box; the whole image when there is no brain.
    """
    box = []
    for dim, size in ((2, brain.shape[2]), (3, brain.shape[3])):
        found = torch.nonzero(brain.any(dim=tuple(d for d in range(4) if d != dim)))
        if found.numel() == 0:
            return slice(0, brain.shape[2]), slice(0, brain.shape[3])
        low, high = int(found.min()), int(found.max()) + 1
        side = min(-(-(high - low) // multiple) * multiple, size)
        start = min(max(low - (side - (high - low)) // 2, 0), size - side)
        box.append(slice(start, start + side))
    return box[0], box[1]


class MaskedPrepareBatch(PrepareBatch):
    """Inference batches for the anomaly inferers: ``(image, None, (), {"mask": mask})``.

    ``SupervisedEvaluator`` then calls ``inferer(image, network, mask=mask)``; without a mask in the batch the
    inferer falls back to the image foreground.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        self.image_key = image_key
        self.mask_key = mask_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, tuple, dict[str, torch.Tensor]]:
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        extra = {}
        if self.mask_key in batchdata:
            extra["mask"] = batchdata[self.mask_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return image, None, (), extra


def brain_slices(images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Slices (B, 1, H, W) as they are; volumes (B, 1, H, W, D) as the stack of their axial slices containing brain.

    Used to validate slice models on whole volumes. ``mask`` (like ``images``) defaults to the foreground.
    """
    images = _plain(images)
    if images.ndim == 4:
        return images
    brain = images > 0 if mask is None else _plain(mask).to(images.device) > 0
    return stack_slices(images, brain)[0]
