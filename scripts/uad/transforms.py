"""Dictionary transforms of the shared data protocol that MONAI does not provide."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, RandomizableTransform, ResizeWithPadOrCropd, Spacingd
from scipy import ndimage

from .errors import InputError
from .metrics import binarise

__all__ = [
    "BinariseAnomalyd",
    "CheckAnomalyMapd",
    "CheckImaged",
    "DeriveBrainMaskd",
    "LabelAsPredd",
    "LoadMasksd",
    "PathSafeSpacingd",
    "ResizeToGridd",
    "check_anomaly_map",
    "RandGhostingd",
    "ScaleIntensityInMaskd",
    "source_file",
]

logger = logging.getLogger(__name__)


def source_file(img: torch.Tensor) -> str:
    """The file an image was loaded from, for error messages."""
    if isinstance(img, MetaTensor):
        return str(img.meta.get("filename_or_obj", "<unknown file>"))
    return "<array without metadata>"


def _as_volume(img: torch.Tensor) -> torch.Tensor:
    """(1, H, W) slice -> (1, H, W, 1) volume, with the 2D affine embedded in a 3D one (1 mm through-plane)."""
    volume = img.unsqueeze(-1)
    if isinstance(img, MetaTensor):
        affine_2d = img.affine.double()
        affine = torch.eye(4, dtype=torch.float64)
        affine[:2, :2] = affine_2d[:2, :2]
        affine[:2, 3] = affine_2d[:2, 2]
        volume = MetaTensor(volume.as_tensor(), meta=dict(img.meta))
        volume.affine = affine
        volume.meta["original_affine"] = affine.clone()
        volume.meta["spatial_shape"] = np.asarray(volume.shape[1:])
    return volume


class CheckImaged(MapTransform):
    """Validate loaded channel-first images and make 2D slices one-slice volumes.

    After loading and ``EnsureChannelFirstd``: every present key must be a single-channel 2D or 3D image
    without NaN/inf; ``mask`` and ``seg`` must share the image's shape and affine; the brain mask must not be empty.
    A 2D image (1, H, W) becomes a volume (1, H, W, 1), so 2D slice sets take the volume code path.

    Raises:
        ValueError naming the file and the problem.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask", "seg"),
        image_key: str = "image",
        mask_key: str = "mask",
        atol: float = 1e-3,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.mask_key = mask_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = source_file(img)
            if img.ndim not in (3, 4):
                raise InputError(
                    f"{name}: expected a 2D or 3D image, got {img.ndim - 1} spatial dimensions {tuple(img.shape[1:])}"
                )
            if img.shape[0] != 1:
                raise InputError(f"{name}: expected a single-channel image, got {img.shape[0]} channels (a 4D file?)")
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise InputError(f"{name}: contains NaN or infinite values")
            if img.ndim == 3:
                d[key] = _as_volume(img)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            if key == self.image_key:
                continue
            if d[key].shape != image.shape:
                raise InputError(
                    f"{source_file(d[key])}: {key} shape {tuple(d[key].shape[1:])} does not match "
                    f"image {source_file(image)} {tuple(image.shape[1:])}"
                )
            if isinstance(image, MetaTensor) and isinstance(d[key], MetaTensor):
                if not torch.allclose(image.affine.double(), d[key].affine.double(), atol=self.atol):
                    raise InputError(
                        f"{source_file(d[key])}: {key} geometry (affine) does not match image {source_file(image)}"
                    )
        if self.mask_key in d and not (d[self.mask_key] > 0).any():
            raise InputError(f"{source_file(d[self.mask_key])}: brain mask is empty")
        return d


class LoadMasksd(MapTransform):
    """Load the optional masks of an entry (brain mask, segmentation) that it has; ``DeriveBrainMaskd`` derives a
    missing brain mask.

    A step of its own beside the image's ``LoadImaged``: MONAI Label requires every key of each ``LoadImaged`` in its
    request, and sends only the image; MONAI Deploy drops ``LoadImage*`` steps and sends only the image too.

    Args:
        keys: the mask keys.
        loader_args: more arguments of ``LoadImaged``.
    """

    def __init__(self, keys: KeysCollection = ("mask", "seg"), **loader_args) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.loader = LoadImaged(self.keys, image_only=True, allow_missing_keys=True, **loader_args)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        return self.loader(data)


class PathSafeSpacingd(Spacingd):
    """``Spacingd`` that leaves the non-dictionary ``<key>_*`` entries alone.

    For a NIfTI image, MONAI's ``Spacingd`` calls ``.update`` on every entry named ``<key>_*``, expecting a meta
    dictionary; MONAI Label passes ``image_path`` as a string (and reads it back to write its result), so the entry is
    set aside while resampling and put back afterwards.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {
            k: d.pop(k) for k in list(d) if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], dict)
        }
        d = super().__call__(d, lazy=lazy)
        d.update(aside)
        return d


class ResizeToGridd(ResizeWithPadOrCropd):
    """``ResizeWithPadOrCropd`` to the protocol grid ``spatial_size`` (H, W, D); a one-slice input (a 2D slice, or a
    one-slice volume) stays one slice deep: the 2D protocol, whose median filter and erosion see one slice, instead of
    the slice padded into a D-deep volume that they would wipe out.

    Raises:
        InputError: a volume of several slices on a one-slice grid (``D`` = 1, the 2D protocol), which would keep only
            its middle slice.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], **kwargs) -> None:
        super().__init__(keys, spatial_size, **kwargs)
        self.grid = tuple(int(s) for s in spatial_size)
        self._lock = threading.Lock()

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        image = data[self.first_key(data)]
        depth = image.shape[-1]
        if self.grid[-1] == 1 and depth > 1:
            raise InputError(
                f"{source_file(image)}: a volume of {depth} slices on a one-slice grid (image_size {list(self.grid)}, "
                "the 2D protocol): give 2D slices, or an image_size with the volume's depth"
            )
        size = (*self.grid[:-1], 1 if depth == 1 else self.grid[-1])
        with self._lock:  # CacheDataset fills its cache from a thread pool: one size at a time
            self.padder.padder.spatial_size = size
            self.padder.cropper.roi_size = size
            return super().__call__(data, lazy)


class DeriveBrainMaskd(MapTransform):
    """Derive a foreground mask for images that come without a brain mask.

    The mask is the largest connected component of ``image > min + threshold * (robust max - min)`` with holes filled,
    per volume (relative to the minimum, so z-scored images with a negative background work too).
    For skull-stripped images this is the brain; otherwise it is the head, which the metadata records as
    ``mask_derived = True`` so results are not mistaken for brain-masked ones; the start-up pass over the cases
    (:func:`~uad.data.check_cases`) warns once for all such files.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "mask", threshold: float = 0.05) -> None:
        super().__init__([image_key], allow_missing_keys=False)
        self.image_key = image_key
        self.mask_key = mask_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.mask_key in d:
            return d
        image = d[self.image_key]
        array = np.asarray(torch.as_tensor(image).detach().cpu())[0]
        low = array.min()
        foreground = array > low + self.threshold * (np.percentile(array, 99.5) - low)
        labels, n = ndimage.label(foreground)
        if n == 0:
            raise InputError(f"{source_file(image)}: no foreground found to derive a brain mask from")
        largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
        mask = ndimage.binary_fill_holes(labels == largest)
        if mask.ndim == 3:  # also fill holes slice by slice (ventricles touching the volume border)
            mask = np.stack([ndimage.binary_fill_holes(mask[..., k]) for k in range(mask.shape[-1])], axis=-1)
        logger.debug("%s: no brain mask given, using a derived foreground mask", source_file(image))
        mask_t = torch.as_tensor(mask[None].astype(np.float32))
        if isinstance(image, MetaTensor):
            mask_t = MetaTensor(mask_t, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            mask_t.meta["mask_derived"] = True
            image.meta["mask_derived"] = True
        d[self.mask_key] = mask_t
        return d


class ScaleIntensityInMaskd(MapTransform):
    """Scale intensities to [0, 1] with the lower/upper percentiles inside the brain mask, clip, zero outside.

    Args:
        keys: image keys to scale.
        mask_key: brain mask key.
        lower, upper: percentiles (protocol: 1 and 99) computed over the brain voxels.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "mask",
        lower: float = 1.0,
        upper: float = 99.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        brain = d[self.mask_key] > 0
        for key in self.key_iterator(d):
            img = d[key]
            values = img[brain].float()
            if values.numel() == 0:
                raise InputError(f"{source_file(img)}: brain mask is empty after resampling")
            lo, hi = torch.quantile(values, torch.tensor([self.lower, self.upper], dtype=values.dtype) / 100.0)
            scaled = ((img - lo) / torch.clamp(hi - lo, min=1e-8)).clamp(0.0, 1.0)
            d[key] = scaled * brain
        return d


class RandGhostingd(RandomizableTransform, MapTransform):
    """MR ghosting artefact: scale every n-th k-space line along a random in-plane axis of each axial slice.

    Args:
        keys: image keys.
        prob: probability of applying the artefact.
        num_ghosts: range of the line period n (number of ghosts).
        intensity: range of the relative strength of the ghosts (0 = none, 1 = strong).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        num_ghosts: Sequence[int] = (4, 10),
        intensity: Sequence[float] = (0.1, 0.5),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.num_ghosts = num_ghosts
        self.intensity = intensity
        self._period = num_ghosts[0]
        self._strength = intensity[0]
        self._axis = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._period = int(self.R.randint(self.num_ghosts[0], self.num_ghosts[1] + 1))
        self._strength = float(self.R.uniform(*self.intensity))
        self._axis = int(self.R.randint(2))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            dim = 1 + self._axis  # (C, H, W[, D]): in-plane axes 1 and 2
            k = torch.fft.fftshift(torch.fft.fftn(torch.as_tensor(img).float(), dim=(1, 2)), dim=(1, 2))
            lines = torch.ones(img.shape[dim], device=k.device)
            lines[:: self._period] = 1.0 - self._strength
            shape = [1] * img.ndim
            shape[dim] = -1
            k = k * lines.view(shape)
            ghosted = torch.fft.ifftn(torch.fft.ifftshift(k, dim=(1, 2)), dim=(1, 2)).abs().to(img.dtype)
            d[key] = MetaTensor(ghosted, meta=img.meta) if isinstance(img, MetaTensor) else ghosted
        return d


class BinariseAnomalyd(MapTransform):
    """Binarise an anomaly map at a calibrated threshold and drop small connected components (protocol step 5).

    Writes ``out_key`` (uint8) only when ``threshold`` is not None, so inference without a calibrated threshold
    writes maps alone.

    Args:
        keys: anomaly map key, (1, H, W, D).
        threshold: the calibrated threshold, or None.
        mask_key: brain mask key; voxels outside are never anomalous.
        out_key: key of the binary output.
        min_component_size: the smallest component (26-connectivity) kept; smaller ones are removed.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        threshold: float | None = None,
        mask_key: str = "mask",
        out_key: str = "pred_mask",
        min_component_size: int = 8,
    ) -> None:
        super().__init__(keys)
        self.threshold = threshold
        self.mask_key = mask_key
        self.out_key = out_key
        self.min_component_size = min_component_size

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.threshold is None:
            return d
        for key in self.key_iterator(d):
            amap = d[key]
            array = np.asarray(torch.as_tensor(amap).detach().cpu().float())[0]
            mask = np.asarray(torch.as_tensor(d[self.mask_key]).detach().cpu())[0] > 0
            binary = binarise(array, mask, self.threshold, self.min_component_size).astype(np.uint8)[None]
            out = torch.as_tensor(binary)
            if isinstance(amap, MetaTensor):
                out = MetaTensor(out, meta=dict(amap.meta), applied_operations=list(amap.applied_operations))
            d[self.out_key] = out
        return d


def check_anomaly_map(amap: torch.Tensor, brain: torch.Tensor, name: str, may_be_zero: bool = False) -> None:
    """Refuse an anomaly map (1, H, W, D) that is not a result: non-finite values, or zero everywhere inside the
    brain mask ``brain`` (what a grid that does not fit the input gives, e.g. a 2D slice padded into a 3D volume and
    then filtered away).

    Args:
        may_be_zero: a zero map can be a result of the method (AutoDDPM: nothing flagged in stage 1, so nothing is
            re-sampled); it is then logged as a warning instead.

    Raises:
        InputError naming ``name``, the input file.
    """
    amap, brain = torch.as_tensor(amap), torch.as_tensor(brain) > 0
    if not torch.isfinite(amap).all():
        raise InputError(f"{name}: the anomaly map has NaN or infinite values (under autocast? try amp False)")
    if (amap[brain] != 0).any():
        return
    problem = (
        f"{name}: the anomaly map is zero everywhere inside the brain mask ({int(brain.sum())} voxels of the "
        f"{tuple(amap.shape[1:])} grid)"
    )
    if not may_be_zero:
        raise InputError(f"{problem}: not written; check image_size and pixdim against the input")
    logger.warning("%s: nothing was flagged, or image_size and pixdim do not fit the input", problem)


class CheckAnomalyMapd(MapTransform):
    """:func:`check_anomaly_map` on the maps under ``keys``, before they are binarised and written."""

    def __init__(self, keys: KeysCollection = "pred", mask_key: str = "mask", may_be_zero: bool = False) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.may_be_zero = may_be_zero

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        for key in self.key_iterator(data):
            name = source_file(data.get("image", data[key]))
            check_anomaly_map(data[key], data[self.mask_key], name, self.may_be_zero)
        return dict(data)


class LabelAsPredd(MapTransform):
    """Put the anomaly mask under ``keys`` when there is one, as the tools that show a bundle's ``pred`` expect.

    MONAI Label displays ``pred`` with the labels of ``network_data_format.outputs.pred.channel_def`` (0 background,
    1 anomaly) and MONAI Deploy casts it to uint8, so after the map has been written ``pred`` becomes the binary mask
    (``label_key``, from ``BinariseAnomalyd`` with a calibrated threshold). Without a threshold ``pred`` stays the
    anomaly map.
    """

    def __init__(self, keys: KeysCollection = "pred", label_key: str = "pred_mask") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.label_key in d:
            for key in self.key_iterator(d):
                d[key] = d[self.label_key]
        return d
