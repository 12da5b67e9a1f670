"""Output helpers: atomic NIfTI and strict JSON writing, the calibrated threshold file and the model config saved with
the weights."""

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
from .files import atomic_output, atomic_write_text

__all__ = [
    "MODEL_CONFIG_FILE",
    "AtomicNibabelWriter",
    "read_model_config",
    "read_threshold",
    "write_json",
    "write_model_config",
    "write_thresholds",
]

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"


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


def write_thresholds(path: str | os.PathLike, thresholds: Mapping[str, float], method: str | None) -> None:
    """Write the calibrated threshold file that :func:`read_threshold` reads, ``{"threshold", "method",
    "thresholds"}`` with ``method`` the name of the threshold inference applies; with ``method`` None (nothing
    calibrated) remove a stale one instead."""
    path = Path(path)
    if method is not None:
        write_json(path, {"threshold": thresholds[method], "method": method, "thresholds": thresholds})
    elif path.exists():
        logger.warning("No threshold calibrated: removing the stale %s.", path)
        path.unlink()


def read_threshold(path: str | os.PathLike | None) -> float | None:
    """The calibrated threshold stored by :func:`write_thresholds` (``{"threshold": t, "method": ...}``), or None if
    absent."""
    if not path or not Path(path).is_file():
        logger.info("no calibrated threshold at %s: only anomaly maps will be written", path)
        return None
    try:
        content = json.loads(Path(path).read_text())
        threshold = float(content["threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a threshold file with a numeric 'threshold' ({e})") from e
    logger.info("binarising anomaly maps at %.5f (%s, from %s)", threshold, content.get("method", "?"), path)
    return threshold


def _flat_paths(values: dict, prefix: str = "") -> dict:
    """``{"unet": {"channels": c}}`` -> ``{"unet.channels": c}``: nested config values keyed by their dotted paths."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_paths(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_model_config(ckpt_dir: str | os.PathLike, values: dict) -> Path:
    """Save the config values that define the trained network and its input grid as ``<ckpt_dir>/model_config.json``
    (atomically), keyed by their paths in the config (``{"pixdim": [...], "unet.channels": [...]}``), so that
    ``inference.json`` rebuilds the network the weights belong to; returns the path.

    Args:
        ckpt_dir: the folder the training writes its weights to.
        values: the values, nested as in the config (``{"unet": {"channels": [...]}}``) or keyed by path.
    """
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    values = _flat_paths(values)
    if path.is_file() and (path.parent / "model.pt").is_file() and json.loads(path.read_text()) != values:
        raise InputError(
            f"{path.parent} holds a model of other sizes ({path}); train into an empty ckpt_dir, or remove "
            f"model.pt and {MODEL_CONFIG_FILE} there first"
        )
    write_json(path, values)
    logger.info("network and input grid of the weights in %s written to %s", ckpt_dir, path)
    return path


def read_model_config(ckpt_path: str | os.PathLike, training: bool = False) -> dict:
    """The config values the weights at ``ckpt_path`` were trained with: ``model_config.json`` in the checkpoint's
    folder (written by training), or ``{}`` when there is none (the config's own values then apply).

    A training run reads it too: a folder holds one model, so training into a folder with weights (e.g. the bundle's
    ``models/`` with the shipped demo network, as MONAI Label fine-tunes it) keeps their sizes, with a warning; an
    empty ``ckpt_dir`` trains the config's sizes.
    """
    path = Path(ckpt_path).parent / MODEL_CONFIG_FILE
    if not path.is_file() or (training and not Path(ckpt_path).is_file()):  # training: sizes of weights that exist
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a JSON file of config values ({e})") from e
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object of config values, got {type(values).__name__}")
    if training:
        logger.warning(
            "%s holds a model: training keeps its sizes from %s (%s); train into an empty ckpt_dir for the config's",
            path.parent,
            path,
            ", ".join(f"{k}={v}" for k, v in values.items()),
        )
    else:
        logger.info("network and input grid of %s from %s", ckpt_path, path)
    return values
