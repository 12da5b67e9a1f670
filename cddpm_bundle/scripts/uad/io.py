"""Output helpers: atomic NIfTI and strict JSON writing, the calibrated threshold file (which names the weights it
was calibrated on) and the record of the network sizes saved with the weights."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import NibabelWriter

from .errors import InputError
from .files import atomic_output, atomic_write_text, file_digest

__all__ = [
    "MODEL_CONFIG_FILE",
    "AtomicNibabelWriter",
    "THRESHOLDS_FILE",
    "check_model_config",
    "config_ids",
    "mark_thresholds_stale",
    "read_threshold",
    "write_json",
    "write_model_config",
    "write_thresholds",
]

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
THRESHOLDS_FILE = "thresholds.json"
GRID_IDS = ("pixdim", "image_size")  # the input grid: recorded with the network sizes


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that writes to a temporary file and renames it, so no half-written NIfTI is ever left."""

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs) -> None:
        with atomic_output(filename) as tmp:
            super().write(tmp, verbose=verbose, **obj_kwargs)


def _strict_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None and numpy scalars as Python numbers, tuples as lists."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN and infinities as ``null``) atomically; returns the path."""
    return atomic_write_text(path, json.dumps(_strict_json(obj), indent=4) + "\n")


def write_thresholds(
    path: str | os.PathLike, thresholds: Mapping[str, float], method: str | None, weights: str | os.PathLike | None
) -> None:
    """Write the calibrated threshold file that :func:`read_threshold` reads, ``{"threshold", "method",
    "thresholds", "weights_sha256"}`` with ``method`` the name of the threshold inference applies and the SHA-256 of
    the ``weights`` it was calibrated on (None: maps that need no weights, e.g. a baseline); with ``method`` None
    (nothing calibrated) remove a stale one instead."""
    path = Path(path)
    if method is not None:
        content = {"threshold": thresholds[method], "method": method, "thresholds": thresholds}
        write_json(path, {**content, "weights_sha256": file_digest(weights) if weights else None})
    elif path.exists():
        logger.warning("No threshold calibrated: removing the stale %s.", path)
        path.unlink()


def _read_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; InputError naming the file and ``what`` it should hold otherwise."""
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a JSON file of {what} ({e})") from e
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object of {what}, got {type(content).__name__}")
    return content


def read_threshold(path: str | os.PathLike | None, weights: str | os.PathLike | None = None) -> float | None:
    """The calibrated threshold stored by :func:`write_thresholds`, or None (maps without a mask) when there is none
    or, with ``weights``, when it was not calibrated on those weights (their SHA-256 differs from the one it records,
    or a training run marked it stale): a warning then says so.
    """
    if not path or not Path(path).is_file():
        logger.info("no calibrated threshold at %s: only anomaly maps will be written", path)
        return None
    content = _read_object(Path(path), "calibrated thresholds")
    try:
        threshold = float(content["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a threshold file with a numeric 'threshold' ({e})") from e
    if weights is not None:
        problem = content.get("stale") or (
            None if content.get("weights_sha256") == file_digest(weights) else "calibrated on other weights"
        )
        if problem:
            logger.warning(
                "%s does not apply to %s (%s; it records weights SHA-256 %s): writing anomaly maps without a mask; "
                "calibrate a threshold for these weights with evaluate.json",
                path,
                weights,
                problem,
                content.get("weights_sha256"),
            )
            return None
    logger.info("binarising anomaly maps at %.5f (%s, from %s)", threshold, content.get("method", "?"), path)
    return threshold


def mark_thresholds_stale(ckpt_dir: str | os.PathLike) -> Path | None:
    """Mark ``<ckpt_dir>/thresholds.json`` stale when a training run starts in ``ckpt_dir``: the weights it was
    calibrated on are being replaced, so :func:`read_threshold` no longer applies it. Returns the file, if any."""
    path = Path(ckpt_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    content = _read_object(path, "calibrated thresholds")
    if not content.get("stale"):
        write_json(path, {**content, "stale": f"a training run started in {ckpt_dir}: calibrate again"})
        logger.warning("%s marked stale: training replaces the weights it was calibrated on", path)
    return path


def config_ids(values: Mapping, prefix: str = "") -> dict:
    """``{"unet": {"channels": c}}`` -> ``{"unet#channels": c}``: nested config values keyed by their config ids."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(config_ids(value, f"{prefix}{key}#"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(recorded: dict, configured: dict) -> dict[str, str]:
    """``{"unet#channels": "[32, 64] there, [128, 256] here"}`` for every id whose values differ."""
    return {
        i: f"{recorded.get(i, 'unset')} there, {configured.get(i, 'unset')} here"
        for i in sorted(set(recorded) | set(configured))
        if recorded.get(i) != configured.get(i)
    }


def _listed(differences: dict[str, str]) -> str:
    return "; ".join(f"{i}: {d}" for i, d in differences.items())


def write_model_config(ckpt_dir: str | os.PathLike, sizes: Mapping) -> Path:
    """Record the sizes of the network a training run builds, and its input grid, in ``<ckpt_dir>/model_config.json``
    (atomically), keyed by their config ids (``{"pixdim": [...], "unet#channels": [...]}``, a valid config overlay);
    inference checks its own sizes against it (:func:`check_model_config`). Returns the path.

    Raises:
        InputError: ``ckpt_dir`` holds weights of other sizes (or of unknown sizes), which the run would overwrite:
            the message names both.
    """
    folder = Path(ckpt_dir)
    path, weights = folder / MODEL_CONFIG_FILE, folder / "model.pt"
    sizes = config_ids(sizes)
    if weights.is_file():
        if not path.is_file():
            raise InputError(
                f"{weights} has no {MODEL_CONFIG_FILE} beside it: a training run in {folder} would overwrite weights "
                "of unknown sizes; train into an empty ckpt_dir"
            )
        differences = _differences(_read_object(path, "network sizes"), sizes)
        if differences:
            raise InputError(
                f"{weights} was trained with other sizes ({path}) than the config files of this run set "
                f"({_listed(differences)}): train into an empty ckpt_dir, or with the config overlay those weights "
                "came with"
            )
    write_json(path, sizes)
    logger.info("network sizes and input grid of the weights in %s recorded in %s", folder, path)
    return path


def check_model_config(ckpt_path: str | os.PathLike, sizes: Mapping) -> None:
    """Check that the weights at ``ckpt_path`` were trained with the ``sizes`` the config files set (network sizes
    and input grid, nested as in the config), against the ``model_config.json`` recorded beside them. Another input
    grid (``GRID_IDS``) only warns: the network runs on it, off the protocol it was trained with.

    Raises:
        InputError: no ``model_config.json`` beside the weights, or other network sizes there: the message names both
            files and every value that differs.
    """
    path = Path(ckpt_path).parent / MODEL_CONFIG_FILE
    if not path.is_file():
        raise InputError(
            f"{ckpt_path}: no {MODEL_CONFIG_FILE} beside the weights ({path}), so the sizes they were trained with "
            "are unknown; keep the file training wrote with the weights"
        )
    differences = _differences(_read_object(path, "network sizes"), config_ids(sizes))
    if any(i not in GRID_IDS for i in differences):
        raise InputError(
            f"{ckpt_path} was trained with other sizes ({path}) than the config files set ({_listed(differences)}): "
            "run with the config overlay of those weights (e.g. configs/paper.json for the published sizes)"
        )
    if differences:
        logger.warning("%s was trained on another input grid (%s): %s", ckpt_path, path, _listed(differences))
