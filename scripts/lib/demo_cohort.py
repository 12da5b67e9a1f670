"""Deterministic synthetic brain-MRI cohort for demos and tests (cDDPM seed layout).

Every subject is a randomly deformed copy of the MNI152 2009a symmetric template that ships inside nilearn (no
download), rendered at 2 mm with a T1-like and a T2-like contrast from its tissue probability maps (partial volume),
optionally with a lesion (tumour with oedema, multiple-sclerosis plaques, or a stroke) of exactly known extent, and
degraded by a smooth bias field, a small partial-volume blur and Rician noise. Images are skull-stripped (background 0).

Layout written under the data root ``DIR``::

    DIR/Train/ixi/{t1,t2,mask}/<name>_{t1,t2,mask}.nii.gz           healthy subjects (train, val and test)
    DIR/Test/<Set>/{t1,t2,mask,seg}/<name>_{t1,t2,mask,seg}.nii.gz   Set in Tumour, MS, Stroke
    DIR/splits/IXI_train_fold0.csv, IXI_val_fold0.csv, IXI_test.csv, <Set>_val.csv, <Set>_test.csv
    DIR/datalists/<Set>_<contrast>.json                               Set in IXI, Tumour, MS, Stroke; contrast t1, t2
    DIR/demo_cohort.png                                               one slice of each kind of subject
    DIR/demo_cohort.json                                              manifest (marks DIR as a demo cohort)

The same ``--seed`` always gives the same images: each subject draws from its own generator seeded by
``(seed, set, index)``, so the result does not depend on the order or the number of worker processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from uad.files import atomic_output, atomic_write_csv, atomic_write_figure, atomic_write_text

from .mni152 import MNI152_FILES, mni152_path

__all__ = [
    "CONTRASTS",
    "LESION_SETS",
    "SIZES",
    "SPLIT_COLUMNS",
    "build_cohort",
    "cohort_plan",
    "load_template_anatomy",
    "plot_cohort",
    "subject_rng",
    "synthesize_subject",
    "write_nifti",
]

CONTRASTS = ("t1", "t2")
LESION_SETS = ("Tumour", "MS", "Stroke")
SPLIT_COLUMNS = ("img_name", "age", "label", "img_path", "mask_path", "seg_path")
MANIFEST_NAME = "demo_cohort.json"
FIGURE_NAME = "demo_cohort.png"
GENERATOR_ID = "make_demo_data"
FORMAT_VERSION = 1

# Subjects per size: healthy train / val / test, and val / test per lesion set.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"train": 4, "val": 2, "test": 2, "lesion_val": 2, "lesion_test": 2},
    "small": {"train": 6, "val": 3, "test": 2, "lesion_val": 3, "lesion_test": 4},
    "default": {"train": 24, "val": 6, "test": 6, "lesion_val": 6, "lesion_test": 8},
    "large": {"train": 96, "val": 24, "test": 24, "lesion_val": 24, "lesion_test": 32},
}

# Stable integers that seed each set's generators (never reorder: they define the data).
_SET_CODES = {"IXI": 0, "Tumour": 1, "MS": 2, "Stroke": 3}
_LESION_ALIASES = {"tumour": "Tumour", "tumor": "Tumour", "ms": "MS", "stroke": "Stroke"}
# Plausible age ranges (years) per set.
_AGE_RANGES = {"IXI": (20, 86), "Tumour": (25, 80), "MS": (20, 60), "Stroke": (45, 90)}
# ----------------------------------------------------------------------------------------------------------------------
# Template anatomy
# ----------------------------------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean volume (empty stays empty)."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return labels > 0
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def _downsample(volume: np.ndarray, factor: float) -> np.ndarray:
    """Average ``volume`` into blocks of ``factor`` voxels per axis (voxel ``i`` covers ``[i*f - 0.5, (i+1)*f - 0.5)``).

    Integer factors use exact block means (the volume is zero-padded to a multiple); other factors a gaussian
    pre-filter matched to the box width followed by linear interpolation at the block centres.
    """
    volume = volume.astype(np.float32, copy=False)
    if abs(factor - round(factor)) < 1e-6:
        k = int(round(factor))
        if k == 1:
            return volume.copy()
        padded_shape = [int(math.ceil(s / k)) * k for s in volume.shape]
        padded = np.zeros(padded_shape, np.float32)
        padded[tuple(slice(0, s) for s in volume.shape)] = volume
        n = [s // k for s in padded_shape]
        blocks = padded.reshape(n[0], k, n[1], k, n[2], k)
        return (blocks.sum(axis=5).sum(axis=3).sum(axis=1) / np.float32(k**3)).astype(np.float32)
    sigma = math.sqrt(max(factor**2 - 1.0, 0.0) / 12.0)
    smooth = ndi.gaussian_filter(volume, sigma) if sigma > 0 else volume
    n = [int(math.ceil(s / factor)) for s in volume.shape]
    centres = [np.arange(m) * factor + (factor - 1.0) / 2.0 for m in n]
    grid = np.meshgrid(*centres, indexing="ij")
    return ndi.map_coordinates(smooth, grid, order=1, mode="constant", cval=0.0).astype(np.float32)


def _extract_box(volume: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``volume[start : start + shape]`` with zero padding where the box leaves the volume."""
    out = np.zeros(tuple(shape), volume.dtype)
    src, dst = [], []
    for s0, n, size in zip(start, shape, volume.shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, size)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s0, lo - s0 + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


@functools.lru_cache(maxsize=4)
def _cached_anatomy(spacing: float, margin: int, multiple: int) -> dict:
    images = {k: nib.load(mni152_path(k)) for k in MNI152_FILES}
    affine_1mm = images["t1"].affine.astype(np.float64)
    factor = spacing / float(np.mean(np.abs(np.diag(affine_1mm)[:3])))
    raw = np.asarray(images["t1"].dataobj)
    # Work on the brain bounding box (start aligned to the block size, so the output grid is unchanged).
    step = int(round(factor)) if abs(factor - round(factor)) < 1e-6 else None
    box = []
    for axis in range(3):
        present = np.flatnonzero(np.any(raw > 0, axis=tuple(a for a in range(3) if a != axis)))
        lo = 0 if step is None else max(int(present[0]) - 2, 0) // step * step
        box.append(slice(lo, raw.shape[axis] if step is None else min(int(present[-1]) + 3, raw.shape[axis])))
    box = tuple(box)
    t1 = raw[box].astype(np.float32)
    mask = _largest_component(ndi.binary_fill_holes(t1 > 0))
    gm = np.asarray(images["gm"].dataobj[box], dtype=np.float32) / 255.0 * mask
    wm = np.asarray(images["wm"].dataobj[box], dtype=np.float32) / 255.0 * mask
    t1 = t1 * mask
    box_offset = [s.start for s in box]
    affine_1mm = affine_1mm @ np.array(
        [[1, 0, 0, box_offset[0]], [0, 1, 0, box_offset[1]], [0, 0, 1, box_offset[2]], [0, 0, 0, 1]], dtype=np.float64
    )

    low = {"gm": _downsample(gm, factor), "wm": _downsample(wm, factor), "t1": _downsample(t1, factor)}
    low["brain"] = _downsample(mask.astype(np.float32), factor)
    del gm, wm, t1

    # Crop to the brain bounding box plus a margin, grown (centred) to a multiple of `multiple` voxels.
    brain = low["brain"] > 0.5
    idx = np.argwhere(brain)
    lo, hi = idx.min(0) - margin, idx.max(0) + margin + 1
    shape = []
    for a in range(3):
        n = int(hi[a] - lo[a])
        target = int(math.ceil(n / multiple) * multiple) if multiple > 1 else n
        lo[a] -= (target - n) // 2
        shape.append(target)
    start = [int(v) for v in lo]
    crop = {k: _extract_box(v, start, shape) for k, v in low.items()}

    # Voxel i of the low-resolution grid is centred at 1 mm index f*i + (f-1)/2; then shift by the crop start.
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1.0) / 2.0 + factor * np.asarray(start, dtype=np.float64)
    affine = affine_1mm @ scale

    brain_frac = np.clip(crop["brain"], 0.0, 1.0)
    gm_c = np.clip(crop["gm"], 0.0, 1.0)
    wm_c = np.clip(crop["wm"], 0.0, 1.0)
    over = np.maximum(gm_c + wm_c - brain_frac, 0.0)  # keep gm + wm <= brain fraction
    scale_down = np.where(over > 0, brain_frac / np.maximum(gm_c + wm_c, 1e-6), 1.0)
    gm_c, wm_c = gm_c * scale_down, wm_c * scale_down
    csf_c = np.clip(brain_frac - gm_c - wm_c, 0.0, 1.0)

    # T1 texture: the part of the real template T1 that the tissue fractions do not explain (nuclei, fine folds),
    # in units of the template white-matter intensity, bounded so it never dominates the tissue contrast.
    t1n = crop["t1"]
    inside = brain_frac > 0.5
    design = np.stack([gm_c[inside], wm_c[inside], csf_c[inside]], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, t1n[inside].astype(np.float64), rcond=None)
    t1n = t1n / np.float32(coef[1])
    coef = coef / coef[1]
    fit = coef[0] * gm_c + coef[1] * wm_c + coef[2] * csf_c
    texture = np.clip(t1n - fit, -0.4 * fit, 0.4 * fit).astype(np.float32)

    anatomy = {
        "gm": gm_c.astype(np.float32),
        "wm": wm_c.astype(np.float32),
        "csf": csf_c.astype(np.float32),
        "brain": brain_frac.astype(np.float32),
        "mask": _largest_component(ndi.binary_fill_holes(brain_frac > 0.5)).astype(np.uint8),
        "t1": (t1n * (brain_frac > 0)).astype(np.float32),
        "texture": texture,
        # voxels whose linear interpolation can be non-zero: the brain dilated by one voxel
        "support": ndi.binary_dilation(brain_frac > 0, structure=np.ones((3, 3, 3), bool)),
        "affine": affine,
        "spacing": float(spacing),
        "shape": tuple(int(s) for s in shape),
    }
    for value in anatomy.values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return anatomy


def load_template_anatomy(spacing: float = 2.0, margin: int = 6, multiple: int = 16) -> dict:
    """The MNI152 2009a symmetric template resampled to ``spacing`` mm and cropped around the brain.

    Args:
        spacing: isotropic voxel size in mm of the output grid (block averaging of the 1 mm template).
        margin: voxels kept around the brain bounding box (room for the random deformations).
        multiple: the cropped shape is grown (centred, zero padded) to a multiple of this (16 suits U-Nets).

    Returns:
        dict with read-only float32 arrays ``gm``, ``wm``, ``csf`` (tissue fractions of each voxel, summing to the
        brain fraction), ``brain`` (brain fraction), ``t1`` (template T1 scaled to white matter = 1), ``texture``
        (template T1 detail not explained by the tissue fractions), uint8 ``mask``, boolean ``support`` (brain
        dilated by one voxel), the 4x4 RAS ``affine``,
        ``spacing`` and ``shape``. Cached: repeated calls are free.
    """
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return dict(_cached_anatomy(float(spacing), int(margin), int(multiple)))


# ----------------------------------------------------------------------------------------------------------------------
# Random fields and geometry
# ----------------------------------------------------------------------------------------------------------------------


def subject_rng(seed: int, set_name: str, index: int) -> np.random.Generator:
    """The generator of one subject, derived from (seed, set, index) only, so that subjects are order independent."""
    if set_name not in _SET_CODES:
        raise ValueError(f"unknown set {set_name!r}; expected one of {sorted(_SET_CODES)}")
    return np.random.default_rng([int(seed), _SET_CODES[set_name], int(index)])


def _upsample(field: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of a coarse grid onto ``shape`` with matching corners."""
    coords = [np.linspace(0.0, n_low - 1.0, n, dtype=np.float32) for n_low, n in zip(field.shape, shape, strict=True)]
    # Separable linear interpolation: cheap and exact for a tensor grid.
    out = field.astype(np.float32)
    for axis, c in enumerate(coords):
        i0 = np.clip(np.floor(c).astype(int), 0, max(field.shape[axis] - 2, 0))
        i1 = np.minimum(i0 + 1, field.shape[axis] - 1)
        w = (c - i0).astype(np.float32)
        shp = [1, 1, 1]
        shp[axis] = -1
        w = w.reshape(shp)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return out


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell: float, sigma: float = 1.0) -> np.ndarray:
    """A smooth random field with unit standard deviation and a correlation length of about ``cell`` voxels."""
    low = [max(3, int(math.ceil(n / cell)) + 1) for n in shape]
    noise = ndi.gaussian_filter(rng.standard_normal(low), sigma, mode="wrap")
    noise = (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    return _upsample(noise, shape)


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix from three angles (radians) about the first, second and third axis."""
    cx, cy, cz = (math.cos(a) for a in angles)
    sx, sy, sz = (math.sin(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_orientation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _deformation_coordinates(rng: np.random.Generator, anatomy: dict) -> np.ndarray:
    """Source coordinates (3, X, Y, Z) in template voxels: a random affine composed with a smooth displacement.

    Rotation up to ~4 degrees per axis, scaling within +-5 %, translation up to ~3 mm, and a non-linear displacement
    with a correlation length of ~24 mm and an amplitude of ~2 mm (rms).
    """
    shape = anatomy["shape"]
    spacing = anatomy["spacing"]
    angles = np.deg2rad(rng.uniform(-4.0, 4.0, 3))
    scales = rng.uniform(0.95, 1.05, 3)
    shift = rng.uniform(-3.0, 3.0, 3) / spacing
    matrix = _rotation(angles) @ np.diag(1.0 / scales)  # output -> template mapping
    amplitude = rng.uniform(1.5, 2.5) / spacing
    disp = [amplitude * _smooth_field(rng, shape, 24.0 / spacing) for _ in range(3)]

    centre = np.asarray(ndi.center_of_mass(anatomy["brain"]), dtype=np.float32)
    grid = np.indices(shape, dtype=np.float32)
    rel = grid.reshape(3, -1) - centre[:, None]
    src = (matrix.astype(np.float32) @ rel).reshape((3, *shape))
    for a in range(3):
        src[a] += centre[a] + np.float32(shift[a]) + disp[a]
    return src


# ----------------------------------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------------------------------


def _blob_level(
    rng: np.random.Generator,
    shape: Sequence[int],
    centre: Sequence[float],
    radius: float,
    elongation: float,
    irregularity: float,
    roughness: float,
    extent: float = 2.2,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """A level function around ``centre`` whose sub-level sets are irregular ellipsoids.

    Returns the slices of a box around the centre and, inside it, ``level = r * exp(irregularity * noise)`` where
    ``r`` is the normalised radius of a randomly oriented ellipsoid of geometric-mean radius ``radius`` (voxels) and
    ``noise`` a smooth unit-variance random field of correlation ``roughness`` voxels.
    """
    axes = np.exp(rng.uniform(-elongation, elongation, 3))
    axes = radius * axes / np.prod(axes) ** (1.0 / 3.0)
    half = int(math.ceil(extent * axes.max())) + 2
    slices = tuple(
        slice(max(int(round(c)) - half, 0), min(int(round(c)) + half + 1, n))
        for c, n in zip(centre, shape, strict=True)
    )
    box = tuple(s.stop - s.start for s in slices)
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in slices], indexing="ij"))
    rel = grid.reshape(3, -1) - np.asarray(centre, dtype=np.float32)[:, None]
    local = _random_orientation(rng).T.astype(np.float32) @ rel / axes.astype(np.float32)[:, None]
    r = np.sqrt((local**2).sum(0)).reshape(box)
    noise = ndi.gaussian_filter(rng.standard_normal(box).astype(np.float32), roughness, mode="reflect")
    noise /= max(float(noise.std()), 1e-6)
    return slices, r * np.exp(irregularity * noise)


def _select_lowest(level: np.ndarray, allowed: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The ``count`` allowed voxels of lowest level (boolean array) and the level threshold used."""
    values = level[allowed]
    if values.size == 0:
        return np.zeros_like(allowed), 0.0
    count = int(min(max(count, 1), values.size))
    threshold = float(np.partition(values, count - 1)[count - 1])
    return allowed & (level <= threshold), max(threshold, 1e-6)


def _pick_centre(rng: np.random.Generator, candidates: list[np.ndarray]) -> np.ndarray:
    """A random voxel of the first non-empty candidate mask (masks ordered from strict to lenient)."""
    for cand in candidates:
        idx = np.flatnonzero(cand)
        if idx.size:
            return np.asarray(np.unravel_index(int(rng.choice(idx)), cand.shape), dtype=np.float64)
    raise RuntimeError("no valid lesion location found")


def _world(anatomy_affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World (RAS, mm) coordinates (3, X, Y, Z) of every voxel centre."""
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = anatomy_affine[:3, :3].astype(np.float32) @ grid + anatomy_affine[:3, 3:4].astype(np.float32)
    return world.reshape((3, *shape))


def _lesion_tumour(rng, tissue, mask, world, voxel_ml, depth):
    """Tumour: irregular core with a larger irregular oedema shell; returns a list of lesion components."""
    shape = mask.shape
    total_ml = float(rng.uniform(8.0, 50.0))
    core_fraction = float(rng.uniform(0.25, 0.55))
    n_total = int(round(total_ml / voxel_ml))
    n_core = max(int(round(n_total * core_fraction)), 1)
    parenchyma = tissue["gm"] + tissue["wm"]
    supra = (world[2] > -15.0) & (np.abs(world[0]) > 12.0)
    centre = _pick_centre(
        rng,
        [mask & supra & (tissue["wm"] > 0.5) & (depth > 8), mask & (parenchyma > 0.5) & (depth > 5), mask],
    )
    r_core = (3.0 * n_core / (4.0 * math.pi)) ** (1.0 / 3.0)
    r_total = (3.0 * n_total / (4.0 * math.pi)) ** (1.0 / 3.0)
    box, core_level = _blob_level(rng, shape, centre, r_core, 0.25, 0.25, max(r_core / 2.5, 1.0), extent=2.5)
    core, core_thr = _select_lowest(core_level, mask[box], n_core)
    core = _largest_component(core)
    offset = centre + rng.normal(0.0, 0.15 * r_core, 3)
    box_o, oed_level = _blob_level(rng, shape, offset, r_total, 0.3, 0.3, max(r_total / 3.0, 1.0), extent=2.5)
    # Express the core in the oedema box, where it is forced into the selection.
    core_full = np.zeros(shape, bool)
    core_full[box] = core
    oed_level = np.where(core_full[box_o], -np.inf, oed_level)
    total, oed_thr = _select_lowest(oed_level, mask[box_o], n_total)
    total = _largest_component(total | core_full[box_o])
    oedema = np.zeros(shape, bool)
    oedema[box_o] = total
    oedema &= ~core_full

    # Core weight and necrosis: 1 at the core surface, going to a necrotic centre.
    core_depth = np.zeros(shape, np.float32)
    core_depth[box] = np.where(core, np.clip(core_level / core_thr, 0.0, 1.0), 0.0)
    oed_weight = np.zeros(shape, np.float32)
    oed_level_full = np.full(shape, np.inf, np.float32)
    oed_level_full[box_o] = oed_level
    oed_weight[oedema] = np.clip(1.0 - 0.45 * oed_level_full[oedema] / oed_thr, 0.5, 1.0)
    return [
        {"kind": "tumour_core", "region": core_full, "weight": np.ones(shape, np.float32), "depth": core_depth},
        {"kind": "oedema", "region": oedema, "weight": oed_weight},
    ]


def _lesion_ms(rng, tissue, mask, world, voxel_ml, depth):
    """MS: 3-10 small ovoid plaques (3-15 mm) centred in white matter away from the ventricles."""
    shape = mask.shape
    spacing_mm = (voxel_ml * 1000.0) ** (1.0 / 3.0)
    csf_near = ndi.uniform_filter(tissue["csf"], size=5)
    strict = mask & (tissue["wm"] > 0.5) & (csf_near < 0.1) & (depth > 3) & (world[2] > -5.0)
    lenient = mask & (tissue["wm"] > 0.5)
    region = np.zeros(shape, bool)
    weight = np.zeros(shape, np.float32)
    n_lesions = int(rng.integers(3, 11))
    for _ in range(n_lesions):
        diameter = float(rng.uniform(3.0, 15.0))
        n_vox = max(int(round(math.pi / 6.0 * diameter**3 / voxel_ml / 1000.0)), 2)
        centre = _pick_centre(rng, [strict & ~region, lenient & ~region, mask])
        radius = max(diameter / 2.0 / spacing_mm, 0.6)
        box, level = _blob_level(rng, shape, centre, radius, 0.35, 0.15, max(radius / 2.0, 0.7), extent=2.5)
        sel, thr = _select_lowest(level, mask[box], n_vox)
        sel = _largest_component(sel)
        w = np.where(sel, np.clip(1.0 - 0.4 * level / thr, 0.6, 1.0), 0.0).astype(np.float32)
        region[box] |= sel
        weight[box] = np.maximum(weight[box], w)
    return [{"kind": "ms", "region": region, "weight": weight}]


def _lesion_stroke(rng, tissue, mask, world, voxel_ml, depth):
    """Stroke: an irregular cortical/subcortical infarct centred in cortical grey matter of one hemisphere."""
    shape = mask.shape
    volume_ml = float(rng.uniform(4.0, 40.0))
    n_vox = int(round(volume_ml / voxel_ml))
    cortex = mask & (tissue["gm"] > 0.5) & (depth >= 1) & (depth <= 5)
    centre = _pick_centre(
        rng,
        [cortex & (world[2] > -10.0) & (np.abs(world[0]) > 20.0), cortex, mask & (tissue["gm"] > 0.3), mask],
    )
    radius = (3.0 * n_vox / (4.0 * math.pi)) ** (1.0 / 3.0)
    box, level = _blob_level(rng, shape, centre, radius, 0.35, 0.3, max(radius / 2.5, 1.0), extent=2.5)
    sel, thr = _select_lowest(level, mask[box], n_vox)
    sel = _largest_component(sel)
    region = np.zeros(shape, bool)
    region[box] = sel
    weight = np.zeros(shape, np.float32)
    weight[box] = np.where(sel, np.clip(1.0 - 0.3 * level / thr, 0.7, 1.0), 0.0)
    return [{"kind": "stroke", "region": region, "weight": weight}]


_LESION_MAKERS = {"Tumour": _lesion_tumour, "MS": _lesion_ms, "Stroke": _lesion_stroke}


# ----------------------------------------------------------------------------------------------------------------------
# Subject synthesis
# ----------------------------------------------------------------------------------------------------------------------


def _canonical_lesion(lesion: str | None) -> str | None:
    if lesion is None or str(lesion).lower() in ("", "none", "healthy", "ixi"):
        return None
    key = _LESION_ALIASES.get(str(lesion).lower())
    if key is None:
        raise ValueError(f"unknown lesion {lesion!r}; expected None or one of {list(LESION_SETS)}")
    return key


def _source_support(anatomy: dict, src: np.ndarray) -> np.ndarray:
    """Output voxels whose source coordinate lies next to the template brain (elsewhere the resampled maps are 0)."""
    shape = anatomy["shape"]
    nearest = [np.clip(np.rint(src[a]).astype(np.intp), 0, shape[a] - 1) for a in range(3)]
    return anatomy["support"][nearest[0], nearest[1], nearest[2]]


def _bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``pad`` voxels (clipped to the volume; whole volume if empty)."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return tuple(slice(0, n) for n in mask.shape)
        box.append(slice(max(int(present[0]) - pad, 0), min(int(present[-1]) + pad + 1, mask.shape[axis])))
    return tuple(box)


def _warp(anatomy: dict, src: np.ndarray, support: np.ndarray, keys: Sequence[str]) -> list[np.ndarray]:
    """Linear resampling of template volumes at the source coordinates ``src`` (3, X, Y, Z).

    Only the ``support`` voxels (see :func:`_source_support`) are interpolated; the rest is 0 anyway.
    """
    shape = src.shape[1:]
    points = src[:, support]
    out = []
    for key in keys:
        vol = np.zeros(shape, np.float32)
        vol[support] = ndi.map_coordinates(anatomy[key], points, order=1, mode="constant", cval=0.0)
        out.append(vol)
    return out


def _depth(mask: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every mask voxel to the nearest background voxel, computed on the mask's bounding box."""
    depth = np.zeros(mask.shape, np.float32)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return depth
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0), strict=True))
    depth[box] = ndi.distance_transform_edt(mask[box])
    return depth


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float, where: np.ndarray) -> np.ndarray:
    """Magnitude of the image plus complex gaussian noise (Rician, never negative) at the voxels ``where``, else 0."""
    values = image[where]
    real = values + np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    out = np.zeros(image.shape, np.float32)
    out[where] = np.sqrt(real * real + imag * imag)
    return out


def synthesize_subject(rng: np.random.Generator, anatomy: dict, lesion: str | None = None) -> dict:
    """One synthetic subject: deformed template anatomy, T1-/T2-like images, brain mask and lesion ground truth.

    Args:
        rng: the subject's generator (see :func:`subject_rng`); the result depends on nothing else.
        anatomy: output of :func:`load_template_anatomy`.
        lesion: ``None`` for a healthy subject, or ``"Tumour"``, ``"MS"``, ``"Stroke"`` (case insensitive).

    Returns:
        dict with ``t1``, ``t2`` (float32, integer valued, >= 0, 0 outside the mask), ``mask`` and ``seg`` (uint8; seg
        all zero for healthy subjects; seg is exactly the voxels whose tissue intensities the lesion changed, inside
        the mask), ``affine`` (4x4), ``lesion`` (set name or None), ``lesion_ml`` (seg volume in cm^3) and
        ``params`` (the drawn tissue intensities and acquisition settings).
    """
    lesion = _canonical_lesion(lesion)
    full_shape = anatomy["shape"]
    full_affine = np.asarray(anatomy["affine"], dtype=np.float64)
    voxel_ml = float(abs(np.linalg.det(full_affine[:3, :3]))) / 1000.0

    # --- anatomy: random affine + smooth non-linear deformation of the template; all further work happens on the
    # bounding box of the deformed brain (``shape``, ``affine``) and is put back into the full grid at the end.
    src = _deformation_coordinates(rng, anatomy)
    support = _source_support(anatomy, src)
    box = _bounding_box(support, pad=3)
    gm, wm, brain, texture = _warp(anatomy, src[(slice(None), *box)], support[box], ("gm", "wm", "brain", "texture"))
    del src, support
    shape = gm.shape
    affine = full_affine.copy()
    affine[:3, 3] += full_affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64)
    brain = np.clip(brain, 0.0, 1.0)
    gm, wm = np.clip(gm, 0.0, None), np.clip(wm, 0.0, None)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    mask = _largest_component(ndi.binary_fill_holes(brain > 0.5))
    tissue = {"gm": gm, "wm": wm, "csf": csf}

    # --- per-subject tissue intensities (T1: WM > GM > CSF, T2: CSF > GM > WM)
    s1, s2 = float(rng.uniform(800.0, 1200.0)), float(rng.uniform(800.0, 1200.0))
    mu1 = {"wm": s1, "gm": s1 * rng.uniform(0.62, 0.72), "csf": s1 * rng.uniform(0.22, 0.32)}
    mu2 = {"csf": s2, "gm": s2 * rng.uniform(0.45, 0.55), "wm": s2 * rng.uniform(0.33, 0.40)}
    alpha = float(rng.uniform(0.5, 0.8))  # strength of the real template T1 texture
    beta = float(rng.uniform(0.1, 0.2))  # weaker, inverted texture in T2
    t1 = gm * mu1["gm"] + wm * mu1["wm"] + csf * mu1["csf"] + alpha * s1 * texture
    t2 = gm * mu2["gm"] + wm * mu2["wm"] + csf * mu2["csf"] - beta * s2 * texture
    t1, t2 = t1.astype(np.float32), t2.astype(np.float32)

    # --- lesions replace a fraction q of the voxel's tissue by lesion tissue: I <- (1 - q) I + q * brain * target
    seg = np.zeros(shape, bool)
    if lesion is not None:
        depth = _depth(mask)
        world = _world(affine, shape)
        components = _LESION_MAKERS[lesion](rng, tissue, mask, world, voxel_ml, depth)
        parenchyma_share = np.where(brain > 0, (gm + wm) / np.maximum(brain, 1e-6), 0.0).astype(np.float32)
        for comp in components:
            region = comp["region"] & mask
            kind = comp["kind"]
            if kind == "tumour_core":
                necrosis = np.clip(1.0 - comp["depth"], 0.0, 1.0) ** 2  # 1 in the centre, 0 at the core surface
                hetero = 1.0 + 0.08 * _smooth_field(rng, shape, 3.0)
                c1 = mu1["csf"] + (mu1["gm"] - mu1["csf"]) * float(rng.uniform(0.35, 0.6))
                c2 = mu2["wm"] + (mu2["csf"] - mu2["wm"]) * float(rng.uniform(0.55, 0.75))
                n1 = mu1["csf"] * float(rng.uniform(1.0, 1.3))
                n2 = mu2["csf"] * float(rng.uniform(0.85, 1.0))
                target1 = (c1 + (n1 - c1) * necrosis) * hetero
                target2 = (c2 + (n2 - c2) * necrosis) * hetero
                q = comp["weight"]
            elif kind == "oedema":
                target1 = mu1["gm"] * float(rng.uniform(0.88, 0.98))
                target2 = mu2["gm"] + (mu2["csf"] - mu2["gm"]) * float(rng.uniform(0.3, 0.5))
                q = comp["weight"] * parenchyma_share
            elif kind == "ms":
                target1 = mu1["gm"] + (mu1["wm"] - mu1["gm"]) * float(rng.uniform(0.0, 0.3))
                target2 = mu2["gm"] + (mu2["csf"] - mu2["gm"]) * float(rng.uniform(0.35, 0.6))
                q = comp["weight"] * parenchyma_share
            else:  # stroke: the infarct replaces all tissue (including sulcal CSF) by fluid-like tissue
                target1 = mu1["csf"] + (mu1["gm"] - mu1["csf"]) * float(rng.uniform(0.1, 0.35))
                target2 = mu2["gm"] + (mu2["csf"] - mu2["gm"]) * float(rng.uniform(0.55, 0.85))
                q = comp["weight"]
            q = np.where(region, q, 0.0).astype(np.float32)
            q[q < 0.05] = 0.0  # negligible changes are not made, so seg stays exactly the changed voxels
            changed = q > 0
            t1[changed] = (1.0 - q[changed]) * t1[changed] + q[changed] * brain[changed] * _at(target1, changed)
            t2[changed] = (1.0 - q[changed]) * t2[changed] + q[changed] * brain[changed] * _at(target2, changed)
            seg |= changed

    # --- acquisition: partial-volume blur, multiplicative bias field, Rician noise, skull stripping
    blur = float(rng.uniform(0.35, 0.6))
    noise_frac = (float(rng.uniform(0.015, 0.035)), float(rng.uniform(0.015, 0.035)))
    bias_sd = (float(rng.uniform(0.04, 0.1)), float(rng.uniform(0.04, 0.1)))
    images = []
    for img, bias, ref, frac in zip((t1, t2), bias_sd, (s1, s2), noise_frac, strict=True):
        img = ndi.gaussian_filter(img, blur)
        img = img * np.exp(bias * _smooth_field(rng, shape, 40.0 / anatomy["spacing"]))
        img = np.rint(_rician(rng, img, frac * ref, mask))
        images.append(img)
    seg &= mask

    def full(volume: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros(full_shape, dtype)
        out[box] = volume
        return out

    return {
        "t1": full(images[0], np.float32),
        "t2": full(images[1], np.float32),
        "mask": full(mask, np.uint8),
        "seg": full(seg, np.uint8),
        "affine": full_affine,
        "lesion": lesion,
        "lesion_ml": float(seg.sum() * voxel_ml),
        "params": {
            "t1_means": {k: float(v) for k, v in mu1.items()},
            "t2_means": {k: float(v) for k, v in mu2.items()},
            "blur_sigma_vox": blur,
            "noise_fraction": noise_frac,
            "bias_sd": bias_sd,
        },
    }


def _at(target, where: np.ndarray):
    """``target`` at the voxels ``where`` (targets are scalars or full volumes)."""
    return target[where] if isinstance(target, np.ndarray) else np.float32(target)


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """Write a NIfTI image atomically (``uad.files.atomic_output``), values unscaled."""
    path = Path(path)
    data = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"{path.name}: values {data.min()}..{data.max()} do not fit {np.dtype(dtype).name}")
        data = np.rint(data).astype(dtype)
    else:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)
    return path


def _case_files(set_name: str, name: str, lesion: bool) -> dict[str, str]:
    """Paths (relative to the data root) of one subject's files, keyed by t1, t2, mask and seg."""
    folder = "Train/ixi" if set_name == "IXI" else f"Test/{set_name}"
    kinds = ("t1", "t2", "mask", "seg") if lesion else ("t1", "t2", "mask")
    return {k: f"{folder}/{k}/{name}_{k}.nii.gz" for k in kinds}


def cohort_plan(size: str = "default") -> list[dict]:
    """Every subject of a cohort: set, split, index (within the set), name, lesion flag and relative file paths."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    counts = SIZES[size]
    plan = []
    index = 0
    for split in ("train", "val", "test"):
        for _ in range(counts[split]):
            name = f"ixi_{index:04d}"
            plan.append(
                {"set": "IXI", "split": split, "index": index, "name": name, "files": _case_files("IXI", name, False)}
            )
            index += 1
    for set_name in LESION_SETS:
        index = 0
        for split in ("val", "test"):
            for _ in range(counts[f"lesion_{split}"]):
                name = f"{set_name.lower()}_{index:04d}"
                files = _case_files(set_name, name, True)
                plan.append({"set": set_name, "split": split, "index": index, "name": name, "files": files})
                index += 1
    return plan


_WORKER_ANATOMY: dict | None = None


def _init_worker(spacing: float) -> None:
    global _WORKER_ANATOMY
    _WORKER_ANATOMY = load_template_anatomy(spacing)


def _make_case(task: tuple[str, int, int, dict, float]) -> dict:
    """Synthesize one planned subject and write its files; returns its CSV metadata."""
    out_dir, seed, _, case, spacing = task
    anatomy = _WORKER_ANATOMY if _WORKER_ANATOMY is not None else load_template_anatomy(spacing)
    rng = subject_rng(seed, case["set"], case["index"])
    subject = synthesize_subject(rng, anatomy, None if case["set"] == "IXI" else case["set"])
    lo, hi = _AGE_RANGES[case["set"]]
    age = int(rng.integers(lo, hi + 1))  # drawn last: the images equal synthesize_subject(subject_rng(...))
    root = Path(out_dir)
    for kind, rel in case["files"].items():
        dtype = np.int16 if kind in CONTRASTS else np.uint8
        write_nifti(root / rel, subject[kind], subject["affine"], dtype=dtype)
    return {"name": case["name"], "age": age, "lesion_ml": subject["lesion_ml"]}


def _check_out_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """Refuse a non-empty folder that is not a demo cohort (unless overwriting); returns the old manifest if any."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    manifest_path = out_dir / MANIFEST_NAME
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
    if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR_ID:
        return manifest
    if overwrite:
        return None
    raise FileExistsError(
        f"{out_dir} is not empty and is not a demo cohort written by this script (no {MANIFEST_NAME}); "
        "choose another folder or pass --overwrite"
    )


def _remove_stale(out_dir: Path, old_manifest: dict | None, keep: set[str]) -> int:
    """Delete files a previous demo cohort listed in its manifest that the new cohort does not write."""
    if not old_manifest:
        return 0
    removed = 0
    root = out_dir.resolve()
    for rel in old_manifest.get("files", []):
        if rel in keep:
            continue
        path = (out_dir / rel).resolve()
        if root not in path.parents or not path.is_file():
            continue
        path.unlink()
        removed += 1
    return removed


def _datalist_entry(case: dict, contrast: str, lesion: bool) -> dict:
    entry = {"image": f"../{case['files'][contrast]}", "mask": f"../{case['files']['mask']}"}
    if lesion:
        entry["seg"] = f"../{case['files']['seg']}"
    return entry


def build_cohort(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: str = "default",
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
    figure: bool = True,
) -> dict:
    """Generate the whole demo cohort under ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: data root; must be empty, absent, or a previous demo cohort (then its stale files are removed)
            unless ``overwrite``.
        seed: non-negative integer; the same seed gives the same images.
        size: ``"tiny"``, ``"default"`` or ``"large"`` (see :data:`SIZES`).
        overwrite: allow writing into a non-empty folder that is not a demo cohort (existing files are kept
            unless a cohort file has the same name).
        workers: processes synthesizing subjects in parallel (the result does not depend on it).
        progress: show a tqdm progress bar on stderr.
        figure: write ``demo_cohort.png``.

    Returns:
        summary dict: out_dir, seed, size, shape, spacing_mm, counts per set and split, lesion volumes (cm^3) per set,
        number of files, bytes on disk and seconds.
    """
    start_time = time.time()
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    seed = int(seed)
    plan = cohort_plan(size)
    out_dir = Path(out_dir)
    old_manifest = _check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    anatomy = load_template_anatomy(2.0)
    spacing = anatomy["spacing"]
    splits = {
        "IXI_train_fold0": [c for c in plan if c["set"] == "IXI" and c["split"] == "train"],
        "IXI_val_fold0": [c for c in plan if c["set"] == "IXI" and c["split"] == "val"],
        "IXI_test": [c for c in plan if c["set"] == "IXI" and c["split"] == "test"],
    }
    for set_name in LESION_SETS:
        for split in ("val", "test"):
            splits[f"{set_name}_{split}"] = [c for c in plan if c["set"] == set_name and c["split"] == split]
    datalist_names = [f"{s}_{c}" for s in ("IXI", *LESION_SETS) for c in CONTRASTS]
    files = [rel for case in plan for rel in case["files"].values()]
    files += [f"splits/{name}.csv" for name in splits]
    files += [f"datalists/{name}.json" for name in datalist_names]
    if figure:
        files.append(FIGURE_NAME)
    removed = _remove_stale(out_dir, old_manifest, set(files) | {MANIFEST_NAME})

    manifest = {
        "generator": GENERATOR_ID,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "seed": seed,
        "size": size,
        "spacing_mm": spacing,
        "shape": list(anatomy["shape"]),
        "files": files,
    }
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=4) + "\n")

    tasks = [(str(out_dir), seed, i, case, spacing) for i, case in enumerate(plan)]
    results: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"demo cohort ({size})", unit="subject", file=sys.stderr)
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(spacing,)) as pool:
                for res in pool.map(_make_case, tasks, chunksize=1):
                    results.append(res)
                    if bar is not None:
                        bar.update(1)
        else:
            for task in tasks:
                results.append(_make_case(task))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    meta = {(case["set"], case["name"]): res for case, res in zip(plan, results, strict=True)}

    # --- split CSVs (paths relative to the data root; img_path is the T2 image)
    for split_name, cases in splits.items():
        rows = []
        for case in cases:
            lesion = case["set"] != "IXI"
            rows.append(
                {
                    "img_name": case["name"],
                    "age": meta[(case["set"], case["name"])]["age"],
                    "label": int(lesion),
                    "img_path": case["files"]["t2"],
                    "mask_path": case["files"]["mask"],
                    "seg_path": case["files"]["seg"] if lesion else "",
                }
            )
        atomic_write_csv(out_dir / "splits" / f"{split_name}.csv", rows, SPLIT_COLUMNS)

    # --- MONAI datalists (paths relative to the datalist folder)
    for contrast in CONTRASTS:
        healthy = {
            "training": [_datalist_entry(c, contrast, False) for c in splits["IXI_train_fold0"]],
            "validation": [_datalist_entry(c, contrast, False) for c in splits["IXI_val_fold0"]],
        }
        ixi = {**healthy, "test": [_datalist_entry(c, contrast, False) for c in splits["IXI_test"]]}
        atomic_write_text(out_dir / "datalists" / f"IXI_{contrast}.json", json.dumps(ixi, indent=4) + "\n")
        for set_name in LESION_SETS:
            sections = {
                "training": healthy["training"],
                "validation": healthy["validation"]
                + [_datalist_entry(c, contrast, True) for c in splits[f"{set_name}_val"]],
                "test": [_datalist_entry(c, contrast, True) for c in splits[f"{set_name}_test"]],
            }
            path = out_dir / "datalists" / f"{set_name}_{contrast}.json"
            atomic_write_text(path, json.dumps(sections, indent=4) + "\n")

    if figure:
        shown = [("IXI (healthy)", splits["IXI_test"][0] if splits["IXI_test"] else plan[0])]
        shown += [(s, (splits[f"{s}_test"] or splits[f"{s}_val"])[0]) for s in LESION_SETS]
        plot_cohort(out_dir, [(label, case["files"]) for label, case in shown], out_dir / FIGURE_NAME)

    counts = {}
    for case in plan:
        counts.setdefault(case["set"], {}).setdefault(case["split"], 0)
        counts[case["set"]][case["split"]] += 1
    volumes = {
        s: [round(meta[(c["set"], c["name"])]["lesion_ml"], 2) for c in plan if c["set"] == s] for s in LESION_SETS
    }
    n_bytes = sum((out_dir / rel).stat().st_size for rel in files if (out_dir / rel).is_file())
    summary = {
        "out_dir": str(out_dir),
        "seed": seed,
        "size": size,
        "shape": list(anatomy["shape"]),
        "spacing_mm": spacing,
        "counts": counts,
        "lesion_ml": volumes,
        "n_subjects": len(plan),
        "n_files": len(files) + 1,
        "bytes": int(n_bytes),
        "removed_stale_files": removed,
        "seconds": round(time.time() - start_time, 1),
    }
    manifest.update({"complete": True, "summary": summary})
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=4) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------------


def plot_cohort(data_root: str | os.PathLike, cases: Sequence[tuple[str, dict]], out_png: str | os.PathLike) -> Path:
    """Grid figure: one row per case (T1 and T2 columns) on an axial slice, with the lesion outline in red.

    Args:
        data_root: folder the case paths are relative to.
        cases: ``(row label, files)`` pairs where ``files`` maps ``t1``, ``t2`` and optionally ``seg`` to paths.
        out_png: figure path (written atomically).

    Healthy cases show the mid-axial slice (third array axis, RAS); lesion cases the axial slice with the largest
    lesion area, so that the lesion is visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(data_root)
    fig, axes = plt.subplots(len(cases), 2, figsize=(5.2, 2.9 * len(cases)), squeeze=False)
    for row, (label, files) in enumerate(cases):
        vols = {k: np.asarray(nib.load(root / files[k]).dataobj) for k in ("t1", "t2", "seg") if k in files}
        seg = vols.get("seg")
        if seg is not None and seg.any():
            z = int(np.argmax(seg.sum(axis=(0, 1))))
        else:
            z = vols["t1"].shape[2] // 2
        for col, contrast in enumerate(CONTRASTS):
            ax = axes[row, col]
            img = vols[contrast][:, :, z].astype(np.float32)
            brain = img[img > 0]
            vmax = float(np.percentile(brain, 99.5)) if brain.size else 1.0
            ax.imshow(img.T, cmap="gray", origin="lower", vmin=0.0, vmax=vmax, interpolation="nearest")
            if seg is not None and seg[:, :, z].any():
                ax.contour(seg[:, :, z].T.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(contrast.upper(), fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{label}\n{Path(files[contrast]).name.split('_t1')[0]}, z={z}", fontsize=8)
    fig.suptitle("Synthetic demo cohort (2 mm, lesion outline in red)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(fig, out_png, dpi=110)
