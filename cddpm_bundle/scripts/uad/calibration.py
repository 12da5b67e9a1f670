"""Threshold calibration on validation volumes only, shared by both bundles (numpy, CPU, method-agnostic).

Two kinds of threshold ``t`` for ``anomaly_map > t`` (before small-component removal, see ``metrics.binarise``):

- ``best_dice_val``: the best Dice over the pooled in-brain voxels of labelled validation volumes, as in Behrendt
  et al., Guided reconstruction with conditioned diffusion models for unsupervised anomaly detection in brain MRIs,
  Comput. Biol. Med. 186 (2025) 109660;
- ``fpr_<p>``: label-free, the ``1 - p/100`` quantile of the pooled in-brain scores of healthy volumes.

Test labels never enter a threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import average_precision, best_dice, in_brain_voxels

__all__ = [
    "BEST_DICE",
    "best_dice_calibration",
    "calibrate_thresholds",
    "default_threshold",
    "fpr_threshold",
    "has_lesion",
    "threshold_name",
]

logger = logging.getLogger(__name__)

BEST_DICE = "best_dice_val"


def threshold_name(fpr: float) -> str:
    """Name of the label-free threshold at false-positive rate ``fpr``, e.g. ``0.05 -> "fpr_5"``."""
    return f"fpr_{fpr * 100:g}"


def has_lesion(case: Mapping[str, Any]) -> bool:
    """Whether a case ``{"seg", "mask", ...}`` has a lesion voxel inside the brain (``seg`` None: healthy)."""
    return case.get("seg") is not None and bool(
        np.any((np.asarray(case["seg"]) != 0) & (np.asarray(case["mask"]) != 0))
    )


def best_dice_calibration(
    maps: Sequence[np.ndarray], segs: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> dict[str, float]:
    """The best Dice over the pooled in-brain voxels of labelled validation volumes, its threshold, and the AUPRC of
    those voxels: the validation figures to choose settings on (the test split only reports).

    Args:
        maps, segs, masks: lists of (H, W, D) anomaly maps, lesion segmentations and brain masks.

    Returns:
        ``{"threshold", "dice", "auprc"}``: ``anomaly_map > threshold`` (before small-component removal) reaches
        ``dice``.
    """
    scores, labels = in_brain_voxels(maps, masks), in_brain_voxels(segs, masks) != 0
    if not labels.any():
        raise ValueError("best-Dice calibration needs lesion voxels inside the brain masks.")
    threshold, dice = best_dice(scores, labels)
    return {"threshold": threshold, "dice": dice, "auprc": average_precision(scores, labels)}


def fpr_threshold(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr: float) -> float:
    """Label-free threshold: the ``1 - fpr`` quantile of the pooled in-brain scores of healthy validation volumes.

    Uses the "higher" order statistic, so at most a fraction ``fpr`` of those voxels satisfies ``score > t``.

    Args:
        maps, masks: lists of (H, W, D) anomaly maps and brain masks of healthy volumes.
        fpr: target voxel false-positive rate in (0, 1).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}.")
    return float(np.quantile(in_brain_voxels(maps, masks).astype(np.float64), 1.0 - fpr, method="higher"))


def calibrate_thresholds(
    labelled: Sequence[Mapping[str, Any]], healthy: Sequence[Mapping[str, Any]], fprs: Sequence[float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Best-Dice threshold from labelled validation cases and one label-free threshold per FPR from healthy ones.

    A missing kind of validation case skips its calibration with a warning.

    Returns:
        the thresholds by name, and the labelled validation figures ``{"best_dice", "auprc"}`` (pooled in-brain
        voxels; empty without labelled cases).
    """
    thresholds: dict[str, float] = {}
    validation: dict[str, float] = {}
    if labelled:
        maps, segs, masks = ([c[k] for c in labelled] for k in ("anomaly_map", "seg", "mask"))
        best = best_dice_calibration(maps, segs, masks)
        thresholds[BEST_DICE] = best["threshold"]
        validation = {"best_dice": best["dice"], "auprc": best["auprc"]}
    else:
        logger.warning("No labelled validation case (non-empty seg): best-Dice threshold NOT calibrated.")
    if healthy:
        maps, masks = [c["anomaly_map"] for c in healthy], [c["mask"] for c in healthy]
        thresholds.update({threshold_name(f): fpr_threshold(maps, masks, f) for f in fprs})
    else:
        logger.warning("No healthy validation case (seg missing or empty): label-free FPR thresholds NOT calibrated.")
    return thresholds, validation


def default_threshold(thresholds: Mapping[str, float]) -> str | None:
    """Name of the threshold inference uses: best Dice if calibrated, else 5% FPR, else the first label-free one."""
    for name in (BEST_DICE, threshold_name(0.05)):
        if name in thresholds:
            return name
    return next(iter(thresholds), None)
