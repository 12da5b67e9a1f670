"""How much Gaussian smoothing of the anomaly map to use (the inference key ``smooth_sigma``), chosen on validation.

Reads the cached cases of finished evaluations made without smoothing (an ``output_dir`` of a bundle's
``configs/evaluate.json`` with its ``cases/`` folder, e.g. the ``eval/<method>_<target>_<step>`` folders of
``scripts/benchmark.py``), smooths each stored map for every ``--sigmas`` entry exactly as inference would
(``uad.postprocessing.residual_anomaly_map``: Gaussian of the median-filtered map, times the eroded brain mask) and
evaluates it again with the evaluation's own calibration (its FPRs, smallest component and brain-mask erosion, from
its ``metrics.json``; the bundles' defaults for evaluations that predate recording them): no network runs. One row per
sigma; ``val best`` marks the sigma with the best validation Dice, the one to use. The test columns only report.

    python scripts/smoothing_sweep.py runs/atlas/atlas/eval/mean_image_ATLAS_2400 \\
        runs/atlas/atlas/eval/autoddpm_t800_m600_s12k3r100_ATLAS_2400 --sigmas 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from lib.benchmarking import header, markdown_table, quality_row, write_report
from uad.errors import InputError
from uad.postprocessing import erode_mask_per_slice, gaussian_smooth
from uad.workflow import evaluate_cases, read_evaluated_cases

logger = logging.getLogger("smoothing_sweep")
DEFAULTS = {"erosion_iterations": 3, "min_component_size": 8, "fprs": [0.01, 0.05, 0.1]}  # the bundles' configs

COLUMNS = (
    ("evaluation", "evaluation"),
    ("sigma", "sigma (px)"),
    ("chosen", "chosen"),
    ("val_best_dice", "val Dice (best)"),
    ("val_auprc", "val AUPRC"),
    ("pooled_dice", "pooled Dice@val-thr"),
    ("pooled_auprc", "pooled AUPRC"),
    ("pooled_auroc", "pooled AUROC"),
    ("dice@best_dice_val", "Dice@val-thr (mean)"),
    ("auroc", "AUROC (mean)"),
    ("healthy_fp_px", "FP px per lesion-free test case"),
)


def smoothed(cases: list[dict[str, Any]], sigma: float, erosion_iterations: int) -> list[dict[str, Any]]:
    """``cases`` with each anomaly map Gaussian-smoothed (``sigma`` voxels) inside its eroded brain mask."""
    if sigma == 0:
        return cases
    out = []
    for case in cases:
        eroded = erode_mask_per_slice(torch.from_numpy(case["mask"]), erosion_iterations).float()
        amap = gaussian_smooth(torch.from_numpy(case["anomaly_map"]).float(), sigma) * eroded
        out.append({**case, "anomaly_map": amap.numpy()})
    return out


def evaluation_settings(eval_dir: Path) -> dict[str, Any]:
    """The post-processing and calibration settings of a finished evaluation, from its ``metrics.json``.

    Raises:
        InputError: its maps are smoothed already, or it had no labelled validation case to choose a sigma on.
    """
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    recorded = {**metrics.get("extra", {}).get("postprocessing", {}), **metrics}
    if recorded.get("smooth_sigma", 0) > 0:
        raise InputError(
            f"{eval_dir}: its maps are smoothed already (smooth_sigma {recorded['smooth_sigma']}); sweep "
            "an evaluation made with smooth_sigma 0"
        )
    if not metrics["counts"]["val_labelled"]:
        raise InputError(f"{eval_dir}: no labelled validation case, nothing to choose a sigma on")
    if any(k not in recorded for k in DEFAULTS):
        logger.warning("%s: settings not recorded, assuming the bundles' defaults %s", eval_dir, DEFAULTS)
    return {k: recorded.get(k, default) for k, default in DEFAULTS.items()}


def sweep(eval_dir: Path, sigmas: list[float]) -> list[dict]:
    """One row per sigma: the evaluation of ``eval_dir``'s cases with the map smoothed."""
    val, test = read_evaluated_cases(eval_dir)
    settings = evaluation_settings(eval_dir)
    erosion_iterations = settings["erosion_iterations"]
    rows = []
    for sigma in sigmas:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = evaluate_cases(
                smoothed(val, sigma, erosion_iterations),
                smoothed(test, sigma, erosion_iterations),
                tmp,
                fprs=settings["fprs"],
                min_component_size=settings["min_component_size"],
                n_overlays=0,
            )
        rows.append({"evaluation": eval_dir.name, "sigma": sigma, **quality_row(metrics, [k for k, _ in COLUMNS])})
    max(rows, key=lambda r: r["val_best_dice"])["chosen"] = "val best"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dirs", type=Path, nargs="+", help="finished evaluations (metrics.json and cases/)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 1, 2, 3, 4, 5], help="in voxels, >= 0")
    parser.add_argument("--out", type=Path, default=Path("runs/smoothing_sweep"))
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.sigmas):
        parser.error(f"--sigmas must be >= 0, got {args.sigmas}")
    logging.basicConfig(level=logging.WARNING)
    rows = [row for eval_dir in args.eval_dirs for row in sweep(eval_dir, args.sigmas)]
    markdown = "\n".join(
        [
            header("Gaussian smoothing of the anomaly map, chosen on validation"),
            "Dice (best) and AUPRC over the pooled in-brain voxels of the labelled validation cases; the test columns "
            "at that validation threshold.\n",
            markdown_table(rows, COLUMNS),
        ]
    )
    md, _ = write_report(args.out, "smoothing_sweep", markdown, {"rows": rows, "args": vars(args)})
    print(markdown)
    print(f"\nwritten: {md} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
