"""Plumbing that lets ``inference.json`` save the inferer's stage outputs (mask, stitched and inpainted images)."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import Invertd, MapTransform, SaveImaged

from .inferer import STAGE_KEYS
from .uad.inference import MaskedPrepareBatch
from .uad.io import AtomicNibabelWriter

__all__ = ["FlattenStagesd", "SaveStagesd", "StagesPrepareBatch"]

BINARY_STAGES = ("stitch_mask",)  # inverted with nearest neighbours, saved as uint8
STAGE_POSTFIXES = {"reconstruction": "stage1_reconstruction"}  # file postfix where it is not the key


class StagesPrepareBatch(MaskedPrepareBatch):
    """``MaskedPrepareBatch`` that also asks the inferer for its stage outputs when ``return_intermediates`` is set.

    ``SupervisedEvaluator`` then calls ``inferer(image, network, mask=mask, return_intermediates=True)`` and its
    ``pred`` becomes the inferer's dict ``{"pred": map, "reconstruction", "likelihood", ...}`` (see
    :class:`FlattenStagesd`).
    """

    def __init__(self, return_intermediates: bool = False, image_key: str = "image", mask_key: str = "mask") -> None:
        super().__init__(image_key=image_key, mask_key=mask_key)
        self.return_intermediates = return_intermediates

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, tuple, dict]:
        image, target, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        if self.return_intermediates:
            extra["return_intermediates"] = True
        return image, target, args, extra


class FlattenStagesd(MapTransform):
    """Move the entries of a dict-valued ``key`` (the inferer's stage outputs) to the top level; tensors pass.

    After it, ``pred`` is the anomaly map again and every stage output has its own key for ``Invertd``/``SaveImaged``.
    """

    def __init__(self, keys: KeysCollection = "pred") -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], Mapping):
                d.update(d.pop(key))
        return d


class SaveStagesd(MapTransform):
    """Write the stage outputs (``STAGE_KEYS``, those present) in the input's geometry, each as
    ``<case>_<postfix>.nii.gz`` beside the anomaly map: inverted through ``preprocessing`` (nearest neighbours and
    uint8 for the binary stitch mask, linear and float32 otherwise), written atomically.

    Args:
        preprocessing: the transforms that brought the input onto the model grid.
        output_dir: the folder of the anomaly maps.
        orig_key: the preprocessed input whose applied operations are inverted.
    """

    def __init__(self, preprocessing: Callable, output_dir: str | os.PathLike, orig_key: str = "image") -> None:
        super().__init__(STAGE_KEYS, allow_missing_keys=True)
        binary = [key in BINARY_STAGES for key in STAGE_KEYS]
        self.invert = Invertd(
            STAGE_KEYS, preprocessing, orig_key, nearest_interp=binary, to_tensor=True, allow_missing_keys=True
        )
        self.savers = {
            key: SaveImaged(
                key,
                output_dir=output_dir,
                output_postfix=STAGE_POSTFIXES.get(key, key),
                output_ext=".nii.gz",
                output_dtype=torch.uint8 if is_binary else torch.float32,
                resample=False,
                separate_folder=False,
                print_log=False,
                writer=AtomicNibabelWriter,
            )
            for key, is_binary in zip(STAGE_KEYS, binary, strict=True)
        }

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = self.invert(dict(data))
        for key in self.key_iterator(d):
            d = self.savers[key](d)
        return d
