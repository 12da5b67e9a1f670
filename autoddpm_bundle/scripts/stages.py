"""Plumbing that lets ``inference.json`` save the inferer's stage outputs (mask, stitched and inpainted images)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .uad.inference import MaskedPrepareBatch

__all__ = ["FlattenStagesd", "StagesPrepareBatch"]


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
