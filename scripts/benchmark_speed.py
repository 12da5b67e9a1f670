"""Training and inference throughput of the bundles at their configured size (paper size by default).

Builds each bundle's own network, noise, scheduler, prepare-batch and anomaly inferer from its configs (random
weights: speed does not depend on them) and times

- a training iteration: the bundle's ``SupervisedTrainer`` on an in-memory batch of ``--train-batch`` slices
  (prepare batch incl. noise generation on the device, forward, loss, backward, optimiser step);
- inference: the bundle's anomaly inferer on one volume of ``--slices`` brain slices, all slices in one batch, under
  ``torch.inference_mode``; seconds per slice and per 96x96x50 volume (``50 x`` seconds per slice).

for each variant: ``fp32``, ``amp`` (fp16 autocast on CUDA; bf16 on CPU, inference only since MONAI's trainer autocast
is CUDA-only), ``amp+cl`` (and channels-last weights, the bundles' default on CPU), ``per-slice`` (amp, one slice per
network call instead of the whole volume, CUDA; not run for AutoDDPM's 450-pass DDPM chain). Writes ``speed.md`` /
``speed.json`` with the command and machine at the top.

    python scripts/benchmark_speed.py --device cuda --out runs/speed
    python scripts/benchmark_speed.py --device cpu --train-batch 4 --slices 2 --autoddpm-samplers ddim \
        --out runs/speed_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from benchmarking import (
    BUNDLES,
    bundle_context,
    header,
    load_config,
    markdown_table,
    peak_memory_mb,
    reset_peak_memory,
    timed,
    write_report,
)
from ignite.engine import Engine

VOLUME_SLICES = 50  # the paper's 96x96x50 grid
COLUMNS = (
    ("bundle", "bundle"),
    ("setting", "setting"),
    ("variant", "variant"),
    ("params_m", "params (M)"),
    ("train_batch", "train batch"),
    ("train_s_per_iter", "train s/iter"),
    ("train_peak_mb", "train peak MB"),
    ("passes_per_slice", "passes/slice"),
    ("infer_s_per_slice", "infer s/slice"),
    ("infer_s_per_volume", "infer s/volume (50 slices)"),
    ("infer_peak_mb", "infer peak MB"),
)


def training_speed(root: Path, configs: list[str], device: torch.device, variant: str, args) -> dict[str, float]:
    """Seconds per training iteration of the bundle's trainer and its peak memory."""
    amp, channels_last = variant in ("amp", "amp+cl"), variant == "amp+cl"
    parser = load_config(root, ["train", *configs], {"device": f"$torch.device('{device}')", "amp": amp})
    network = parser.get_parsed_content("network_def").to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    h, w = parser.get_parsed_content("image_size")[:2]
    image = torch.rand(args.train_batch, 1, h, w, device=device)
    batch = {"image": image, "mask": torch.ones_like(image)}
    parser["network"] = network
    parser["train#handlers"] = []
    parser["train#dataloader"] = [batch]
    trainer = parser.get_parsed_content("train#trainer")

    def run(iterations: int) -> None:
        trainer.state.max_epochs = None  # start a fresh run of `iterations` iterations
        Engine.run(trainer, [batch] * iterations, max_epochs=1)

    run(1)  # warm-up (cuDNN autotuning, allocator)
    reset_peak_memory(device)
    seconds = timed(lambda: run(args.iterations), device, warmup=0) / args.iterations
    return {
        "params_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "train_batch": args.train_batch,
        "train_s_per_iter": seconds,
        "train_peak_mb": peak_memory_mb(device),
    }


def inference_speed(
    root: Path, configs: list[str], overrides: dict[str, Any], device: torch.device, variant: str, args
) -> dict[str, float]:
    """Seconds per slice and per volume of the bundle's anomaly inferer, and its peak memory."""
    amp, channels_last = variant != "fp32", variant == "amp+cl"
    batch = 1 if variant == "per-slice" else args.slices
    parser = load_config(root, ["inference", *configs], {"amp": amp, "batch_size": batch, **overrides})
    network = parser.get_parsed_content("network_def").to(device).eval()
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    inferer = parser.get_parsed_content("inferer")
    h, w = parser.get_parsed_content("image_size")[:2]
    volume = torch.rand(1, 1, h, w, args.slices, device=device)
    mask = torch.ones_like(volume)
    reset_peak_memory(device)
    warmup = int(device.type == "cuda" and inferer.network_passes_per_slice <= 50)  # long chains warm themselves up
    seconds = timed(lambda: inferer(volume, network, mask=mask), device, warmup=warmup)
    return {
        "passes_per_slice": inferer.network_passes_per_slice,
        "infer_s_per_slice": seconds / args.slices,
        "infer_s_per_volume": seconds / args.slices * VOLUME_SLICES,
        "infer_peak_mb": peak_memory_mb(device),
    }


def settings(bundle: str, samplers: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The inference settings measured per bundle: (label, config overrides)."""
    if bundle == "cddpm":
        return [("ensemble 250/500/750", {})]
    return [(f"{s} sampler", {"sampler": s}) for s in samplers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--demo", action="store_true", help="time the demo-sized configs (configs/demo.json)")
    parser.add_argument("--iterations", type=int, default=5, help="timed training iterations (after one warm-up)")
    parser.add_argument("--train-batch", type=int, default=32, help="slices per training batch (paper: 32)")
    parser.add_argument("--slices", type=int, default=VOLUME_SLICES, help="brain slices in the timed volume")
    parser.add_argument("--autoddpm-samplers", nargs="+", default=["ddpm", "ddim"], choices=("ddpm", "ddim"))
    parser.add_argument("--variants", nargs="+", default=None, help="fp32 amp amp+cl per-slice (default: by device)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/speed"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    variants = args.variants or (["fp32", "amp", "amp+cl"] + ["per-slice"] * (device.type == "cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    configs = ["demo"] if args.demo else []

    rows = []
    for bundle in args.bundles:
        with bundle_context(bundle) as root:
            for variant in variants:
                train = {}
                if not args.skip_training and variant in ("fp32", "amp", "amp+cl"):
                    if variant == "fp32" or device.type == "cuda":
                        train = training_speed(root, configs, device, variant, args)
                for label, overrides in settings(bundle, args.autoddpm_samplers):
                    if variant == "per-slice" and overrides.get("sampler") == "ddpm":
                        continue  # 450 passes x 50 one-slice calls: the batched rows already show the gap
                    row = {"bundle": bundle, "setting": label, "variant": variant, **train}
                    row.update(inference_speed(root, configs, overrides, device, variant, args))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    train = {}
    size = "demo-sized (configs/demo.json)" if args.demo else "paper-sized (configs/train.json defaults)"
    markdown = "\n".join(
        [
            header(f"Speed of the {size} bundles"),
            f"Inference timed on one volume of {args.slices} brain slices; per volume = 50 x per slice.\n",
            markdown_table(rows, COLUMNS),
        ]
    )
    md, _ = write_report(args.out, "speed", markdown, {"variants": variants, "rows": rows, "args": vars(args)})
    print(markdown)
    print(f"\nwritten: {md} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
