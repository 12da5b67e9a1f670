"""Files written so that nothing is ever half-written: temporary siblings renamed into place, the leftovers of
killed runs removed, and file digests. Standard library only (figures: the matplotlib their caller loaded), so every
layer (data, outputs, scripts) uses it."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "atomic_output",
    "atomic_path",
    "atomic_write_csv",
    "atomic_write_figure",
    "atomic_write_text",
    "file_digest",
    "remove_stale_temporaries",
    "run_key",
    "settings_digest",
]

logger = logging.getLogger(__name__)


def atomic_path(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` with the same extension, to write to before ``os.replace``."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.tmp{os.getpid()}{suffix}")


@contextmanager
def atomic_output(path: str | os.PathLike, keep_name: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same extension); on success move it onto ``path``, else delete it.

    ``keep_name``: yield ``path``'s own name inside a temporary sibling folder instead, for formats that record their
    file name inside the file (TorchScript archives name their root folder after it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic_path(path)
    if keep_name:
        staging.mkdir()
    tmp = staging / path.name if keep_name else staging
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    """Delete the file or folder tree ``path`` if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`); returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write the matplotlib figure ``fig`` as PNG atomically and close it, also when writing fails; returns the path."""
    import matplotlib.pyplot as plt  # only here: the caller has matplotlib loaded, every other writer needs none

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def atomic_write_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None
) -> Path:
    """Write dict ``rows`` as CSV atomically, with ``columns`` (default: every key, in the order first seen)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


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
    """Delete the temporary files and folders (``atomic_output``) that a killed run left in ``folder``: those of
    processes that no longer run. Returns them."""
    folder = Path(folder)
    stale = [
        p
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := _TEMPORARY.match(p.name)) and not _running(int(m.group(1)))
    ]
    for path in stale:
        _remove(path)
        logger.info("removed %s, left by an interrupted run", path)
    return stale


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (e.g. the weights a cached result was computed with)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _settings(value: object, depth: int) -> object:
    """The plain values that define an object: numbers, strings, sequences, mappings, array bytes (as digests), and
    the attributes of other objects down to ``depth`` levels; modules with parameters (networks) are left out."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_settings(v, depth) for v in value]
    if isinstance(value, dict):
        return {str(k): _settings(v, depth) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a tensor
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if depth == 0 or callable(getattr(value, "parameters", None)) and any(True for _ in value.parameters()):
        return type(value).__name__
    attributes = {k: v for k, v in vars(value).items() if not k.startswith("__")} if hasattr(value, "__dict__") else {}
    return {"type": type(value).__name__, **{k: _settings(v, depth - 1) for k, v in sorted(attributes.items())}}


def settings_digest(*objects: object, depth: int = 3) -> str:
    """SHA-256 of the settings of ``objects`` (e.g. an inferer with its scheduler and noise): two objects built from
    the same config values have the same digest; any changed value changes it."""
    text = json.dumps([_settings(o, depth) for o in objects], sort_keys=True, default=lambda v: type(v).__name__)
    return hashlib.sha256(text.encode()).hexdigest()


def run_key(weights: str | os.PathLike, inferer: object, settings: Sequence[object]) -> str:
    """The key of a run's outputs: the SHA-256 of its ``weights`` and the digest of its ``inferer`` and other
    ``settings`` (threshold, grid, seed...); outputs stored under another key belong to another run."""
    return file_digest(weights) + settings_digest(inferer, list(settings))
