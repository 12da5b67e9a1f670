#!/usr/bin/env python
"""The IXI -> ATLAS benchmark: train on healthy IXI T1 slices, calibrate on ATLAS ``val``, test on ATLAS ``test``.

    python scripts/make_atlas_benchmark.py --ixi ../shared/data/ixi_t1_axial --atlas ../shared/data/atlas_t1_axial \
        --out DIR [--brain-masks derived|atlas]

One physical grid: both sets are axial slices of MNI152-registered T1 volumes over the same field of view (233 mm
anterior -> posterior, 197 mm left -> right). IXI PNGs are 233 x 197 pixels at 1 mm; ATLAS PNGs are 128 x 128 and
are resized to 233 x 197 (image bilinear, masks nearest neighbour), which puts them on the IXI grid. Every slice is
written as an (H, W, 1) NIfTI on an identity 1 mm affine, so the bundles' ``pixdim`` resamples both alike.

Brain masks, one convention for training and test (``derived``, the default): the MNI152 template's brain mask at the
slice that matches the mean IXI image, AND the image above 5 % of its 99.5th percentile, holes filled, largest
component (``lib.slices.brain_mask``, as the IXI benchmark). ``atlas`` uses the masks ATLAS ships for its slices
instead (IXI keeps the derived ones). The manifest records how well the derived masks agree with the shipped ones.

Written under DIR::

    ixi/train/<id>_{t1,mask}.nii.gz        every IXI train/ slice, healthy: training
    ixi/val/<id>_{t1,mask}.nii.gz          every IXI val/ slice, healthy: validation (the FPR thresholds, 5 % FPR)
    atlas/<name>_{t1,mask,seg}.nii.gz      the ATLAS slices of splits/val.txt and splits/test.txt
    datalist_atlas.json                    training: IXI train; validation: the ATLAS val slices with a lesion (the
                                           Dice-optimal threshold) + IXI val; test: every ATLAS test slice
    manifest.json

ATLAS val slices without a lesion are left out of the validation section (they would count as healthy FPR
calibration, which the protocol takes from IXI). Every input is checked first: a missing image, mask or split entry,
or a mask of another size than its image, stops the run naming the file before anything is written.
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
from lib.slices import brain_mask, match_template, read_png, save_slice, subject_ids
from PIL import Image
from uad.errors import InputError
from uad.files import atomic_write_text

__all__ = ["GRID", "build_atlas_benchmark", "main"]

GRID = (233, 197)  # rows (anterior -> posterior, mm), columns (left -> right, mm): the IXI slices' 1 mm grid
ATLAS_FOLDERS = ("images", "lesions", "brain")


def _split_names(atlas: Path, split: str) -> list[str]:
    path = atlas / "splits" / f"{split}.txt"
    if not path.is_file():
        raise InputError(f"{path}: split file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"{path}: no slices listed")
    return names


def _check_atlas(atlas: Path, names: Sequence[str]) -> None:
    """Every listed slice has its image, lesion mask and brain mask, of one size."""
    for name in names:
        sizes = {}
        for folder in ATLAS_FOLDERS:
            path = atlas / folder / name
            if not path.is_file():
                raise InputError(f"{path}: not found (listed in {atlas / 'splits'})")
            with Image.open(path) as im:
                sizes[path] = im.size
        if len(set(sizes.values())) > 1:
            image = atlas / "images" / name
            for path, size in sizes.items():
                if size != sizes[image]:
                    raise InputError(f"{path}: size {size} does not match its image {image} {sizes[image]}")


def _resized(path: Path, nearest: bool) -> np.ndarray:
    """An ATLAS PNG on the IXI grid: resized to 233 x 197 (bilinear, or nearest neighbour for masks)."""
    with Image.open(path) as im:
        im = im.convert("F")
        resized = im.resize(GRID[::-1], Image.NEAREST if nearest else Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32)
    return array > 127 if nearest else array


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def build_atlas_benchmark(
    ixi_dir: str | os.PathLike, atlas_dir: str | os.PathLike, out_dir: str | os.PathLike, brain_masks: str = "derived"
) -> dict:
    """Build the benchmark (see the module docstring) and return its summary."""
    if brain_masks not in ("derived", "atlas"):
        raise ValueError(f"brain_masks must be 'derived' or 'atlas', got {brain_masks!r}")
    start = time.time()
    ixi, atlas, out = Path(ixi_dir), Path(atlas_dir), Path(out_dir)
    files = {split: sorted((ixi / split).glob("*.png")) for split in ("train", "val")}
    for split, paths in files.items():
        if not paths:
            raise InputError(f"{ixi / split}: no PNG slices")
    splits = {split: _split_names(atlas, split) for split in ("val", "test")}
    _check_atlas(atlas, [n for names in splits.values() for n in names])
    images = {split: [read_png(p) for p in paths] for split, paths in files.items()}
    for split, arrays in images.items():
        for path, array in zip(files[split], arrays, strict=True):
            if array.shape != GRID:
                raise InputError(f"{path}: {array.shape[0]} x {array.shape[1]} pixels, expected {GRID[0]} x {GRID[1]}")
    match = match_template(np.mean([a for arrays in images.values() for a in arrays], axis=0))
    template_mask = match.pop("template_mask")

    entries: dict[str, list[dict]] = {}
    for split, arrays in images.items():
        entries[f"ixi_{split}"] = [
            {
                "image": save_slice(array, out / "ixi" / split / f"{sid}_t1.nii.gz"),
                "mask": save_slice(brain_mask(array, template_mask), out / "ixi" / split / f"{sid}_mask.nii.gz"),
            }
            for sid, array in zip(subject_ids(files[split]), arrays, strict=True)
        ]
    agreement, inside = [], []
    for split, names in splits.items():
        entries[f"atlas_{split}"] = []
        for name in names:
            image = _resized(atlas / "images" / name, nearest=False)
            lesion, shipped = _resized(atlas / "lesions" / name, True), _resized(atlas / "brain" / name, True)
            derived = brain_mask(image, template_mask)
            agreement.append(_dice(derived, shipped))
            mask = derived if brain_masks == "derived" else shipped
            if lesion.any():
                inside.append(float((lesion & mask).sum() / lesion.sum()))
            stem = out / "atlas" / Path(name).stem
            entry = {"image": save_slice(image, Path(f"{stem}_t1.nii.gz"))}
            entry["mask"] = save_slice(mask, Path(f"{stem}_mask.nii.gz"))
            entry["seg"] = save_slice(lesion, Path(f"{stem}_seg.nii.gz"))
            entry["has_lesion"] = bool(lesion.any())
            entries[f"atlas_{split}"].append(entry)

    validation = [e for e in entries["atlas_val"] if e["has_lesion"]] + entries["ixi_val"]
    datalist = {"training": entries["ixi_train"], "validation": validation, "test": entries["atlas_test"]}
    write_datalist(out / "datalist_atlas.json", datalist)
    summary = {
        "grid": {"rows_mm": GRID[0], "columns_mm": GRID[1], "atlas_png": "128 x 128, resized to 233 x 197"},
        "brain_masks": brain_masks,
        "counts": {
            "ixi_train": len(entries["ixi_train"]),
            "ixi_val": len(entries["ixi_val"]),
            **{f"atlas_{s}": len(entries[f"atlas_{s}"]) for s in splits},
            **{f"atlas_{s}_with_lesion": sum(e["has_lesion"] for e in entries[f"atlas_{s}"]) for s in splits},
        },
        "template": match,
        "derived_vs_atlas_brain_mask_dice_min_median": [
            round(min(agreement), 3),
            round(float(np.median(agreement)), 3),
        ],
        "lesion_fraction_inside_mask_min_median": [round(min(inside), 3), round(float(np.median(inside)), 3)],
    }
    manifest = {"generator": "make_atlas_benchmark", "ixi_dir": str(ixi), "atlas_dir": str(atlas), **summary}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    summary["seconds"] = round(time.time() - start, 1)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ixi", type=Path, required=True, help="healthy IXI slices: train/ and val/ PNG folders")
    parser.add_argument("--atlas", type=Path, required=True, help="ATLAS slices: images/, lesions/, brain/, splits/")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--brain-masks", choices=("derived", "atlas"), default="derived")
    args = parser.parse_args(argv)
    try:
        summary = build_atlas_benchmark(args.ixi, args.atlas, args.out, args.brain_masks)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
