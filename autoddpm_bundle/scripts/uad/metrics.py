"""UAD metrics of anomaly maps, shared by both bundles (numpy/scipy, CPU, method-agnostic).

Conventions:

- volumes are (H, W, D) arrays, D the axial slices; every voxel metric is computed on in-brain voxels
  (``mask != 0``), and lesion labels are ``seg != 0`` restricted to the brain;
- a map is binarised as ``anomaly_map > threshold`` inside the brain mask, then 3D connected components
  (26-connectivity) of fewer than ``min_component_size`` voxels are removed (:func:`binarise`);
- ``oracle_dice`` is the best Dice of one test volume over all thresholds (uses that volume's labels, so it is
  an upper bound, not a deployable number); deployable thresholds come from validation data (``calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "average_precision",
    "best_dice",
    "binarise",
    "dice",
    "in_brain_voxels",
    "l1_ratio",
    "precision_recall_curve",
    "reconstruction_metrics",
    "remove_small_components",
    "roc_auc",
    "slice_detection_auroc",
    "summarise",
    "volume_metrics",
]

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


# ---------------------------------------------------------------------------------------------------------------
# voxel-level metrics from one sort


class _Counts(NamedTuple):
    """Counts when predicting ``scores >= t`` for each distinct score ``t`` in decreasing order, each (M,)."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> _Counts:
    """Sort once and accumulate true/false positives per distinct score of (N,) ``scores`` and binary ``labels``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() != 0
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.shape} vs {labels.shape}.")
    order = np.argsort(scores, kind="stable")[::-1]
    scores, labels = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels, dtype=np.int64)[last_of_group]
    return _Counts(scores[last_of_group], tps, last_of_group + 1 - tps)


def _average_precision(c: _Counts) -> float:
    if c.tps.size == 0 or c.tps[-1] == 0:
        return math.nan
    return float(np.sum(np.diff(c.tps / c.tps[-1], prepend=0.0) * c.tps / (c.tps + c.fps)))


def _roc_auc(c: _Counts) -> float:
    if c.tps.size == 0 or c.tps[-1] == 0 or c.fps[-1] == 0:
        return math.nan
    return float(np.trapezoid(np.r_[0.0, c.tps / c.tps[-1]], np.r_[0.0, c.fps / c.fps[-1]]))


def _best_dice(c: _Counts) -> tuple[float, float]:
    if c.tps.size == 0 or c.tps[-1] == 0:
        return math.nan, math.nan
    dices = 2.0 * c.tps / (c.tps + c.fps + c.tps[-1])
    best = int(np.argmax(dices))
    threshold = c.thresholds[best + 1] if best + 1 < c.thresholds.size else c.thresholds[-1] - 1.0
    return float(threshold), float(dices[best])


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of ``scores >= t`` at every distinct score ``t`` (decreasing ``t``).

    Args:
        scores, labels: (N,) scores and binary labels.

    Returns:
        precision (M,), recall (M,), thresholds (M,); recall is NaN when there is no positive label.
    """
    c = _ranked_counts(scores, labels)
    n_pos = c.tps[-1] if c.tps.size else 0
    recall = c.tps / n_pos if n_pos else np.full(c.tps.shape, np.nan)
    return c.tps / (c.tps + c.fps), recall, c.thresholds


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, step-wise like ``sklearn.metrics.average_precision_score``: sum of P_n (R_n - R_{n-1}).

    Args:
        scores, labels: (N,) scores and binary labels.

    Returns:
        AP in [0, 1]; NaN when there is no positive label.
    """
    return _average_precision(_ranked_counts(scores, labels))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids between distinct scores, so ties count one half, as in sklearn).

    Args:
        scores, labels: (N,) scores and binary labels.

    Returns:
        AUROC in [0, 1]; NaN when only one class is present.
    """
    return _roc_auc(_ranked_counts(scores, labels))


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap ``2 |P & T| / (|P| + |T|)`` of two binary arrays; 1.0 when both are empty."""
    pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
    denominator = int(pred.sum()) + int(target.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / denominator


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Exact best Dice over all thresholds (one sort, cumulative sums).

    Args:
        scores, labels: (N,) scores and binary labels.

    Returns:
        ``(threshold, dice)`` such that ``scores > threshold`` reaches ``dice``; the threshold is the next lower
        distinct score (or ``min(scores) - 1`` when predicting everything is best). ``(nan, nan)`` without a
        positive label.
    """
    return _best_dice(_ranked_counts(scores, labels))


def in_brain_voxels(volumes: Sequence[np.ndarray | None], masks: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenated in-brain voxels of several (H, W, D) volumes (``None`` stands for an all-zero volume)."""
    if len(volumes) != len(masks):
        raise ValueError(f"got {len(volumes)} volumes but {len(masks)} masks.")
    if not masks:
        raise ValueError("at least one volume is needed.")
    values = []
    for volume, mask in zip(volumes, masks, strict=True):
        brain = np.asarray(mask) != 0
        values.append(np.zeros(int(brain.sum())) if volume is None else np.asarray(volume)[brain])
    return np.concatenate(values)


# ---------------------------------------------------------------------------------------------------------------
# binarisation


def remove_small_components(binary: np.ndarray, min_size: int = 8) -> np.ndarray:
    """Remove 3D connected components (26-connectivity) of fewer than ``min_size`` voxels.

    Args:
        binary: (H, W, D) binary array.
        min_size: smallest component size that is kept (1 or less keeps every component).

    Returns:
        (H, W, D) bool array.
    """
    binary = np.asarray(binary) != 0
    if min_size <= 1 or not binary.any():
        return binary
    labelled, _ = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
    keep = np.bincount(labelled.ravel()) >= min_size
    keep[0] = False
    return keep[labelled]


def binarise(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float, min_component_size: int = 8) -> np.ndarray:
    """Predicted lesion voxels: ``anomaly_map > threshold`` inside ``mask``, components of fewer than
    ``min_component_size`` voxels removed; (H, W, D)."""
    pred = (np.asarray(anomaly_map, dtype=np.float64) > threshold) & (np.asarray(mask) != 0)
    return remove_small_components(pred, min_component_size)


# ---------------------------------------------------------------------------------------------------------------
# per-volume metrics


def volume_metrics(
    anomaly_map: np.ndarray,
    seg: np.ndarray | None,
    mask: np.ndarray,
    thresholds: Mapping[str, float],
    min_component_size: int = 8,
) -> dict[str, float]:
    """Metrics of one volume.

    Keys: ``dice@<name>``, ``fpr@<name>`` (false-positive rate among healthy in-brain voxels), ``tp_voxels@<name>`` and
    ``fp_voxels@<name>`` (true and false positives) per threshold,
    ``auprc``, ``auroc``, ``oracle_dice`` (best Dice of this volume over all thresholds, before component
    removal), ``n_brain_voxels``, ``n_lesion_voxels``. Lesion metrics are NaN when the volume has no lesion voxel.

    Args:
        anomaly_map, seg, mask: (H, W, D) arrays; ``seg=None`` means a healthy volume.
        thresholds: name -> threshold.
        min_component_size: the smallest component size kept after binarisation.
    """
    brain = np.asarray(mask) != 0
    target = np.zeros_like(brain) if seg is None else (np.asarray(seg) != 0) & brain
    n_lesion, n_healthy = int(target.sum()), int(brain.sum() - target.sum())
    has_lesion = n_lesion > 0
    row: dict[str, float] = {}
    for name, threshold in thresholds.items():
        pred = binarise(anomaly_map, brain, threshold, min_component_size)
        row[f"dice@{name}"] = dice(pred, target) if has_lesion else math.nan
        false_positives = int((pred & ~target).sum())
        row[f"fpr@{name}"] = false_positives / n_healthy if n_healthy else math.nan
        row[f"tp_voxels@{name}"] = int((pred & target).sum())
        row[f"fp_voxels@{name}"] = false_positives
    counts = _ranked_counts(np.asarray(anomaly_map)[brain], target[brain]) if has_lesion else None
    row["auprc"] = _average_precision(counts) if counts else math.nan
    row["auroc"] = _roc_auc(counts) if counts else math.nan
    row["oracle_dice"] = _best_dice(counts)[1] if counts else math.nan
    row["n_brain_voxels"] = int(brain.sum())
    row["n_lesion_voxels"] = n_lesion
    return row


def slice_detection_auroc(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], segs: Sequence[np.ndarray | None]
) -> float:
    """Slice-level detection AUROC pooled over volumes.

    Score of an axial slice: mean in-brain anomaly score; label: the slice has a lesion voxel; slices without
    brain are skipped; ``seg=None`` means a healthy volume. NaN when only one class occurs.
    """
    scores, labels = [], []
    for amap, mask, seg in zip(maps, masks, segs, strict=True):
        brain = np.asarray(mask) != 0
        area = brain.sum(axis=(0, 1))
        keep = area > 0
        scores.append((np.asarray(amap, dtype=np.float64) * brain).sum(axis=(0, 1))[keep] / area[keep])
        lesion = np.zeros(area.shape, dtype=bool) if seg is None else (np.asarray(seg) != 0).any(axis=(0, 1))
        labels.append(lesion[keep])
    return roc_auc(np.concatenate(scores), np.concatenate(labels))


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    w = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return w / w.sum()


def _ssim_slices(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Mean SSIM of each axial slice: Gaussian window (11, sigma 1.5), valid region only, like MONAI's SSIMMetric.

    Args:
        x, y: (H, W, S) stacks of slices (H, W >= 11).

    Returns:
        (S,) SSIM per slice.
    """
    window, r = _gaussian_window(), SSIM_WINDOW // 2

    def local_mean(a: np.ndarray) -> np.ndarray:
        a = ndimage.correlate1d(a, window, axis=0, mode="constant")
        return ndimage.correlate1d(a, window, axis=1, mode="constant")[r:-r, r:-r]

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    ssim = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(axis=(0, 1))


def reconstruction_metrics(image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Reconstruction quality of one (healthy) volume.

    ``l1``: mean ``|x - x_hat|`` in the brain; ``ssim``: 2D SSIM (data range 1) of the whole slice after setting
    both volumes to zero outside the brain, averaged over slices with brain; ``psnr``: ``10 log10(1 / MSE)`` with
    the in-brain MSE (inf for a perfect reconstruction).

    Args:
        image, reconstruction, mask: (H, W, D) arrays, intensities in [0, 1].
    """
    brain = np.asarray(mask) != 0
    x = np.asarray(image, dtype=np.float64) * brain
    y = np.asarray(reconstruction, dtype=np.float64) * brain
    mse = float(np.mean((x - y)[brain] ** 2))
    with_brain = brain.any(axis=(0, 1))
    return {
        "l1": float(np.mean(np.abs(x - y)[brain])),
        "ssim": float(np.mean(_ssim_slices(x[..., with_brain], y[..., with_brain]))),
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
    }


def l1_ratio(residual: np.ndarray, seg: np.ndarray, mask: np.ndarray) -> float:
    """Mean residual in lesion voxels / mean residual in healthy brain voxels (NaN without lesion or healthy voxel).

    Args:
        residual, seg, mask: (H, W, D) arrays; lesion voxels are ``seg != 0`` inside the brain.
    """
    brain = np.asarray(mask) != 0
    lesion = (np.asarray(seg) != 0) & brain
    healthy = brain & ~lesion
    if not lesion.any() or not healthy.any():
        return math.nan
    residual = np.asarray(residual, dtype=np.float64)
    healthy_mean = residual[healthy].mean()
    return float(residual[lesion].mean() / healthy_mean) if healthy_mean > 0 else math.inf


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation (ddof 0) and count over volumes of every numeric key, ignoring NaN.

    Returns:
        ``{key: {"mean": ..., "std": ..., "n": ...}}``; mean and std are NaN when every value is NaN.
    """
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if _is_number(rows, k)]
    summary = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        summary[key] = {
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std()) if values.size else math.nan,
            "n": int(values.size),
        }
    return summary


def pooled_dice(rows: Sequence[Mapping[str, Any]], name: str) -> float:
    """Dice over the in-brain voxels of all volumes pooled, from their :func:`volume_metrics` rows at threshold
    ``name``: ``2 TP / (2 TP + FP + FN)`` summed over the volumes; NaN without lesion voxels."""
    lesion = sum(row["n_lesion_voxels"] for row in rows)
    if not lesion:
        return math.nan
    tp, fp = (sum(row[f"{kind}_voxels@{name}"] for row in rows) for kind in ("tp", "fp"))
    return 2 * tp / (tp + fp + lesion)


def _is_number(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return all(isinstance(row.get(key, math.nan), int | float | np.number) for row in rows)
