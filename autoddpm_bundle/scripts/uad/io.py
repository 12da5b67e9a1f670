"""Output helpers: atomic NIfTI writing and the calibrated threshold file."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monai.data import NibabelWriter

__all__ = ["AtomicNibabelWriter", "atomic_output", "atomic_path", "read_threshold"]

logger = logging.getLogger(__name__)


def atomic_path(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` with the same extension, to write to before ``os.replace``."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.tmp{os.getpid()}{suffix}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same extension); on success move it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that writes to a temporary file and renames it, so no half-written NIfTI is ever left."""

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs) -> None:
        with atomic_output(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)


def read_threshold(path: str | os.PathLike | None) -> float | None:
    """The calibrated threshold stored by evaluation (``{"threshold": t, "method": ...}``), or None if absent."""
    if not path or not Path(path).is_file():
        logger.info("no calibrated threshold at %s: only anomaly maps will be written", path)
        return None
    try:
        content = json.loads(Path(path).read_text())
        threshold = float(content["threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a threshold file with a numeric 'threshold' ({e})") from e
    logger.info("binarising anomaly maps at %.5f (%s, from %s)", threshold, content.get("method", "?"), path)
    return threshold
