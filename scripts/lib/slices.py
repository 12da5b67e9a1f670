"""Real 2D brain slices as the benchmark builders read and write them: PNG slices on the MNI152 1 mm grid, brain masks
from the MNI152 template's (matched to the slices' mean image), and (H, W, 1) NIfTI slices on an identity 1 mm affine.

The template is the T1 bundled in the nilearn wheel (``mni152.mni152_path``; nothing is downloaded); its brain mask
is computed as ``nilearn.datasets.load_mni152_brain_mask`` does (template T1 / max > 0.2).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from uad.files import atomic_output

from .mni152 import mni152_path

__all__ = [
    "AFFINE",
    "MASK_FRACTION",
    "best_slice",
    "brain_mask",
    "largest_component",
    "match_template",
    "orient",
    "read_png",
    "save_slice",
    "subject_ids",
]

AFFINE = np.eye(4)  # 1 mm, array axes = PNG rows, columns; one slice
MASK_FRACTION = 0.05


def orient(a: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 in-plane flips/transpositions: bit 4 transposes, then bit 1 flips rows, bit 2 flips columns."""
    a = a.T if code & 4 else a
    return a[:: -1 if code & 1 else 1, :: -1 if code & 2 else 1]


def fit(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre-crop / zero-pad a 2D array to ``shape``."""
    out = np.zeros(shape, a.dtype)
    src, dst = [], []
    for n, m in zip(a.shape, shape, strict=True):
        k = min(n, m)
        src.append(slice((n - k) // 2, (n - k) // 2 + k))
        dst.append(slice((m - k) // 2, (m - k) // 2 + k))
    out[tuple(dst)] = a[tuple(src)]
    return out


@functools.lru_cache(maxsize=1)
def template_t1() -> np.ndarray:
    return np.asarray(nib.load(mni152_path("t1")).dataobj, dtype=np.float32)


def match_template(mean_image: np.ndarray) -> dict:
    """Axial template slice ``z`` and orientation ``code`` (see :func:`orient`) best correlated with ``mean_image``."""
    vol = template_t1()
    codes = [c for c in range(8) if orient(vol[:, :, 0], c).shape == mean_image.shape] or list(range(8))
    ref = (mean_image - mean_image.mean()).ravel()
    best = {"correlation": -np.inf}
    for code in codes:
        stack = np.stack([fit(orient(vol[:, :, z], code), mean_image.shape).ravel() for z in range(vol.shape[2])])
        stack -= stack.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(stack, axis=1) * np.linalg.norm(ref)
        corr = np.where(norm > 0, stack @ ref / np.maximum(norm, 1e-12), -np.inf)
        z = int(np.argmax(corr))
        if corr[z] > best["correlation"]:  # strict: ties (symmetric template) keep the simpler orientation
            best = {"z": z, "code": code, "correlation": float(corr[z])}
    best["exact_shape"] = len(codes) < 8
    best["template_mask"] = largest_component(
        ndi.binary_fill_holes(best_slice(best, mean_image.shape) > 0.2 * vol.max())
    )
    return best


def best_slice(match: dict, shape: Sequence[int]) -> np.ndarray:
    """The matched template T1 slice on the IXI grid."""
    return fit(orient(template_t1()[:, :, match["z"]], match["code"]), shape)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if n > 1 else labels > 0


def brain_mask(image: np.ndarray, template_mask: np.ndarray, fraction: float = MASK_FRACTION) -> np.ndarray:
    """Template mask AND image > ``fraction`` of the 99.5th percentile, holes filled, largest component."""
    mask = template_mask & (image > fraction * np.percentile(image, 99.5))
    return largest_component(ndi.binary_fill_holes(mask))


def save_slice(array: np.ndarray, path: Path) -> str:
    """Write a 2D array as an (H, W, 1) NIfTI atomically; returns the path."""
    data = np.ascontiguousarray(array, dtype=np.uint8 if array.dtype == bool else array.dtype)[..., None]
    with atomic_output(path) as tmp:
        nib.save(nib.Nifti1Image(data, AFFINE), tmp)
    return str(path)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("F"), dtype=np.float32)


def subject_ids(paths: Sequence[Path]) -> list[str]:
    """Short subject ids (``sub-IXI002``) when unique, else full file stems."""
    short = [p.stem.split("_")[0] for p in paths]
    return short if len(set(short)) == len(short) else [p.stem for p in paths]
