#!/usr/bin/env python
"""Write the deterministic synthetic demo cohort (``lib.demo_cohort``: its layout, sizes and generator).

python scripts/make_demo_data.py --out demo/data [--size tiny|small|default|large] [--seed 0] [--workers N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from lib.demo_cohort import FIGURE_NAME, MANIFEST_NAME, SIZES, build_cohort


def _parser() -> argparse.ArgumentParser:
    sizes = "\n".join(
        f"  {k:8s} healthy {v['train']} train / {v['val']} val / {v['test']} test; "
        f"{v['lesion_val']} val / {v['lesion_test']} test per lesion set"
        for k, v in SIZES.items()
    )
    epilog = (
        f"sizes:\n{sizes}\n\n"
        "layout (under --out):\n"
        "  Train/ixi/{t1,t2,mask}/<name>_{t1,t2,mask}.nii.gz           healthy subjects\n"
        "  Test/<Set>/{t1,t2,mask,seg}/<name>_{t1,t2,mask,seg}.nii.gz  Set in Tumour, MS, Stroke\n"
        "  splits/IXI_{train_fold0,val_fold0,test}.csv, splits/<Set>_{val,test}.csv\n"
        "  datalists/<Set>_{t1,t2}.json (MONAI datalists; Set in IXI, Tumour, MS, Stroke)\n"
        f"  {FIGURE_NAME} (preview), {MANIFEST_NAME} (manifest)\n\n"
        "example:\n  python scripts/make_demo_data.py --out demo/data --size tiny --seed 0"
    )
    parser = argparse.ArgumentParser(
        prog="make_demo_data.py",
        description=(
            "Generate a deterministic synthetic skull-stripped brain-MRI cohort at 2 mm: T1-like and T2-like\n"
            "images, brain masks and exact lesion ground truth for tumour, MS and stroke sets, in the cDDPM seed\n"
            "layout, from the MNI152 template shipped with nilearn (no download)."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="data root to write: absent, empty, or a previous demo cohort"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed, non-negative; the same seed gives the same data (default: 0)"
    )
    parser.add_argument("--size", choices=list(SIZES), default="default", help="cohort size (default: default)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel worker processes; the output does not depend on it (default: 1)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow writing into a non-empty folder that is not a demo cohort"
    )
    parser.add_argument("--no-figure", action="store_true", help=f"do not write {FIGURE_NAME}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        summary = build_cohort(
            args.out,
            seed=args.seed,
            size=args.size,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.quiet,
            figure=not args.no_figure,
        )
    except (FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = summary["counts"]
        print(f"demo cohort written to {summary['out_dir']} (seed {summary['seed']}, size {summary['size']})")
        print(f"  grid {tuple(summary['shape'])} at {summary['spacing_mm']:g} mm, {summary['n_files']} files")
        for set_name, by_split in counts.items():
            parts = ", ".join(f"{n} {split}" for split, n in by_split.items())
            line = f"  {set_name:7s} {parts}"
            vols = summary["lesion_ml"].get(set_name)
            if vols:
                line += f"; lesion volume {min(vols):.1f}-{max(vols):.1f} cm^3 (median {np.median(vols):.1f})"
            print(line)
        print(f"  {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
