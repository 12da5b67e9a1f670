"""Convert the cDDPM seed layout (split CSVs) into a MONAI datalist JSON for one contrast.

    python scripts/convert_datalist.py --data-dir DATA --contrast t2 --out DATA/datalist_t2.json \\
        --train IXI_train_fold0 --val IXI_val_fold0 Brats21_val --test Brats21_test

Split names are CSV files under DATA/splits without ``.csv``. Every listed file is checked (exists, readable image,
image/mask/seg geometry agree) before anything is written; paths in the JSON are relative to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.datalists import seed_layout_to_datalist
from uad.data import CONTRASTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="seed-layout root (has splits/, Train/, Test/)")
    parser.add_argument("--contrast", choices=CONTRASTS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="datalist JSON to write")
    parser.add_argument("--train", nargs="*", default=["IXI_train_fold0"], help="splits for the 'training' section")
    parser.add_argument("--val", nargs="*", default=["IXI_val_fold0"], help="splits for the 'validation' section")
    parser.add_argument("--test", nargs="*", default=["IXI_test"], help="splits for the 'test' section")
    args = parser.parse_args(argv)
    try:
        path = seed_layout_to_datalist(args.data_dir, args.out, args.contrast, args.train, args.val, args.test)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
