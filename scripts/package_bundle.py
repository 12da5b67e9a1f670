"""Package a bundle as a standalone zip (model-zoo style), with the shared ``scripts/uad`` code copied in.

    python scripts/package_bundle.py cddpm_bundle --out dist/ [--with-weights]

Each bundle carries its copy of the shared code in ``<bundle>/scripts/uad`` (``scripts/sync_shared.py``), so the
unzipped bundle runs on its own. Weights (``.pt``, ``.ts`` under ``models/``, ``models/ixi_t1/`` included) and the
files describing them (``model_config.json``, ``thresholds.json``) are left out unless ``--with-weights``; caches and
TensorBoard/evaluation outputs are always left out. The archive is checked before it is kept: every config in it must
parse and instantiate its network from the unzipped copy alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from uad.files import atomic_output

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"__pycache__", ".pytest_cache", "eval", "runs"}


def bundle_files(bundle: Path, with_weights: bool = False) -> list[tuple[Path, str]]:
    """(file on disk, name in the archive) for every file to ship (symlinks followed)."""
    files = []
    for root, dirs, names in os.walk(bundle, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(bundle)
            if (
                rel.parts[0] == "models"
                and not with_weights
                and (path.suffix in (".pt", ".ts") or path.suffix == ".json")
            ):
                continue
            files.append((path, f"{bundle.name}/{rel.as_posix()}"))
    return files


def check_archive(archive: Path, bundle_name: str) -> None:
    """Unzip into a temporary folder and instantiate the network of every config there (no repository on path)."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        root = Path(tmp) / bundle_name
        code = (
            "from monai.bundle import ConfigParser\n"
            "for files in (['train'], ['inference'], ['inference', 'evaluate']):\n"
            "    p = ConfigParser(); p.read_config([f'configs/{f}.json' for f in files])\n"
            "    p.get_parsed_content('network_def')\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the packaged bundle does not load on its own:\n{result.stderr[-3000:]}")


def package(bundle: str | os.PathLike, out_dir: str | os.PathLike, with_weights: bool = False) -> Path:
    """Write ``<out_dir>/<bundle>.zip`` atomically and return its path."""
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{bundle}: not a bundle (no configs/metadata.json)")
    archive = Path(out_dir) / f"{bundle.name}.zip"
    with atomic_output(archive) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path, name in bundle_files(bundle, with_weights):
                zf.write(path, name)
        check_archive(tmp, bundle.name)
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="bundle folder, e.g. cddpm_bundle")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder (default: dist/)")
    parser.add_argument("--with-weights", action="store_true", help="include the weights under models/")
    args = parser.parse_args(argv)
    print(f"wrote {package(args.bundle, args.out, args.with_weights)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
