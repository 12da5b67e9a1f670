"""Which AutoDDPM stage finds a lesion, and which loses it: validation figures of every stage output.

The AutoDDPM bundle's inferer (``configs/inference.json`` + ``configs/evaluate.json``, with ``--overrides``) runs
with ``return_intermediates=True`` on the labelled cases of one datalist section. Each stage output is scored as an
anomaly map with the evaluation's own validation figures (best Dice over the pooled in-brain voxels, and their AUPRC;
``uad.calibration.best_dice_calibration``):

- ``final map``: the bundle's anomaly map, ``|x - x_inpainted| * m``, eroded and median filtered;
- ``stage 1 residual``: ``|x - x_hat|`` of the mask stage's reconstruction, post-processed like the map;
- ``inpainted residual``: ``|x - x_inpainted|`` without the likelihood weight, post-processed like the map;
- ``likelihood m``: the mask stage's likelihood map as it is.

Also reported: the share of brain pixels the binary stitch mask covers. One row per ``--settings`` entry (inference
keys changed on top of the overrides), so a setting's effect on each stage is read side by side.

    python scripts/autoddpm_stages.py --datalist runs/atlas/data/atlas/datalist_atlas.json \\
        --ckpt runs/atlas/atlas/autoddpm_efficient/models/step_1800.pt \\
        --overrides '{"pixdim": [2.5, 2.5, 1.0], "image_size": [96, 96, 1], "brain_crop": true}' \\
        --settings '{}' '{"mask_noise_level": 100}' --out runs/autoddpm_stages
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from lib.benchmarking import bundle_context, header, load_config, markdown_table, write_report
from uad.calibration import best_dice_calibration
from uad.data import dataset_entries
from uad.postprocessing import residual_anomaly_map

COLUMNS = (("setting", "setting"), ("mask_cover", "stitch mask / brain"))
STAGES = ("final map", "stage 1 residual", "inpainted residual", "likelihood m")


def stage_maps(inferer, outputs: dict[str, torch.Tensor], image: torch.Tensor, brain: torch.Tensor) -> dict:
    """Every scored stage output of one case, (H, W, D) arrays."""
    residual = {
        name: residual_anomaly_map(
            image,
            outputs[key],
            brain,
            inferer.erosion_iterations,
            inferer.median_kernel,
            smooth_sigma=inferer.smooth_sigma,
        )
        for name, key in (("stage 1 residual", "reconstruction"), ("inpainted residual", "inpainted"))
    }
    maps = {"final map": outputs["pred"], **residual, "likelihood m": outputs["likelihood"]}
    return {name: maps[name][0, 0].cpu().numpy() for name in STAGES}


def score_setting(root: Path, overrides: dict, setting: dict, entries: list[dict]) -> dict:
    """One row: validation Dice and AUPRC of every stage output over ``entries``, and the stitch-mask cover."""
    config = load_config(root, ["inference", "evaluate"], {**overrides, **setting})
    preprocessing, inferer = config.get_parsed_content("preprocessing"), config.get_parsed_content("inferer")
    network = config.get_parsed_content("network")
    maps, segs, masks, covered = {name: [] for name in STAGES}, [], [], []
    start = time.perf_counter()
    for entry in entries:
        data = preprocessing({k: entry[k] for k in ("image", "mask", "seg")})
        image, brain = data["image"][None], data["mask"][None]
        with torch.no_grad():
            outputs = inferer(image, network, mask=brain, return_intermediates=True)
        inside = brain > 0
        for name, value in stage_maps(inferer, outputs, image, inside).items():
            maps[name].append(value)
        segs.append(data["seg"][0].numpy() > 0)
        masks.append(inside[0, 0].numpy())
        covered.append(float(outputs["stitch_mask"][inside].sum()))
    row = {"setting": json.dumps(setting) if setting else "bundle default", "seconds": time.perf_counter() - start}
    for name in STAGES:
        figures = best_dice_calibration(maps[name], segs, masks)
        row.update({f"{name} Dice": figures["dice"], f"{name} AUPRC": figures["auprc"]})
    row["mask_cover"] = sum(covered) / sum(float(m.sum()) for m in masks)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, required=True, help="a datalist JSON with labelled cases")
    parser.add_argument("--section", default="validation", help="datalist section (settings are chosen on validation)")
    parser.add_argument("--ckpt", type=Path, required=True, help="AutoDDPM weights (model.pt or a benchmark stage)")
    parser.add_argument("--overrides", type=json.loads, default={}, help="bundle config keys, JSON")
    parser.add_argument("--settings", type=json.loads, nargs="+", default=[{}], help="inference keys per row, JSON")
    parser.add_argument("--max-cases", type=int, default=None, help="the first N labelled cases only")
    parser.add_argument("--out", type=Path, default=Path("runs/autoddpm_stages"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    entries = dataset_entries(None, args.datalist, args.section, contrast=None)
    entries = [e for e in entries if e.get("seg")][: args.max_cases]
    if not entries:
        raise SystemExit(f"{args.datalist}: no labelled case in section {args.section!r}")
    overrides = {**args.overrides, "ckpt_path": str(args.ckpt.resolve()), "device": "$torch.device('cpu')"}
    with bundle_context("autoddpm") as root:
        rows = [score_setting(root, overrides, setting, entries) for setting in args.settings]
    columns = (*COLUMNS, *((f"{s} {f}", f"{s} {f}") for s in STAGES for f in ("Dice", "AUPRC")), ("seconds", "s"))
    markdown = "\n".join(
        [
            header(f"AutoDDPM stage outputs on {len(entries)} labelled cases ({args.datalist.name}, {args.section})"),
            f"Weights `{args.ckpt}`; overrides `{json.dumps(args.overrides)}`. Dice: best over the pooled in-brain "
            "voxels; AUPRC of the same voxels (the evaluation's validation figures).\n",
            markdown_table(rows, columns),
        ]
    )
    md, _ = write_report(args.out, "autoddpm_stages", markdown, {"rows": rows, "args": vars(args)})
    print(markdown)
    print(f"\nwritten: {md} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
