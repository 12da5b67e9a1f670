"""Files written so that nothing is ever half-written: temporary siblings renamed into place, the leftovers of
killed runs removed, and file digests. Standard library only, so every layer (data, outputs, scripts) uses it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "atomic_path", "file_digest", "remove_stale_temporaries"]

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


_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.[\w.]+)?$")  # what atomic_path names


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``atomic_path``) that a killed run left in ``folder``: those of processes that no
    longer run. Returns them."""
    folder = Path(folder)
    stale = [
        p
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := _TEMPORARY.match(p.name)) and p.is_file() and not _running(int(m.group(1)))
    ]
    for path in stale:
        path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted run", path)
    return stale


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (e.g. the weights a cached result was computed with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
