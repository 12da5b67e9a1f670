"""The main job on the built-in demo data: make a demo cohort, evaluate both bundles, print their metrics side by side.

By default it evaluates the trained demo weights shipped in each bundle (``models/model.pt``, trained on the demo
cohort of seed 0, see the bundles' docs) on a freshly generated cohort of another seed (``--seed 1``), so nothing it is
tested on was seen in training; thresholds are calibrated on that cohort's validation split only. ``--train`` trains
the demo-sized bundles from scratch first (CPU: about 10 min for cDDPM, 20 min for AutoDDPM at 100 epochs).

Every step is the real bundle command a user runs (``python -m monai.bundle run`` inside the bundle folder) at the
shipped models' sizes, with ``configs/demo.json`` (a short CPU run: 100 epochs, batches of 4 x 4 slices, no loader
workers; the evaluations take its batch and workers too); this script only chains them and prints the metrics.

    python scripts/run_demo.py [--out demo] [--seed 1] [--sets Tumour MS Stroke] [--contrast t2]
        [--methods cddpm autoddpm] [--train [--epochs 100]]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lib.benchmarking import chance_auprc
from lib.commands import REPO, bundle_run, command_configs
from lib.demo_cohort import SIZES
from uad.data import dataset_entries
from uad.files import atomic_write_text
from uad.workflow import set_outputs

BUNDLES = {"cddpm": "cddpm_bundle", "autoddpm": "autoddpm_bundle"}
COLUMNS = (
    ("dice@best_dice_val", "Dice@val-thr"),
    ("dice@fpr_5", "Dice@5%FPR"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
    ("oracle_dice", "oracle Dice"),
)


def first_test_case(data: Path, set_name: str, contrast: str) -> dict:
    """The first test entry (absolute image, mask and seg paths) of a lesion set of the demo cohort."""
    return dataset_entries(None, data / "datalists" / f"{set_name}_{contrast}.json", "test")[0]


def metrics_row(metrics: dict) -> dict[str, float]:
    """The table's columns, plus the AUPRC of a random map."""
    summary = metrics["summary"]
    row = {label: summary.get(key, {}).get("mean", float("nan")) for key, label in COLUMNS}
    row["chance AUPRC"] = chance_auprc(summary)
    return row


def format_table(rows: dict[tuple[str, str], dict[str, float]]) -> str:
    """Markdown table, one row per (method, lesion set)."""
    labels = [label for _, label in COLUMNS] + ["chance AUPRC"]
    lines = ["| method | set | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for (method, set_name), row in rows.items():
        lines.append(f"| {method} | {set_name} | " + " | ".join(f"{row[k]:.3f}" for k in labels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo", help="working folder (data, models, results)")
    parser.add_argument("--seed", type=int, default=1, help="demo cohort seed (the shipped weights saw seed 0)")
    parser.add_argument("--size", default="small", choices=list(SIZES), help="demo cohort size")
    parser.add_argument("--train", action="store_true", help="train from scratch instead of using the shipped weights")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs with --train (default: demo.json)")
    parser.add_argument("--sets", nargs="+", default=["Tumour", "MS", "Stroke"], help="lesion sets to evaluate")
    parser.add_argument("--contrast", default="t2", choices=("t1", "t2"))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(BUNDLES),
        choices=list(BUNDLES),
        help="bundles to run",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    start = time.time()

    data = out / "data"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(data), "--seed", str(args.seed)]
        + ["--size", args.size],
        check=True,
    )
    rows = {}
    for method in args.methods:
        bundle, work = BUNDLES[method], out / method
        common = {"dataset_dir": str(data), "contrast": args.contrast, "ckpt_dir": str(work / "models")}
        if args.train:
            extra = {"epochs": args.epochs} if args.epochs else {}
            bundle_run(bundle, command_configs("train", "demo"), **common, output_dir=str(work / "train"), **extra)
        else:
            common["ckpt_path"] = str(REPO / bundle / "models" / "model.pt")
        thresholds = work / "models" / f"thresholds_{args.contrast}.json"
        bundle_run(
            bundle,
            command_configs("evaluate", "demo"),
            **common,
            test_sets=args.sets,
            output_dir=str(work / "eval"),
            threshold_file=str(thresholds),
        )
        outputs = {s: set_outputs(work / "eval", thresholds, s, len(args.sets) > 1) for s in args.sets}
        for set_name, (eval_dir, _) in outputs.items():
            rows[(method, set_name)] = metrics_row(json.loads((eval_dir / "metrics.json").read_text()))
        set_name = args.sets[0]
        case = first_test_case(data, set_name, args.contrast)
        bundle_run(
            bundle,
            command_configs("inference", "demo"),
            **common,
            input_file=case["image"],
            input_mask=case["mask"],
            output_dir=str(work / f"maps_{set_name}"),
            threshold_file=outputs[set_name][1],
        )

    table = format_table(rows)
    atomic_write_text(out / "results.md", table + "\n")
    print(f"\nDemo results ({args.contrast}, mean over test volumes; thresholds calibrated on validation only):\n")
    print(table)
    print(f"\nfinished in {(time.time() - start) / 60:.1f} min")
    for method in args.methods:
        work = out / method
        print(
            f"{method}: metrics, PR curves and overlays in {work}/eval/<set>/, NIfTI maps of one case in {work}/maps_*/"
        )
    print(f"demo cohort picture: {data / 'demo_cohort.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
