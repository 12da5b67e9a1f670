"""The main job on the built-in demo data: build the demo cohort, train, evaluate and run inference with the bundles.

Every step is the real bundle command a user runs (``python -m monai.bundle run`` inside the bundle folder), with the
CPU-sized ``configs/demo.json`` overrides; this script only chains them and prints the metrics side by side.

    python scripts/run_demo.py [--out demo] [--epochs 100] [--sets Tumour MS Stroke] [--contrast t2]
        [--methods cddpm autoddpm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"cddpm": "cddpm_bundle", "autoddpm": "autoddpm_bundle"}
COLUMNS = (
    ("dice@best_dice_val", "Dice@val-thr"),
    ("dice@fpr_5", "Dice@5%FPR"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
    ("oracle_dice", "oracle Dice"),
)


def bundle_run(bundle: str, configs: list[str], **overrides) -> None:
    """``python -m monai.bundle run`` in the bundle folder with ``--key value`` overrides (exits on failure)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    print(f"\n$ (cd {bundle} && {' '.join(cmd[1:])})", flush=True)
    subprocess.run(cmd, cwd=REPO / bundle, check=True)


def metrics_row(metrics: dict) -> dict[str, float]:
    """The table's columns, plus the AUPRC of a random map (the lesion prevalence inside the brain)."""
    summary = metrics["summary"]
    row = {label: summary.get(key, {}).get("mean", float("nan")) for key, label in COLUMNS}
    lesion, brain = summary["n_lesion_voxels"]["mean"], summary["n_brain_voxels"]["mean"]
    row["chance AUPRC"] = lesion / brain
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
    parser.add_argument("--seed", type=int, default=0, help="demo cohort seed")
    parser.add_argument("--size", default="default", choices=("tiny", "default", "large"), help="demo cohort size")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: configs/demo.json)")
    parser.add_argument("--sets", nargs="+", default=["Tumour", "MS", "Stroke"], help="lesion sets to evaluate")
    parser.add_argument("--contrast", default="t2", choices=("t1", "t2"))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["cddpm"],
        choices=list(BUNDLES),
        help="bundles to run (autoddpm adds ~20 min of CPU training and ~12 min per lesion set)",
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate the weights already in OUT/<method>/models")
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
        configs = lambda name: [f"configs/{name}.json", "configs/demo.json"]  # noqa: E731
        if not args.skip_train:
            extra = {"epochs": args.epochs} if args.epochs else {}
            bundle_run(bundle, configs("train"), **common, output_dir=str(work / "train"), **extra)
        for set_name in args.sets:
            thresholds = str(work / "models" / f"thresholds_{set_name}_{args.contrast}.json")
            bundle_run(
                bundle,
                configs("evaluate"),
                **common,
                test_set=set_name,
                output_dir=str(work / f"eval_{set_name}"),
                threshold_file=thresholds,
            )
            rows[(method, set_name)] = metrics_row(json.loads((work / f"eval_{set_name}" / "metrics.json").read_text()))
        set_name = args.sets[0]
        bundle_run(
            bundle,
            configs("inference"),
            **common,
            datalist=str(data / "datalists" / f"{set_name}_{args.contrast}.json"),
            output_dir=str(work / f"maps_{set_name}"),
            threshold_file=str(work / "models" / f"thresholds_{set_name}_{args.contrast}.json"),
        )

    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(f"\nDemo results ({args.contrast}, mean over test volumes; thresholds calibrated on validation only):\n")
    print(table)
    print(f"\nfinished in {(time.time() - start) / 60:.1f} min")
    for method in args.methods:
        work = out / method
        print(f"{method}: metrics, PR curves and overlays in {work}/eval_<set>/, NIfTI maps in {work}/maps_*/")
    print(f"demo cohort picture: {data / 'demo_cohort.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
