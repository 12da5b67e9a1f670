"""Copy the shared code ``scripts/uad`` (its one source of truth) into each bundle's ``scripts/uad``.

A bundle folder must stand alone: copied with ``cp -r``, checked out without symlink support or dropped into a MONAI
Label app's ``model/`` folder, it still runs every command. So each bundle carries a copy of the shared files; edit
them in ``scripts/uad`` only and run

    python scripts/sync_shared.py            # write the copies
    python scripts/sync_shared.py --check    # exit 1 and list the files that differ (the test suite runs this)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "scripts" / "uad"
BUNDLES = ("cddpm_bundle", "autoddpm_bundle")


def shared_files() -> list[str]:
    """Names of the shared modules."""
    return sorted(p.name for p in SOURCE.glob("*.py"))


def drift() -> list[str]:
    """``<bundle>/scripts/uad/<file>`` paths that are missing, differ from the source, or are not in it."""
    names = shared_files()
    found = []
    for bundle in BUNDLES:
        target = REPO / bundle / "scripts" / "uad"
        if target.is_symlink() or not target.is_dir():
            found.append(f"{bundle}/scripts/uad (not a folder of copies)")
            continue
        for name in names:
            copy = target / name
            if not copy.is_file() or copy.read_bytes() != (SOURCE / name).read_bytes():
                found.append(f"{bundle}/scripts/uad/{name}")
        found += [
            f"{bundle}/scripts/uad/{p.name} (not in scripts/uad)" for p in target.glob("*.py") if p.name not in names
        ]
    return found


def sync() -> None:
    """Make every bundle's ``scripts/uad`` an exact copy of the source's modules."""
    for bundle in BUNDLES:
        target = REPO / bundle / "scripts" / "uad"
        if target.is_symlink() or target.is_file():
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.py"):
            if not (SOURCE / stale.name).is_file():
                stale.unlink()
        for name in shared_files():
            shutil.copy2(SOURCE / name, target / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report the copies that differ")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for path in stale:
            print(f"out of date: {path} (run python scripts/sync_shared.py)")
        return int(bool(stale))
    sync()
    print(f"copied {len(shared_files())} shared modules into {', '.join(BUNDLES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
