"""Datalist writers of the repository scripts (a bundle reads datalists, ``uad.data``, but never writes one)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from uad.data import ENTRY_KEYS, load_split_csv, validate_entries
from uad.files import atomic_write_text

__all__ = ["seed_layout_to_datalist", "write_datalist"]


def write_datalist(path: str | os.PathLike, sections: dict[str, list[dict]], relative: bool = True) -> Path:
    """Write a datalist JSON atomically; with ``relative`` the paths are stored relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for section, entries in sections.items():
        out[section] = []
        for entry in entries:
            item = {}
            for k in ENTRY_KEYS:
                if entry.get(k):
                    p = os.path.abspath(entry[k])
                    item[k] = os.path.relpath(p, path.parent.resolve()) if relative else p
            out[section].append(item)
    atomic_write_text(path, json.dumps(out, indent=4) + "\n")
    return path


def seed_layout_to_datalist(
    data_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    contrast: str,
    train_csvs: Sequence[str] = ("IXI_train_fold0",),
    val_csvs: Sequence[str] = ("IXI_val_fold0",),
    test_csvs: Sequence[str] = ("IXI_test",),
) -> Path:
    """Convert seed-layout split CSVs (names without ``.csv`` under ``splits/``) into a datalist JSON."""

    def read(names: Sequence[str]) -> list[dict]:
        return [e for n in names for e in load_split_csv(Path(data_dir) / "splits" / f"{n}.csv", data_dir, contrast)]

    sections = {"training": read(train_csvs), "validation": read(val_csvs), "test": read(test_csvs)}
    for entries in sections.values():
        validate_entries(entries)
    return write_datalist(out_path, sections)
