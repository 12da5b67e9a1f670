"""Int8 static quantisation of a bundle network against fp32, on ONNX Runtime, measured on a demo cohort.

The bundle's evaluation (``configs/inference.json`` + ``configs/evaluate.json`` + ``configs/demo.json``, the shipped
demo weights, fp32 on the CPU) runs twice on the same cohort: with the network exported to ONNX in fp32 (the bundles'
``cpu_backend: onnxruntime``), and with the same export's convolutions statically quantised to int8
(``lib.cpu_backends.quantize_convolutions``: ONNX Runtime's ``quantize_static``, QDQ, per-channel weights, activation
ranges calibrated on the network inputs the fp32 inferer passes while it runs on ``--calibration-volumes`` healthy
validation volumes of the cohort, so no test volume informs the quantisation). Reported per variant: evaluation wall
time, seconds per inferred volume, AUPRC / AUROC / Dice at the validation threshold per lesion set, the relative AUPRC
change and the largest anomaly-map difference of any voxel of any case against fp32. Thresholds are calibrated on
each variant's own validation maps, as a user of that variant would.

    python scripts/make_demo_data.py --out demo/data --seed 1
    python scripts/benchmark_int8.py --data demo/data --contrast t2 --sets Tumour MS Stroke --out runs/int8
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from lib.benchmarking import bundle_context, header, load_config, markdown_table, write_report
from lib.cpu_backends import RecordingNetwork, build_backend
from uad.backends import example_inputs
from uad.data import dataset_entries
from uad.workflow import set_outputs

VARIANTS = ("fp32", "int8-static")
COLUMNS = (
    ("variant", "variant"),
    ("set", "set"),
    ("auprc", "AUPRC"),
    ("auprc_change", "AUPRC change vs fp32"),
    ("auroc", "AUROC"),
    ("dice", "Dice@val-thr"),
    ("max_map_diff", "max map diff vs fp32"),
    ("seconds", "evaluation s"),
    ("s_per_volume", "s per volume"),
)


def calibration_inputs(parser, network: torch.nn.Module, entries: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """The network inputs of the bundle's inferer on the preprocessed ``entries`` (image and brain mask)."""
    preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    recorder = RecordingNetwork(network)
    for entry in entries:
        data = preprocessing({"image": entry["image"], "mask": entry["mask"]})
        inferer(data["image"][None], recorder, mask=data["mask"][None])
    return recorder.inputs


def evaluate(root: Path, overrides: dict, network: torch.nn.Module, out: Path) -> float:
    """The bundle's evaluation with ``network`` into ``out``; returns its wall time in seconds."""
    settings = {**overrides, "output_dir": str(out), "threshold_file": str(out / "thresholds.json")}
    parser = load_config(root, ["inference", "evaluate", "demo"], settings)
    parser["network"] = network
    parser.get_parsed_content("initialize")
    start = time.perf_counter()
    parser.get_parsed_content("run")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="cddpm", choices=("cddpm", "autoddpm"))
    parser.add_argument("--data", type=Path, required=True, help="a demo cohort (scripts/make_demo_data.py)")
    parser.add_argument("--contrast", default="t2", choices=("t1", "t2"))
    parser.add_argument("--sets", nargs="+", default=["Tumour", "MS", "Stroke"])
    parser.add_argument("--calibration-volumes", type=int, default=2, help="healthy validation volumes")
    parser.add_argument("--out", type=Path, default=Path("runs/int8"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data.resolve()
    rows, maps = [], {}
    with bundle_context(args.bundle) as root:
        overrides = {
            "dataset_dir": str(data),
            "contrast": args.contrast,
            "test_sets": args.sets,
            "ckpt_path": str(root / "models" / "model.pt"),
            "ckpt_dir": str(args.out.resolve() / "models"),
            "amp": False,
            "cpu_backend": "onnxruntime",
            "device": "$torch.device('cpu')",
        }
        config = load_config(root, ["inference", "evaluate", "demo"], overrides)
        trained = config.get_parsed_content("trained_network").eval()
        datalist = data / "datalists" / f"{args.sets[0]}_{args.contrast}.json"
        healthy = dataset_entries(None, datalist, "validation", contrast=args.contrast)
        healthy = [e for e in healthy if not e.get("seg")][: args.calibration_volumes]
        start = time.perf_counter()
        calibration = calibration_inputs(config, trained, healthy)
        h, w = config.get_parsed_content("image_size")[:2]
        example = example_inputs(2, (h, w), condition=args.bundle == "cddpm")
        networks = {
            "fp32": config.get_parsed_content("network"),
            "int8-static": build_backend("int8-static", trained, example, calibration),
        }
        quantise_s = time.perf_counter() - start
        for variant in VARIANTS:
            out = args.out.resolve() / variant
            seconds = evaluate(root, overrides, networks[variant], out)
            cases = sorted((out / "cases").glob("*.npz"))
            maps[variant] = {c.name: np.load(c)["anomaly_map"] for c in cases}
            for set_name in args.sets:
                eval_dir, _ = set_outputs(out, out / "thresholds.json", set_name, len(args.sets) > 1)
                summary = json.loads((eval_dir / "metrics.json").read_text())["summary"]
                rows.append(
                    {
                        "variant": variant,
                        "set": set_name,
                        "auprc": summary["auprc"]["mean"],
                        "auroc": summary["auroc"]["mean"],
                        "dice": summary["dice@best_dice_val"]["mean"],
                        "seconds": seconds,
                        "s_per_volume": seconds / len(cases),
                    }
                )
    reference = {r["set"]: r["auprc"] for r in rows if r["variant"] == "fp32"}
    difference = max(float(np.abs(maps["int8-static"][k] - v).max()) for k, v in maps["fp32"].items())
    for row in rows:
        row["auprc_change"] = f"{100 * (row['auprc'] / reference[row['set']] - 1):+.2f} %"
        row["max_map_diff"] = difference if row["variant"] != "fp32" else 0.0
    markdown = "\n".join(
        [
            header(f"Int8 static quantisation of the {args.bundle} demo network (ONNX Runtime, CPU)"),
            f"Calibration on the network inputs of {len(healthy)} healthy validation volumes "
            f"({len(calibration)} batches); export, calibration and quantisation {quantise_s:.0f} s.\n",
            markdown_table(rows, COLUMNS),
        ]
    )
    md, _ = write_report(args.out, "int8", markdown, {"rows": rows, "args": vars(args)})
    print(markdown)
    print(f"\nwritten: {md} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
