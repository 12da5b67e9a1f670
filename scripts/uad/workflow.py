"""The evaluation run of both bundles: infer on validation and test volumes, calibrate, measure, report."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import nn
from tqdm import tqdm

from .calibration import calibrate_thresholds, default_threshold, has_lesion
from .data import case_name
from .errors import InputError
from .figures import save_overlay, save_pr_curve
from .files import atomic_output, atomic_write_csv, remove_stale_temporaries
from .io import THRESHOLDS_FILE, write_json, write_thresholds
from .metrics import (
    average_precision,
    in_brain_voxels,
    l1_ratio,
    pooled_dice,
    reconstruction_metrics,
    roc_auc,
    slice_detection_auroc,
    summarise,
    volume_metrics,
)
from .sharding import shard_cases, shard_of
from .transforms import check_anomaly_map

__all__ = [
    "collect_cases",
    "evaluate",
    "evaluate_cases",
    "evaluate_sets",
    "format_metrics",
    "read_evaluated_cases",
    "set_outputs",
]

logger = logging.getLogger(__name__)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().float().cpu())[0, 0]


CASE_ARRAYS = ("image", "reconstruction", "anomaly_map", "mask", "seg")
POSTPROCESSING_KEYS = ("erosion_iterations", "median_kernel", "smooth_sigma")  # recorded under extra in metrics.json


def _save_case(path: Path, case: dict[str, Any], key: str) -> None:
    """One inferred case as ``.npz`` (atomic), with the ``key`` of the weights and settings it was computed with."""
    arrays = {k: case[k] for k in CASE_ARRAYS if case[k] is not None}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, cache_key=np.array(key), name=np.array(case["name"]), **arrays)


def _load_case(path: Path, key: str | None) -> dict[str, Any] | None:
    """A case saved by :func:`_save_case` with the same ``key`` (None: any, stored under ``"cache_key"``), or None
    (absent, other weights or settings, unreadable)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            if key is not None and str(f["cache_key"]) != key:
                return None
            case = {"name": str(f["name"]), **{k: f[k] if k in f else None for k in CASE_ARRAYS}}
            return case if key is not None else {**case, "cache_key": str(f["cache_key"])}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("%s: unreadable cached case, not used (%s)", path, e)
        return None


@torch.inference_mode()
def collect_cases(
    entries: Sequence[dict],
    preprocessing: Callable,
    inferer: Callable,
    network: nn.Module,
    device: str | torch.device,
    desc: str = "inference",
    num_workers: int = 0,
    healthy_memo: dict[tuple, dict[str, Any]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str = "",
    recompute: bool = False,
    may_be_zero: bool = False,
    infer: bool = True,
) -> list[dict[str, Any]]:
    """Run ``inferer(image, network, mask=mask, return_reconstruction=True)`` on every entry, on the model grid.

    ``healthy_memo`` (shared by calls with the same network and inferer) keeps the cases of entries without ``seg``:
    an entry found there is not inferred again (e.g. the healthy validation volumes of several test sets).
    With ``cache_dir`` each inferred case is saved there (:func:`_case_path`), and a case saved with the same
    ``cache_key`` (the weights and settings) is read back instead of inferred: an interrupted evaluation goes on
    where it stopped; ``recompute`` infers every case again (and saves it). ``may_be_zero``: see
    :func:`~uad.transforms.check_anomaly_map`. ``infer`` False reads every case from ``cache_dir`` (the merge of
    shards, :func:`evaluate_sets`).

    Raises:
        InputError: with ``infer`` False, cases not in ``cache_dir`` under ``cache_key`` (naming them).

    Returns:
        cases ``{"name", "image", "reconstruction", "anomaly_map", "mask", "seg"}`` as (H, W, D) numpy arrays
        (``seg`` None for entries without one), ready for :func:`evaluate_cases`.
    """
    memo = {} if healthy_memo is None else healthy_memo
    cached = {}
    if cache_dir is not None:
        remove_stale_temporaries(cache_dir)
        for e in [] if recompute else entries:
            if _memo_key(e) not in memo and (case := _load_case(_case_path(cache_dir, e), cache_key)) is not None:
                cached[id(e)] = case
        if cached:
            logger.warning(
                "%s: %d of %d case(s) read from %s, computed before with the same weights and settings (set recompute "
                "true to infer them again)",
                desc,
                len(cached),
                len(entries),
                cache_dir,
            )
    todo = [e for e in entries if _memo_key(e) not in memo and id(e) not in cached]
    if todo and not infer:
        names = [e.get("name", case_name(e["image"])) for e in todo]
        raise InputError(
            f"{desc}: {len(todo)} case(s) not in {cache_dir} with these weights and settings ({', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}): a shard has not finished, or ran with other weights or settings"
        )
    network.eval()
    loader = DataLoader(Dataset(todo, preprocessing), batch_size=1, shuffle=False, num_workers=num_workers)
    inferred = dict(cached)
    for entry, batch in zip(todo, tqdm(loader, desc=desc, unit="volume"), strict=True):
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        anomaly_map, recon = inferer(image, network, mask=mask, return_reconstruction=True)
        check_anomaly_map(anomaly_map[0], mask[0], entry["image"], may_be_zero)
        inferred[id(entry)] = case = {
            "name": entry.get("name", case_name(entry["image"])),
            "image": _numpy(image),
            "reconstruction": _numpy(recon),
            "anomaly_map": _numpy(anomaly_map),
            "mask": _numpy(mask) > 0,
            "seg": _numpy(batch["seg"]) > 0 if "seg" in batch else None,
        }
        if cache_dir is not None:
            _save_case(_case_path(cache_dir, entry), case, cache_key)
    for entry in entries:
        if "seg" not in entry and id(entry) in inferred:
            memo[_memo_key(entry)] = inferred[id(entry)]
    return [inferred[id(e)] if id(e) in inferred else memo[_memo_key(e)] for e in entries]


def read_evaluated_cases(output_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The validation and test cases of a finished evaluation, as :func:`evaluate_cases` took them: read from its case
    cache (``output_dir/cases``, or the ``cases`` folder beside it for one set of several, see :func:`evaluate_sets`),
    sorted into validation and test by its ``metrics.json``.

    Raises:
        InputError: no ``metrics.json`` with case lists, a listed case missing from the cache, two cached cases of one
            name (a stale one), or cases of several runs (weights or settings).
    """
    out = Path(output_dir)
    metrics_file = out / "metrics.json"
    try:
        listed = json.loads(metrics_file.read_text())["cases"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{metrics_file}: not the metrics of a finished evaluation ({e})") from e
    cases_dir = out / "cases" if (out / "cases").is_dir() else out.parent / "cases"
    stored: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(cases_dir.glob("*.npz")):
        if (case := _load_case(path, None)) is None:
            continue
        if case["name"] in stored:
            raise InputError(
                f"{cases_dir}: two cached cases named {case['name']!r} ({stored[case['name']][0].name}, {path.name}); "
                "remove the stale one"
            )
        stored[case["name"]] = path, case
    val_names = [*listed.get("best_dice_calibration", []), *listed.get("fpr_calibration", [])]
    test_names = listed.get("test", [])
    missing = [n for n in (*val_names, *test_names) if n not in stored]
    if missing:
        raise InputError(f"{cases_dir}: {len(missing)} evaluated cases are not cached, e.g. {missing[:3]}")
    keys = {stored[n][1]["cache_key"] for n in (*val_names, *test_names)}
    if len(keys) > 1:
        raise InputError(f"{cases_dir}: the cases come from several runs (weights or settings)")
    cases = {n: {k: v for k, v in stored[n][1].items() if k != "cache_key"} for n in (*val_names, *test_names)}
    return [cases[n] for n in val_names], [cases[n] for n in test_names]


def _case_path(cache_dir: str | os.PathLike, entry: dict) -> Path:
    """Where :func:`collect_cases` keeps an entry's case: named after the case and a digest of its files (paths, sizes,
    modification times, so that a file written again is inferred again)."""
    stats = {k: os.stat(entry[k]) for k in ("image", "mask", "seg") if entry.get(k)}
    files = "|".join(f"{entry[k]}:{st.st_size}:{st.st_mtime_ns}" for k, st in stats.items())
    return (
        Path(cache_dir)
        / f"{entry.get('name', case_name(entry['image']))}-{hashlib.sha1(files.encode()).hexdigest()[:8]}.npz"
    )


def _memo_key(entry: dict) -> tuple:
    return entry["image"], entry.get("mask"), entry.get("seg"), entry.get("name")


def _check_case(case: Mapping[str, Any]) -> None:
    shape = np.shape(case["anomaly_map"])
    for key in ("image", "reconstruction", "mask", "seg"):
        if case.get(key) is not None and np.shape(case[key]) != shape:
            raise ValueError(f"case {case['name']!r}: {key} has shape {np.shape(case[key])}, anomaly map {shape}.")


def _test_row(case: Mapping[str, Any], thresholds: Mapping[str, float], min_component_size: int) -> dict[str, Any]:
    """Per-volume metrics of a test case, plus the l1 ratio of its raw residual when a reconstruction is given."""
    seg = case.get("seg")
    row = {
        "name": case["name"],
        **volume_metrics(case["anomaly_map"], seg, case["mask"], thresholds, min_component_size),
    }
    row["l1_ratio"] = math.nan
    if case.get("reconstruction") is not None and seg is not None:
        residual = np.abs(np.asarray(case["image"], dtype=np.float64) - case["reconstruction"])
        row["l1_ratio"] = l1_ratio(residual, seg, case["mask"])
    return row


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "case"


def evaluate_cases(
    val_cases: Sequence[Mapping[str, Any]],
    test_cases: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    fprs: Sequence[float] = (0.01, 0.05, 0.10),
    min_component_size: int = 8,
    n_overlays: int = 4,
    extra: Mapping[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Calibrate thresholds on validation cases, evaluate test cases, write metrics, plots and ``thresholds.json``.

    A case is ``{"name", "image", "reconstruction" (or None), "anomaly_map", "mask", "seg" (or None)}`` with
    (H, W, D) numpy arrays, image in [0, 1]. Validation cases with lesion voxels calibrate ``best_dice_val``;
    validation cases without (seg None or empty) calibrate ``fpr_<p>`` for each of ``fprs`` and give the
    reconstruction metrics (see ``calibration``). Test labels are used for metrics only; test cases with ``seg=None``
    count as healthy.

    Writes to ``out_dir`` (each file atomically): ``metrics.json``, ``per_volume.csv``, ``pr_curve.png``,
    ``overlays/<name>.png`` (lesion cases first) and ``thresholds.json`` (``{"threshold", "method",
    "thresholds", "weights_sha256"}`` with the digest of ``weights``, the file the maps came from; read by inference;
    when nothing could be calibrated it is not written and a stale one removed).
    ``extra`` (e.g. the method's settings) is stored as is under ``"extra"`` in ``metrics.json``.

    Returns:
        the content of ``metrics.json``.
    """
    for case in (*val_cases, *test_cases):
        _check_case(case)
    labelled = [c for c in val_cases if has_lesion(c)]
    healthy = [c for c in val_cases if not has_lesion(c)]
    thresholds, validation = calibrate_thresholds(labelled, healthy, fprs)
    method = default_threshold(thresholds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = [_test_row(c, thresholds, min_component_size) for c in test_cases]
    recon_cases = [c for c in healthy if c.get("reconstruction") is not None]
    recon_rows = [reconstruction_metrics(c["image"], c["reconstruction"], c["mask"]) for c in recon_cases]
    maps, masks, segs = ([c.get(k) for c in test_cases] for k in ("anomaly_map", "mask", "seg"))
    pooled, slice_auroc = {}, math.nan
    if test_cases:
        scores, labels = in_brain_voxels(maps, masks), in_brain_voxels(segs, masks) != 0
        pooled = {"auprc": average_precision(scores, labels), "auroc": roc_auc(scores, labels)}
        pooled.update({f"dice@{name}": pooled_dice(rows, name) for name in thresholds})
        slice_auroc = slice_detection_auroc(maps, masks, segs)
        if labels.any():
            save_pr_curve(out_dir / "pr_curve.png", scores, labels, thresholds)
        else:
            logger.warning("No lesion voxel in the test cases: no PR curve.")

    metrics = {
        "thresholds": thresholds,
        "threshold_method": method,
        "binarisation": f"anomaly_map > threshold inside the brain mask, then 3D components (26-connectivity) of "
        f"fewer than {min_component_size} voxels removed",
        "min_component_size": min_component_size,
        "fprs": list(fprs),
        "summary": summarise(rows),
        "healthy_test": summarise([r for r, c in zip(rows, test_cases, strict=True) if not has_lesion(c)]),
        "pooled_test": pooled,
        "slice_auroc": slice_auroc,
        "validation_labelled": validation,
        "reconstruction_healthy_val": summarise(recon_rows),
        "counts": {
            "val_labelled": len(labelled),
            "val_healthy": len(healthy),
            "test": len(test_cases),
            "test_with_lesion": sum(has_lesion(c) for c in test_cases),
        },
        "cases": {
            "best_dice_calibration": [c["name"] for c in labelled],
            "fpr_calibration": [c["name"] for c in healthy],
            "reconstruction_metrics": [c["name"] for c in recon_cases],
            "test": [c["name"] for c in test_cases],
        },
    }
    if extra:
        metrics["extra"] = dict(extra)
    atomic_write_csv(out_dir / "per_volume.csv", rows)
    write_json(out_dir / "metrics.json", metrics)
    write_thresholds(out_dir / THRESHOLDS_FILE, thresholds, method, weights)
    for case in sorted(test_cases, key=lambda c: not has_lesion(c))[:n_overlays]:
        save_overlay(
            out_dir / "overlays" / f"{_safe_name(case['name'])}.png",
            case["image"],
            case["anomaly_map"],
            reconstruction=case.get("reconstruction"),
            seg=case.get("seg"),
            mask=case["mask"],
            threshold=thresholds.get(method),
            title=f"{case['name']}: outline at {method or 'no threshold'}",
            min_component_size=min_component_size,
        )
    logger.info("Evaluated %d test cases with thresholds %s; outputs in %s.", len(test_cases), thresholds, out_dir)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of the summary metrics (mean ± std over test volumes) and the thresholds."""
    lines = [f"{'metric':<28} {'mean':>8} {'std':>8} {'n':>4}"]
    for name, stats in metrics["summary"].items():
        lines.append(f"{name:<28} {stats['mean']:>8.4f} {stats['std']:>8.4f} {stats['n']:>4}")
    for name, value in metrics.get("pooled_test", {}).items():
        lines.append(f"{'pooled_' + name:<28} {value:>8.4f}")
    lines.append(f"{'slice_auroc':<28} {metrics.get('slice_auroc', float('nan')):>8.4f}")
    for name, value in metrics.get("validation_labelled", {}).items():
        lines.append(f"{'val_' + name:<28} {value:>8.4f}")
    for name, stats in metrics.get("reconstruction_healthy_val", {}).items():
        lines.append(f"{'healthy_val_' + name:<28} {stats['mean']:>8.4f} {stats['std']:>8.4f} {stats['n']:>4}")
    for name, value in metrics["thresholds"].items():
        lines.append(f"threshold {name:<18} {value:>8.5f}")
    return "\n".join(lines)


def evaluate(
    network: nn.Module,
    inferer: Callable,
    preprocessing: Callable,
    val_entries: Sequence[dict],
    test_entries: Sequence[dict],
    output_dir: str | os.PathLike,
    threshold_file: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    fprs: Sequence[float] = (0.01, 0.05, 0.10),
    min_component_size: int = 8,
    n_overlays: int = 4,
    extra: dict[str, Any] | None = None,
    healthy_memo: dict[tuple, dict[str, Any]] | None = None,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    may_be_zero: bool = False,
    infer: bool = True,
) -> dict[str, Any]:
    """Infer on validation and test entries, calibrate thresholds on validation only, evaluate the test entries.

    With a ``cache_key`` (the weights and settings, see :func:`collect_cases`) the inferred cases are kept in
    ``cache_dir`` (default ``output_dir/cases``), so that a run started again after an interruption infers only the
    cases it had not done; ``recompute`` infers them all again; ``infer`` False infers none (see
    :func:`collect_cases`). ``may_be_zero``: see :func:`~uad.transforms.check_anomaly_map`.

    Writes the outputs of :func:`evaluate_cases` to ``output_dir`` (with ``extra``, e.g. the inferer's settings,
    under ``"extra"`` in ``metrics.json``, and there under ``"postprocessing"`` the inferer's map post-processing,
    ``POSTPROCESSING_KEYS``, where it has them), copies the calibrated ``thresholds.json`` (naming ``weights``, the file
    the network's weights came from) to ``threshold_file`` (where inference looks for it) and prints the metrics
    table. ``healthy_memo``: see :func:`collect_cases`.
    """
    postprocessing = {k: getattr(inferer, k) for k in POSTPROCESSING_KEYS if hasattr(inferer, k)}
    if postprocessing:
        extra = {**(extra or {}), "postprocessing": postprocessing}
    options: dict[str, Any] = {"may_be_zero": may_be_zero, "infer": infer}
    if cache_key:
        cache_dir = Path(output_dir) / "cases" if cache_dir is None else cache_dir
        options.update(cache_dir=cache_dir, cache_key=cache_key, recompute=recompute)
    val_cases = collect_cases(
        val_entries, preprocessing, inferer, network, device, desc="validation", healthy_memo=healthy_memo, **options
    )
    test_cases = collect_cases(test_entries, preprocessing, inferer, network, device, desc="test", **options)
    metrics = evaluate_cases(val_cases, test_cases, output_dir, fprs, min_component_size, n_overlays, extra, weights)
    produced = Path(output_dir) / "thresholds.json"
    if threshold_file and produced.is_file() and Path(threshold_file).resolve() != produced.resolve():
        with atomic_output(threshold_file) as tmp:
            shutil.copyfile(produced, tmp)
        logger.info("calibrated threshold stored at %s", threshold_file)
    print(format_metrics(metrics))
    print(f"metrics, per-volume CSV, PR curve and overlays: {Path(output_dir).resolve()}")
    return metrics


def set_outputs(
    output_dir: str | os.PathLike, threshold_file: str | os.PathLike | None, set_name: str, several: bool
) -> tuple[Path, str | None]:
    """Where :func:`evaluate_sets` writes a test set: ``output_dir`` and ``threshold_file`` themselves when it is the
    only set; ``output_dir/<set_name>`` and ``thresholds_<set_name>.json`` beside ``threshold_file`` among several."""
    if not several:
        return Path(output_dir), str(threshold_file) if threshold_file else None
    if not threshold_file:
        return Path(output_dir) / set_name, None
    path = Path(threshold_file)
    return Path(output_dir) / set_name, str(path.with_name(f"{path.stem}_{set_name}{path.suffix}"))


def evaluate_sets(
    network: nn.Module,
    inferer: Callable,
    preprocessing: Callable,
    sets: Mapping[str, tuple[Sequence[dict], Sequence[dict]]],
    output_dir: str | os.PathLike,
    threshold_file: str | os.PathLike | None = None,
    shard: Sequence[int] | None = None,
    merge: bool = False,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` for each test set ``{name: (val_entries, test_entries)}``, each calibrated on its own split.

    Outputs go where :func:`set_outputs` says; several sets infer the healthy validation volumes they share once.
    ``options``: the keyword arguments of :func:`evaluate` (``weights``, ``device``, ``fprs``, ``min_component_size``,
    ``n_overlays``, ``extra``, ``cache_key``, ``recompute``, ``may_be_zero``).

    Many processes: with ``shard`` ``[i, n]`` (n > 1) this process infers only its shard of the run's cases (every
    case of every set once, see :func:`~uad.sharding.shard_cases`) into ``output_dir/cases`` and computes no metrics;
    ``merge`` then computes them from the cases of all shards, inferring none (a case missing, or inferred with other
    weights or settings, is an error naming it). In a ``torchrun`` process group every rank infers its shard, waits
    for the others, and rank 0 merges.

    Returns:
        the metrics of each set (``{}`` on a shard that does not merge).
    """
    index, count = shard_of(shard)
    cache_dir = Path(output_dir) / "cases"  # one for every set and shard
    if (count > 1 or merge) and not options.get("cache_key"):
        raise InputError("shards and their merge need a cache_key (the weights and settings of the run)")
    if merge and options.get("recompute"):
        raise InputError("merge reads the cases the shards inferred: it cannot recompute them (set recompute false)")
    if count > 1:
        unique = list({_memo_key(e): e for val, test in sets.values() for e in (*val, *test)}.values())
        mine = shard_cases(unique, (index, count))
        cache = {k: options[k] for k in ("cache_key", "recompute", "may_be_zero") if k in options}
        device = options.get("device", "cpu")
        collect_cases(
            mine, preprocessing, inferer, network, device, f"shard {index} of {count}", **cache, cache_dir=cache_dir
        )
        if not torch.distributed.is_initialized():
            logger.warning(
                "shard %d of %d: %d case(s) in %s; merge (merge true) once every shard has finished",
                index,
                count,
                len(mine),
                cache_dir,
            )
            return {}
        torch.distributed.barrier()  # the one collective: every rank reaches it after its own shard
        if index != 0:
            return {}
        merge = True
    several = len(sets) > 1
    memo: dict[tuple, dict[str, Any]] | None = {} if several else None
    results = {}
    for name, (val, test) in sets.items():
        out, thresholds = set_outputs(output_dir, threshold_file, name, several)
        logger.info("test set %s: outputs in %s", name, out)
        results[name] = evaluate(
            network,
            inferer,
            preprocessing,
            val,
            test,
            out,
            thresholds,
            **options,
            healthy_memo=memo,
            cache_dir=cache_dir,
            infer=not merge,
        )
    return results
