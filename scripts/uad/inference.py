"""Shared by the anomaly inferers: the model's intensity range, volumes in, brain slices through the network, maps
out (:class:`SliceAnomalyInferer`)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from torch import nn

from .postprocessing import residual_anomaly_map

__all__ = [
    "MaskedPrepareBatch",
    "SliceAnomalyInferer",
    "brain_box",
    "brain_slices",
    "from_model_range",
    "slice_volumes",
    "stack_slices",
    "to_model_range",
]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the data pipeline's range) to the diffusion models' range [-1, 1]: ``2x - 1``."""
    return images * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Model outputs to images in [0, 1]: clamped to [-1, 1], then ``(x + 1) / 2``."""
    return (x.clamp(-1.0, 1.0) + 1.0) / 2.0


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
    if images.ndim == 4:
        return _plain(images)
    volumes, brain, _ = slice_volumes(images, mask)
    return stack_slices(volumes, brain)[0]


class SliceAnomalyInferer(Inferer):
    """Anomaly maps of a method that reconstructs brain slices: the pipeline every inferer of the bundles shares.

    volumes (B, 1, H, W, D) -> their axial slices containing brain -> (with ``brain_box_multiple``) each slice's
    brain bounding box -> :meth:`reconstruct_slices`, ``batch_size`` slices at a time, with one seeded generator for
    the whole call -> the outputs scattered back into volumes -> ``residual_anomaly_map`` of the input and the
    ``reconstruction_key`` output, weighted by the ``weight_key`` output if there is one.

    A method implements :meth:`reconstruct_slices` and ``network_passes_per_slice`` and names its outputs:
    ``output_keys`` (all of them), ``reconstruction_key`` (the pseudo-healthy image), ``weight_key`` (a per-voxel
    weight of the residual, or None) and ``map_keys`` (outputs that are maps, not images). Where the network does not
    run (slices without brain, pixels outside the box) the ``map_keys`` outputs are zero and the others equal the
    input, so the residual is zero there.

    Called as ``inferer(inputs, network)`` (MONAI Label, Deploy) or ``inferer(inputs, network, mask=mask)``.

    Args:
        batch_size: slices per call of :meth:`reconstruct_slices`.
        erosion_iterations: iterations of the per-slice cross erosion of the brain mask.
        median_kernel: size of the 3D median filter (1 disables it).
        smooth_sigma: sigma in voxels of the Gaussian smoothing of the map after the median filter (0 disables it).
        seed: seed of all noise, so repeated calls give the same map; None draws fresh noise.
        amp: run the network under autocast (fp16 on CUDA, bf16 on CPU), see :meth:`autocast`.
        brain_box_multiple: run each slice on its brain's bounding box only (sides rounded up to this multiple), as
            networks trained on brain-box crops (``configs/brain_crop.json``) expect; None runs whole slices.
    """

    output_keys: tuple[str, ...] = ("reconstruction",)
    reconstruction_key: str = "reconstruction"
    weight_key: str | None = None
    map_keys: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 50,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        smooth_sigma: float = 0.0,
        seed: int | None = 0,
        amp: bool = False,
        brain_box_multiple: int | None = None,
    ) -> None:
        super().__init__()
        if not smooth_sigma >= 0:  # checked here too: before any network runs
            raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma}")
        self.batch_size = batch_size
        self.erosion_iterations = erosion_iterations
        self.median_kernel = median_kernel
        self.smooth_sigma = smooth_sigma
        self.seed = seed
        self.amp = amp
        self.brain_box_multiple = brain_box_multiple

    @property
    @abstractmethod
    def network_passes_per_slice(self) -> int:
        """Network evaluations per slice."""

    @abstractmethod
    def reconstruct_slices(
        self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """The method itself: slices (N, 1, H, W) in [0, 1] and their boolean brain masks (N, 1, H, W) to the
        outputs ``output_keys``, each (N, 1, H, W)."""

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of the network passes: fp16 on CUDA, bf16 elsewhere, enabled by ``amp``."""
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.autocast(device.type, dtype=dtype, enabled=self.amp)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of all noise of one call: seeded with ``seed``, or None (fresh noise)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    @torch.inference_mode()
    def run_slices(
        self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`reconstruct_slices` on a slice stack (N, 1, H, W), ``batch_size`` at a time, drawing the noise from
        ``generator`` (default: :meth:`generator`); returns ``output_keys``, each (N, 1, H, W)."""
        if slices.shape[0] == 0:  # no brain: nothing to run
            return {k: torch.zeros_like(slices) for k in self.output_keys}
        generator = generator or self.generator(slices.device)
        n = self.batch_size
        batches = [
            self.reconstruct_slices(slices[i : i + n], brain[i : i + n], network, generator)
            for i in range(0, slices.shape[0], n)
        ]
        return {k: torch.cat([b[k] for b in batches]) for k in self.output_keys}

    def outside(self, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """How output ``key`` is filled where the network does not run: zeros for maps, the input for images."""
        return torch.zeros_like if key in self.map_keys else torch.clone

    def slice_boxes(self, brain: torch.Tensor) -> list[tuple[slice, slice]]:
        """The region each slice of a stack (N, 1, H, W) is run on: with ``brain_box_multiple`` its own brain box (as
        ``configs/brain_crop.json`` crops each training slice), else the whole slice."""
        if not self.brain_box_multiple:
            return [(slice(0, brain.shape[2]), slice(0, brain.shape[3]))] * brain.shape[0]
        return [brain_box(b[None], self.brain_box_multiple) for b in brain]

    def run_volumes(self, volumes: torch.Tensor, brain: torch.Tensor, network: nn.Module) -> dict[str, torch.Tensor]:
        """:meth:`run_slices` on the brain slices of volumes (B, 1, H, W, D) with boolean brain masks, each slice on
        its region (:meth:`slice_boxes`): slices whose regions have one size are run together, smaller sizes first,
        with one generator for the call. Returns ``output_keys`` as volumes (B, 1, H, W, D)."""
        slices, index = stack_slices(volumes, brain)
        slice_brain = brain.permute(0, 4, 1, 2, 3)[index]
        boxes = self.slice_boxes(slice_brain)
        sizes = [(rows.stop - rows.start, cols.stop - cols.start) for rows, cols in boxes]
        values = {key: self.outside(key)(slices) for key in self.output_keys}
        generator = self.generator(slices.device)
        for size in sorted(set(sizes)):
            members = [i for i, s in enumerate(sizes) if s == size]
            crops = [torch.stack([x[i][:, boxes[i][0], boxes[i][1]] for i in members]) for x in (slices, slice_brain)]
            for key, value in self.run_slices(*crops, network, generator).items():
                for crop, i in zip(value, members, strict=True):
                    values[key][i][:, boxes[i][0], boxes[i][1]] = crop
        full = {}
        for key, value in values.items():
            full[key] = self.outside(key)(volumes)
            full[key].permute(0, 4, 1, 2, 3)[index] = value
        return full

    def __call__(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args,
        mask: torch.Tensor | None = None,
        return_reconstruction: bool = False,
        return_intermediates: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        """
        Args:
            inputs: volumes (B, 1, H, W, D) in [0, 1] (axial slices along D), or a slice stack (N, 1, H, W).
            network: the method's network.
            mask: brain masks shaped like ``inputs``; without one, the foreground ``inputs > 0`` is used.
            return_reconstruction: also return the reconstruction (the ``reconstruction_key`` output).
            return_intermediates: return a dict ``{"pred": map, **outputs}`` (keys ``output_keys``).

        Returns:
            the anomaly map shaped like ``inputs`` (and the reconstruction), or the dict.
        """
        volumes, brain, restore = slice_volumes(inputs, mask)
        outputs = self.run_volumes(volumes, brain, network)
        weight = outputs[self.weight_key] if self.weight_key else None
        recon = outputs[self.reconstruction_key]
        maps = residual_anomaly_map(
            volumes, recon, brain, self.erosion_iterations, self.median_kernel, weight, self.smooth_sigma
        )
        if return_intermediates:
            return {"pred": restore(maps), **{k: restore(v) for k, v in outputs.items()}}
        return (restore(maps), restore(recon)) if return_reconstruction else restore(maps)
