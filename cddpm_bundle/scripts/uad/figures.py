"""Figures of an evaluation: slice overlays and the pooled precision-recall curve (matplotlib, Agg backend).

Axial slices ``volume[:, :, z]`` of (H, W, D) volumes are drawn transposed with the origin at the lower left, so
for RAS-oriented arrays left-right runs horizontally and anterior is up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import MapTransform  # noqa: E402

from .data import case_name  # noqa: E402
from .files import atomic_write_figure  # noqa: E402
from .metrics import average_precision, binarise, precision_recall_curve  # noqa: E402

__all__ = ["SaveOverlayd", "save_overlay", "save_pr_curve"]

N_OVERLAY_SLICES = 3
MAX_CURVE_POINTS = 4000
GT_COLOUR, PRED_COLOUR = "#00e5ff", "#ff8c00"


def _default_slices(seg: np.ndarray | None, brain: np.ndarray) -> list[int]:
    """Axial slices with the largest lesion area, else evenly spaced slices through the brain."""
    if seg is not None and np.any(seg):
        area = (np.asarray(seg) != 0).sum(axis=(0, 1))
        return sorted(int(z) for z in np.argsort(area, kind="stable")[::-1][:N_OVERLAY_SLICES] if area[z] > 0)
    with_brain = np.flatnonzero(brain.any(axis=(0, 1)))
    if with_brain.size == 0:
        with_brain = np.arange(brain.shape[-1])
    picks = np.linspace(with_brain[0], with_brain[-1], N_OVERLAY_SLICES + 2)[1:-1]
    return sorted({int(round(z)) for z in picks})


def _show(ax: plt.Axes, image: np.ndarray, **kwargs):
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)


def _outline(ax: plt.Axes, binary: np.ndarray, colour: str, width: float) -> None:
    if binary.any():
        ax.contour(binary.T.astype(float), levels=[0.5], colors=colour, linewidths=width, origin="lower")


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    reconstruction: np.ndarray | None = None,
    seg: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    threshold: float | None = None,
    slices: Sequence[int] | None = None,
    title: str | None = None,
    min_component_size: int = 8,
) -> None:
    """Save a PNG with one row per axial slice: input | reconstruction | anomaly map | input with outlines.

    The last column outlines the ground truth (cyan) and, given ``threshold``, the prediction (orange): the
    binarisation used by the metrics (``anomaly_map > threshold`` in the mask, small 3D components removed).

    Args:
        path: output PNG, written atomically.
        image, anomaly_map: (H, W, D) input in [0, 1] and its anomaly map.
        reconstruction, seg, mask: optional (H, W, D) reconstruction, lesion segmentation and brain mask.
        threshold: operating threshold of the anomaly map.
        slices: axial indices; default the slices with the largest lesion area, or evenly spaced brain slices.
        title: figure title.
        min_component_size: components of fewer voxels are dropped from the predicted outline.
    """
    image, anomaly_map = np.asarray(image, dtype=np.float64), np.asarray(anomaly_map, dtype=np.float64)
    brain = np.asarray(mask) != 0 if mask is not None else image > 0
    slices = list(slices) if slices is not None else _default_slices(seg, brain)
    pred = None if threshold is None else binarise(anomaly_map, brain, threshold, min_component_size)
    in_brain = anomaly_map[brain] if brain.any() else anomaly_map.ravel()
    vmax = max(float(np.percentile(in_brain, 99.9)), threshold or 0.0, 1e-6)

    columns = ["input", *(["reconstruction"] if reconstruction is not None else []), "anomaly map", "outlines"]
    fig, axes = plt.subplots(len(slices), len(columns), figsize=(2.8 * len(columns) + 0.6, 2.8 * len(slices)))
    axes = np.atleast_2d(axes)
    for row, z in zip(axes, slices, strict=True):
        cells = dict(zip(columns, row, strict=True))
        _show(cells["input"], image[..., z], cmap="gray", vmin=0.0, vmax=1.0)
        cells["input"].set_ylabel(f"slice {z}")
        if reconstruction is not None:
            _show(cells["reconstruction"], np.asarray(reconstruction)[..., z], cmap="gray", vmin=0.0, vmax=1.0)
        heat = _show(cells["anomaly map"], anomaly_map[..., z], cmap="inferno", vmin=0.0, vmax=vmax)
        colorbar = fig.colorbar(heat, ax=cells["anomaly map"], fraction=0.046, pad=0.03)
        if threshold is not None:
            colorbar.ax.axhline(threshold, color="black", linewidth=3)  # threshold mark, visible on any colour
            colorbar.ax.axhline(threshold, color="white", linewidth=1)
        _show(cells["outlines"], image[..., z], cmap="gray", vmin=0.0, vmax=1.0)
        if seg is not None:
            _outline(cells["outlines"], np.asarray(seg)[..., z] != 0, GT_COLOUR, 2.0)
        if pred is not None:
            _outline(cells["outlines"], pred[..., z], PRED_COLOUR, 1.0)
    for ax, name in zip(axes[0], columns, strict=True):
        ax.set_title("input + outlines" if name == "outlines" else name, fontsize=10)
    handles = [Line2D([], [], color=GT_COLOUR, label="ground truth")] if seg is not None else []
    if threshold is not None:
        handles.append(Line2D([], [], color=PRED_COLOUR, label=f"prediction (> {threshold:.3g})"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 1))
    atomic_write_figure(fig, path, dpi=110)


def save_pr_curve(
    path: str | os.PathLike,
    scores: np.ndarray,
    labels: np.ndarray,
    operating_points: Mapping[str, float] | None = None,
) -> None:
    """Save the precision-recall curve of ``scores`` vs binary ``labels`` (flat arrays) with AUPRC in the legend.

    Each named threshold ``t`` of ``operating_points`` is marked at the precision and recall of ``scores > t``
    (voxel level, before small-component removal).
    """
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel() != 0
    precision, recall, _ = precision_recall_curve(scores, labels)
    if precision.size > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, precision.size - 1, MAX_CURVE_POINTS).astype(int))
        precision, recall = precision[keep], recall[keep]
    n_points = len(operating_points or {})
    fig, ax = plt.subplots(figsize=(6, 5.6 + 0.2 * n_points))
    ax.plot(
        np.r_[0.0, recall],
        np.r_[precision[0], precision],
        drawstyle="steps-pre",
        color="black",
        label=f"AUPRC = {average_precision(scores, labels):.3f}",
    )
    ax.axhline(labels.mean(), color="grey", linestyle="--", linewidth=1, label=f"prevalence = {labels.mean():.3f}")
    n_pos = int(labels.sum())
    for (name, t), colour in zip((operating_points or {}).items(), plt.cm.tab10.colors, strict=False):
        pred = scores > t
        tp = int((pred & labels).sum())
        op_precision = tp / int(pred.sum()) if pred.any() else 1.0
        ax.plot(
            tp / n_pos,
            op_precision,
            "o",
            color=colour,
            markersize=8,
            markeredgecolor="black",
            label=f"{name} (t = {t:.3g}): P = {op_precision:.2f}, R = {tp / n_pos:.2f}",
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="recall",
        ylabel="precision",
        title=f"Pooled in-brain voxels ({labels.size} voxels)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)


class SaveOverlayd(MapTransform):
    """Save ``<case>_overlay.png`` (input | anomaly map | outlines) for each item, on the model grid.

    Args:
        output_dir: folder of the PNGs.
        threshold: calibrated threshold for the predicted outline, or None.
        image_key, map_key, mask_key: keys of the input (1, H, W, D) in [0, 1], its anomaly map and brain mask.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        threshold: float | None = None,
        image_key: str = "image",
        map_key: str = "pred",
        mask_key: str = "mask",
    ) -> None:
        super().__init__([image_key, map_key])
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.image_key, self.map_key, self.mask_key = image_key, map_key, mask_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d[self.image_key]
        name = case_name(image.meta.get("filename_or_obj", "case")) if isinstance(image, MetaTensor) else "case"
        volume = lambda x: np.asarray(torch.as_tensor(x).detach().float().cpu())[0]  # noqa: E731
        mask = volume(d[self.mask_key]) > 0 if self.mask_key in d else None
        save_overlay(
            self.output_dir / f"{name}_overlay.png",
            volume(image),
            volume(d[self.map_key]),
            mask=mask,
            threshold=self.threshold,
            title=name,
        )
        return d
