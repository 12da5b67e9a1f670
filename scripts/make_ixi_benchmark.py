#!/usr/bin/env python
"""Lesion-detection benchmark from real healthy IXI T1 mid-axial slices with synthetic lesions of known extent.

    python scripts/make_ixi_benchmark.py --ixi ../shared/data/ixi_t1_axial --out DIR [--seed 0]

Input: ``train/`` and ``val/`` folders of uint8 PNG slices (233 x 197 px, 1 mm, MNI152NLin2009cSym, skull on).

Brain masks: all slices share the MNI152 1 mm grid, so the brain mask of nilearn's MNI152 template serves every
subject. It is computed as ``nilearn.datasets.load_mni152_brain_mask`` does (template T1 / max > 0.2), from the T1
file bundled in the nilearn wheel (found by ``mni152.mni152_path``; nothing is downloaded). The axial
template slice and in-plane orientation are chosen by correlating the mean IXI slice with every axial template slice
under the 8 flips/transpositions (those giving the IXI shape when any do; otherwise all 8, centre-cropped/zero-padded
to it: both grids are 1 mm, so no interpolation is needed). Per subject: template mask (holes filled) AND image > 5 %
of its 99.5th percentile, holes filled, largest component.

Lesions: an irregular blob (smoothed random field thresholded inside a random ellipse, equivalent radius 4-15 mm,
Gaussian soft edge) fully inside the brain mask, its core mostly outside CSF; lesion intensity = local tissue
intensity (Gaussian smoothing of the image over non-CSF brain pixels) x (1 + s c) x exp(smooth noise of a few %),
blended in by the soft weight; polarity s = +1 (hyper) or -1 (hypo), contrast c in [0.15, 0.45]. Hyper lesions are
placed where no pixel exceeds the slice's 99.9th brain percentile (c is capped, and flagged, when no sampled place
allows the drawn c: bright white matter, often saturated in these PNGs, pushes them towards grey matter); hypo
lesions stay above the image minimum. Ground truth: blend weight >= 0.5. Values stay float, in the original range.

Written under DIR (NIfTI of shape (H, W, 1), identity 1 mm affine; images float32 on the original scale, masks uint8)::

    train/<id>_{t1,mask}.nii.gz                      every train/ slice, healthy
    calibration/<id>_mask.nii.gz, calibration/<id>_{hyper,hypo}_{t1,seg}.nii.gz   n_calibration val/ subjects, each
                                                     with both polarities
    calibration/<id>_t1.nii.gz                       n_healthy_calibration other val/ subjects, healthy
    test/<id>_mask.nii.gz, test/<id>_{hyper,hypo}_{t1,seg}.nii.gz   the other val/ subjects, each with both polarities
    datalist_{hyper,hypo,mixed}.json, manifest.json, ixi_benchmark.png

Each datalist is one lesion type calibrated on its own kind, as every data set of the paper's protocol is calibrated
on its own validation split: ``datalist_hyper.json`` validates on the hyperintense calibration lesions plus the
healthy calibration slices and tests on the hyperintense test lesions (likewise ``hypo``); ``mixed`` alternates the
polarities over the subjects in both sections.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lib.datalists import write_datalist
from lib.mni152 import MNI152_FILES
from lib.slices import brain_mask, largest_component, match_template, read_png, save_slice, subject_ids
from scipy import ndimage as ndi
from uad.files import atomic_write_figure, atomic_write_text

__all__ = ["build_ixi_benchmark", "insert_lesion", "main"]

CONTRAST_RANGE = (0.15, 0.45)
RADIUS_RANGE = (4.0, 15.0)
TISSUE_FRACTION = 0.6  # of the median brain intensity: darker pixels count as CSF
_POLARITY = {"hyper": 1.0, "hypo": -1.0}


def _blob(rng: np.random.Generator, radius: float, edge: float) -> np.ndarray:
    """Soft weight (square patch, centre = blob centre) of an irregular blob of equivalent radius ~``radius`` px."""
    ratio, theta = rng.uniform(1.0, 2.0), rng.uniform(0.0, np.pi)
    a, b = radius * np.sqrt(ratio), radius / np.sqrt(ratio)
    half = int(np.ceil(1.3 * a + 4 * edge)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    u, v = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    rho2 = (u / a) ** 2 + (v / b) ** 2
    field = ndi.gaussian_filter(rng.standard_normal(yy.shape), max(radius / 3.0, 1.5))
    hard = (1.0 - rho2 + 0.35 * field / max(field.std(), 1e-6) > 0) & (rho2 < 1.69)
    weight = ndi.gaussian_filter(largest_component(ndi.binary_fill_holes(hard)).astype(np.float32), edge)
    return np.where(weight > 1e-3, weight, 0.0).astype(np.float32)


def insert_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    polarity: str,
    contrast_range: tuple[float, float] = CONTRAST_RANGE,
    radius_range: tuple[float, float] = RADIUS_RANGE,
    tries: int = 500,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert one synthetic lesion; returns the float32 lesion image, the uint8 ground truth and its parameters.

    Up to ``tries`` random centres (blob support inside ``mask``) are tested in turn; the first one whose core
    (weight >= 0.5) is at most 10 % CSF-dark and where the drawn contrast keeps every pixel within its bound (hyper:
    max(99.9th brain percentile, pixel); hypo: min(image minimum, pixel)) is used. Otherwise the best tested one is
    used with the contrast capped to what it allows (``capped`` in the parameters).
    """
    s = _POLARITY[polarity]
    image, mask = image.astype(np.float64), mask > 0  # float64 inside, so that a capped lesion meets its bound
    upper, lower = float(np.percentile(image[mask], 99.9)), float(image.min())
    tissue = mask & (image > TISSUE_FRACTION * np.median(image[mask]))  # excludes CSF (dark in T1)
    dist = ndi.distance_transform_edt(mask)
    radius, edge = rng.uniform(*radius_range), rng.uniform(0.7, 1.5)
    for _ in range(20):  # shrink until the blob fits somewhere inside the brain
        patch = _blob(rng, radius, edge)
        offsets = np.argwhere(patch > 0)
        wv = patch[tuple(offsets.T)]
        offsets -= patch.shape[0] // 2
        candidates = np.argwhere(dist > np.sqrt((offsets**2).sum(axis=1)).max() + 1.0)
        if len(candidates):
            break
        radius *= 0.85
    else:
        raise ValueError("brain mask too small for a lesion")
    contrast = rng.uniform(*contrast_range)
    sigma, t = max(2.0, 0.5 * radius), tissue.astype(np.float64)
    base = ndi.gaussian_filter(image * t, sigma) / np.maximum(ndi.gaussian_filter(t, sigma), 1e-3)
    texture_amp = rng.uniform(0.02, 0.05)
    noise = ndi.gaussian_filter(rng.standard_normal(image.shape), 1.0)
    reference = np.maximum(base * np.exp(texture_amp * noise / max(noise.std(), 1e-6)), 1e-3)
    best = None
    for index in rng.permutation(len(candidates))[:tries]:
        rr, cc = (candidates[index] + offsets).T
        img = image[rr, cc]
        bound = np.maximum(upper, img) if s > 0 else np.minimum(lower, img)
        cap = float(np.min(s * (((bound - img) / wv + img) / reference[rr, cc] - 1.0)))
        score = (bool(np.mean(~tissue[rr[wv >= 0.5], cc[wv >= 0.5]]) <= 0.1), min(cap, contrast))
        if best is None or score > best[0]:
            best = (score, rr, cc)
        if score == (True, contrast):
            break
    (_, used), rr, cc = best
    if used < 0:
        raise ValueError(f"no place found for a {polarity} lesion within the intensity bounds")
    used = used if used >= contrast else max(used - 1e-6, 0.0)  # a hair below the cap, against rounding
    weight = np.zeros(image.shape)
    weight[rr, cc] = wv
    out = image + weight * (reference * (1.0 + s * used) - image)
    seg = (weight >= 0.5).astype(np.uint8)
    area = int(seg.sum())
    params = {
        "polarity": polarity,
        "contrast": round(float(used), 4),
        "contrast_drawn": round(float(contrast), 4),
        "capped": bool(used < contrast),
        "measured_contrast": round(float(out[seg > 0].mean() / image[seg > 0].mean() - 1.0), 4),
        "area_px": area,
        "equivalent_radius_mm": round(float(np.sqrt(area / np.pi)), 2),
        "centre": [int(v) for v in np.argwhere(seg).mean(axis=0).round()],
        "edge_sigma_mm": round(float(edge), 2),
        "texture": round(float(texture_amp), 4),
    }
    return out.astype(np.float32), seg, params


def _alternate(by_polarity: dict[str, list]) -> list:
    """Subject j's hyper case for even j, its hypo case for odd j."""
    return [by_polarity[("hyper", "hypo")[j % 2]][j] for j in range(len(by_polarity["hyper"]))]


def build_ixi_benchmark(
    ixi_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_calibration: int = 20,
    n_healthy_calibration: int = 8,
) -> dict:
    """Build the benchmark (see the module docstring) and return a summary dict."""
    start = time.time()
    ixi_dir, out = Path(ixi_dir), Path(out_dir)
    files = {split: sorted((ixi_dir / split).glob("*.png")) for split in ("train", "val")}
    for split, paths in files.items():
        if not paths:
            raise FileNotFoundError(f"no PNG slices in {ixi_dir / split}")
    n_val = len(files["val"])
    if n_calibration < 0 or n_healthy_calibration < 0 or n_calibration + n_healthy_calibration >= n_val:
        raise ValueError(f"n_calibration + n_healthy_calibration must be < {n_val} (the val/ slices)")
    images = {k: [read_png(p) for p in v] for k, v in files.items()}
    shapes = {a.shape for v in images.values() for a in v}
    if len(shapes) != 1:
        raise ValueError(f"slices of different shapes in {ixi_dir}: {sorted(shapes)}")
    match = match_template(np.mean([a for v in images.values() for a in v], axis=0))
    tmask = match.pop("template_mask")
    masks = {k: [brain_mask(a, tmask) for a in v] for k, v in images.items()}
    ids = {k: subject_ids(v) for k, v in files.items()}

    def write(folder: str, name: str, image: np.ndarray, mask: np.ndarray, stem: str | None = None, seg=None) -> dict:
        entry = {"image": save_slice(image, out / folder / f"{stem or name}_t1.nii.gz")}
        entry["mask"] = save_slice(mask, out / folder / f"{name}_mask.nii.gz")
        if seg is not None:
            entry["seg"] = save_slice(seg, out / folder / f"{stem or name}_seg.nii.gz")
        return entry

    training = [write("train", *args) for args in zip(ids["train"], images["train"], masks["train"], strict=True)]
    order = np.random.default_rng([seed, 1]).permutation(n_val)
    n_cal = n_calibration + n_healthy_calibration
    calib, healthy, test = sorted(order[:n_calibration]), sorted(order[n_calibration:n_cal]), sorted(order[n_cal:])
    cases, shown = [], []

    def lesion_case(i: int, polarity: str, folder: str, variant: int) -> dict:
        img, msk, name = images["val"][i], masks["val"][i], ids["val"][i]
        lesion, seg, params = insert_lesion(img, msk, np.random.default_rng([seed, 2, int(i), variant]), polarity)
        stem = f"{name}_{polarity}"
        cases.append({"case": stem, "split": folder, "source": files["val"][i].name, **params})
        if folder == "test" and i in test[:2]:
            shown.append((img, lesion, seg, params, msk))
        return write(folder, name, lesion, msk, stem, seg)

    calibrations = {p: [lesion_case(i, p, "calibration", v) for i in calib] for v, p in enumerate(_POLARITY, start=3)}
    tests = {p: [lesion_case(i, p, "test", v) for i in test] for v, p in enumerate(_POLARITY, start=1)}
    healthy_entries = [write("calibration", ids["val"][i], images["val"][i], masks["val"][i]) for i in healthy]
    sections = {p: (calibrations[p], tests[p]) for p in _POLARITY}
    sections["mixed"] = (_alternate(calibrations), _alternate(tests))
    for name, (validation, section) in sections.items():
        datalist = {"training": training, "validation": validation + healthy_entries, "test": section}
        write_datalist(out / f"datalist_{name}.json", datalist)

    area = np.array([m.sum() for v in masks.values() for m in v], dtype=np.float64)
    kept = area / max(int(tmask.sum()), 1)
    lesions = {"n_capped": sum(c["capped"] for c in cases)}
    for key in ("area_px", "equivalent_radius_mm", "contrast", "measured_contrast"):
        for p in _POLARITY:
            values = [c[key] for c in cases if c["polarity"] == p]
            lesions[f"{key}_{p}"] = [min(values), max(values)]
    summary = {
        "seed": seed,
        "counts": dict(training=len(training), calibration=len(calib), healthy_calib=len(healthy), test=len(test)),
        "template": {**match, "file": MNI152_FILES["t1"], "template_mask_px": int(tmask.sum())},
        "mask": {
            "area_px_min_median_max": [int(area.min()), float(np.median(area)), int(area.max())],
            "fraction_of_template_mask_min_median_max": [round(float(q), 3) for q in np.percentile(kept, [0, 50, 100])],
        },
        "lesions": lesions,
    }
    manifest = {"generator": "make_ixi_benchmark", "ixi_dir": str(ixi_dir), **summary, "cases": cases}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _figure(shown, out / "ixi_benchmark.png")
    summary["seconds"] = round(time.time() - start, 1)
    summary["out_dir"] = str(out)
    return summary


def _figure(shown: list, path: Path) -> None:
    """Rows: test examples; columns: original and lesion image (brain mask in green), zoom with the lesion outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 3, figsize=(7.5, 3.0 * len(shown)), squeeze=False)
    for row, (img, lesion, seg, params, msk) in enumerate(shown):
        vmax = float(np.percentile(img[msk], 99.9))
        (r0, c0), (r1, c1) = np.argwhere(seg).min(axis=0) - 12, np.argwhere(seg).max(axis=0) + 13
        crop = (slice(max(r0, 0), r1), slice(max(c0, 0), c1))
        for col, data in enumerate((img, lesion, lesion[crop])):
            ax = axes[row, col]
            ax.imshow(data, cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
            if col != 1:
                contour = (msk if col == 0 else seg[crop]).astype(np.float32)
                ax.contour(contour, levels=[0.5], colors="red" if col == 2 else "lime", linewidths=0.6)
            ax.set_axis_off()
        axes[row, 1].set_title(f"{params['polarity']} c={params['contrast']:.2f}, {params['area_px']} px", fontsize=8)
    fig.suptitle("IXI T1 + synthetic lesions (green: brain mask, red: ground truth)", fontsize=9)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ixi", required=True, type=Path, help="folder with train/ and val/ PNG slices")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--n-calibration", type=int, default=20, help="lesioned calibration subjects, both polarities (default: 20)"
    )
    parser.add_argument("--n-healthy-calibration", type=int, default=8, help="healthy calibration (default: 8)")
    args = parser.parse_args(argv)
    if not args.ixi.is_dir():
        print(f"error: IXI folder not found: {args.ixi} (expected train/ and val/ PNG slices)", file=sys.stderr)
        return 2
    try:
        summary = build_ixi_benchmark(args.ixi, args.out, args.seed, args.n_calibration, args.n_healthy_calibration)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
