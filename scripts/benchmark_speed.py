"""Training and inference throughput of the bundles at the published size (``configs/paper.json``; ``--demo``: the
shipped models' size, the configs as they stand).

Builds each bundle's own network, noise, scheduler, prepare-batch and anomaly inferer from its configs (random
weights: speed does not depend on them; ``--overlays``: bundle configs listed after ``paper.json``, e.g. ``paper_cpu``)
and times

- a training iteration: the bundle's ``SupervisedTrainer`` on an in-memory batch of ``--train-batch`` slices
  (prepare batch incl. noise generation on the device, forward, loss, backward, optimiser step);
- inference: the bundle's anomaly inferer on one volume of ``--slices`` brain slices, all slices in one batch, under
  ``torch.inference_mode``; seconds per slice and per 96x96x50 volume (``50 x`` seconds per slice).

for each variant: ``fp32`` (eager), ``cl`` (fp32, channels-last weights: the bundles' CPU default), ``amp`` (fp16
autocast on CUDA; bf16 on CPU, inference only since MONAI's trainer autocast is CUDA-only), ``amp+cl``, ``per-slice``
(amp, one slice per network call instead of the whole volume, CUDA; not run for AutoDDPM's 450-pass DDPM chain), and
the CPU backends of ``cpu_backends.py``: ``compile`` (torch.compile, inductor), ``int8-linear`` (dynamic int8
linear layers), ``onnxruntime`` and ``openvino`` (ONNX export in fp32; optional packages) and ``int8-static`` (the
ONNX export's convolutions quantised to int8, calibrated on the fp32 network's inputs on every 10th slice; set-up
includes that run). Every reconstruction is compared
with the fp32 eager one of the same volume (max abs difference); one-time set-up (export, compilation) is timed apart.
The default variants: fp32, amp, amp+cl and per-slice with CUDA; fp32 and cl on a CPU, with amp and amp+cl only
where the CPU computes bf16 natively. Writes ``speed.md`` / ``speed.json`` with the command and machine (CPU
capability, native bf16 or not, threads) at the top.

    python scripts/benchmark_speed.py --device cuda --out runs/speed
    python scripts/benchmark_speed.py --device cpu --train-batch 4 --slices 2 --autoddpm-samplers ddim \
        --out runs/speed_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from lib.benchmarking import (
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
from lib.cpu_backends import RecordingNetwork, backend_available, build_backend
from lib.demo_cohort import load_template_anatomy
from lib.slices import fit
from uad.backends import example_inputs
from uad.precision import cpu_bf16_native
from uad.training import load_weights

VOLUME_SLICES = 50  # the paper's 96x96x50 grid
COLUMNS = (
    ("bundle", "bundle"),
    ("setting", "setting"),
    ("variant", "variant"),
    ("params_m", "params (M)"),
    ("train_batch", "train batch"),
    ("train_s_per_iter", "train s/iter"),
    ("train_peak_mb", "train peak MB"),
    ("brain_box", "brain box"),
    ("passes_per_slice", "passes/slice"),
    ("infer_s_per_slice", "infer s/slice"),
    ("infer_s_per_volume", "infer s/volume (50 slices)"),
    ("infer_peak_mb", "infer peak MB"),
    ("setup_s", "set-up s"),
    ("max_abs_diff", "recon max abs diff vs fp32"),
)
# variant -> (CPU backend of the network, autocast)
VARIANTS = {
    "fp32": ("eager", False),
    "cl": ("channels-last", False),
    "amp": ("eager", True),
    "amp+cl": ("channels-last", True),
    "per-slice": ("eager", True),
    "compile": ("compile", False),
    "int8-linear": ("int8-linear", False),
    "onnxruntime": ("onnxruntime", False),
    "int8-static": ("int8-static", False),
    "openvino": ("openvino", False),
}
TRAINED_VARIANTS = ("fp32", "amp", "amp+cl")


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


def bundle_network(parser, device: torch.device, demo: bool, root: Path) -> torch.nn.Module:
    """The configured network in eval mode: the shipped demo weights for the demo size, else random weights with the
    zero-initialised output layers redrawn (so that outputs differ when backends compute differently)."""
    torch.manual_seed(0)  # the same random weights for every variant
    network = parser.get_parsed_content("network_def")
    if demo:
        return load_weights(network, root / "models" / "model.pt").to(device).eval()
    with torch.no_grad():
        for param in network.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
    return network.to(device).eval()


def mni152_volume(spacing: float, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNI152 T1 template (white matter = 1, clipped to [0, 1]) and its brain mask at ``spacing`` mm, centred in
    ``shape[:2]``, over the ``shape[2]`` consecutive axial slices with the most brain: (1, 1, H, W, D) each."""
    anatomy = load_template_anatomy(spacing, margin=0, multiple=1)
    brain = anatomy["mask"].sum((0, 1))
    depth = min(shape[2], brain.size)
    first = max(range(brain.size - depth + 1), key=lambda z: brain[z : z + depth].sum())
    arrays = [fit(anatomy[k][..., first : first + depth], (*shape[:2], depth)) for k in ("t1", "mask")]
    volume, mask = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None] for a in arrays)
    return volume.clamp(0, 1) * mask, mask


def inference_speed(
    root: Path, configs: list[str], overrides: dict[str, Any], device: torch.device, variant: str, args, reference
) -> tuple[dict[str, float], torch.Tensor]:
    """Seconds per slice and per volume of the bundle's anomaly inferer with ``variant``, its peak memory, set-up
    time, and the reconstruction's max abs difference from ``reference`` (the fp32 eager one; None: this is it). The
    reconstruction, not the map, is compared: the map derives from it, and the 3D median filter zeroes the maps of
    volumes of a few slices."""
    backend, amp = VARIANTS[variant]
    batch = 1 if variant == "per-slice" else args.slices
    overrides = {"amp": amp, "batch_size": batch, **({"brain_crop": True} if args.brain_crop else {}), **overrides}
    parser = load_config(root, ["inference", *configs], overrides)
    inferer = parser.get_parsed_content("inferer")
    h, w = parser.get_parsed_content("image_size")[:2]
    if args.volume == "mni152":
        volume, mask = mni152_volume(parser.get_parsed_content("pixdim")[0], (h, w, args.slices))
        volume, mask = volume.to(device), mask.to(device)
    else:
        volume = torch.rand(1, 1, h, w, args.slices, generator=torch.Generator().manual_seed(0)).to(device)
        mask = torch.ones_like(volume)
    network = bundle_network(parser, device, args.demo, root)
    start = time.perf_counter()
    if device.type == "cpu":
        calibration = None
        if backend == "int8-static":  # the network's inputs on every 10th slice of the volume, in fp32
            recorder = RecordingNetwork(network)
            inferer(volume[..., ::10], recorder, mask=mask[..., ::10])
            calibration = recorder.inputs
        example = example_inputs(2, (h, w), condition=root.name.startswith("cddpm"))
        network = build_backend(backend, network, example, calibration)
    elif backend == "channels-last":
        network = network.to(memory_format=torch.channels_last)
    setup = time.perf_counter() - start
    reset_peak_memory(device)
    warmup = int(
        backend == "compile" or (device.type == "cuda" and inferer.network_passes_per_slice <= 50)
    )  # long chains warm themselves up; compilation is set-up
    if warmup:
        start = time.perf_counter()
        inferer(volume, network, mask=mask, return_reconstruction=True)
        setup += time.perf_counter() - start if backend == "compile" else 0.0
    recons = []
    run = lambda: recons.append(inferer(volume, network, mask=mask, return_reconstruction=True)[1])  # noqa: E731
    seconds = timed(run, device, warmup=0)
    row = {
        "brain_box": bool(inferer.brain_box_multiple),
        "passes_per_slice": inferer.network_passes_per_slice,
        "infer_s_per_slice": seconds / args.slices,
        "infer_s_per_volume": seconds / args.slices * VOLUME_SLICES if args.volume == "random" else seconds,
        "infer_peak_mb": peak_memory_mb(device),
        "setup_s": setup,
        "max_abs_diff": None if reference is None else float((recons[-1].float() - reference).abs().max()),
    }
    return row, recons[-1].float()


def settings(bundle: str, samplers: list[str], ensembles: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The inference settings measured per bundle: (label, config overrides); ``ensembles``: cDDPM test noise levels,
    e.g. ``"250/500/750"`` (None: those of the configs)."""
    if bundle == "cddpm" and not ensembles:
        return [("configured noise levels", {})]
    if bundle == "cddpm":
        return [(f"ensemble {e}", {"ensemble_timesteps": [int(t) for t in e.split("/")]}) for e in ensembles]
    return [(f"{s} sampler", {"sampler": s}) for s in samplers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=list(BUNDLES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--demo", action="store_true", help="time the demo size (the configs as they stand)")
    parser.add_argument("--iterations", type=int, default=5, help="timed training iterations (after one warm-up)")
    parser.add_argument("--train-batch", type=int, default=32, help="slices per training batch (paper: 32)")
    parser.add_argument("--slices", type=int, default=VOLUME_SLICES, help="brain slices in the timed volume")
    parser.add_argument(
        "--volume",
        default="random",
        choices=("random", "mni152"),
        help="the timed volume: random voxels, every pixel brain (per volume = 50 x per slice); or the MNI152 T1 and "
        "its brain mask on the grid, --slices axial slices (per volume: as timed)",
    )
    parser.add_argument("--brain-crop", action="store_true", help="infer on the brain box (the brain_crop key)")
    parser.add_argument(
        "--overlays", nargs="+", default=[], help="bundle configs listed after the size's, e.g. paper_cpu"
    )
    parser.add_argument(
        "--cddpm-ensembles",
        nargs="+",
        default=None,
        help="cDDPM test noise levels, one setting each (default: the configs' levels)",
    )
    parser.add_argument("--autoddpm-samplers", nargs="+", default=["ddpm", "ddim"], choices=("ddpm", "ddim"))
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: by device")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/speed"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if args.variants:
        variants = args.variants
    elif device.type == "cuda":
        variants = ["fp32", "amp", "amp+cl", "per-slice"]
    else:
        variants = ["fp32", "cl"] + ["amp", "amp+cl"] * cpu_bf16_native()
    missing = [v for v in variants if not backend_available(VARIANTS[v][0])]
    if missing:
        parser.error(f"variants {missing} need packages that are not installed (see scripts/lib/cpu_backends.py)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    configs = ([] if args.demo else ["paper"]) + args.overlays
    missing = [BUNDLES[b] / "configs" / f"{o}.json" for b in args.bundles for o in args.overlays]
    missing = [str(path) for path in missing if not path.is_file()]
    if missing:
        parser.error(f"no such overlay: {', '.join(missing)}")

    rows = []
    for bundle in args.bundles:
        with bundle_context(bundle) as root:
            references = {}  # setting -> the fp32 eager reconstruction every variant is compared with
            for variant in ["fp32"] * ("fp32" not in variants) + variants:
                train = {}
                if not args.skip_training and variant in TRAINED_VARIANTS and variant in variants:
                    if variant == "fp32" or device.type == "cuda":
                        train = training_speed(root, configs, device, variant, args)
                for label, overrides in settings(bundle, args.autoddpm_samplers, args.cddpm_ensembles):
                    if variant == "per-slice" and overrides.get("sampler") == "ddpm":
                        continue  # 450 passes x 50 one-slice calls: the batched rows already show the gap
                    row = {"bundle": bundle, "setting": label, "variant": variant, **train}
                    speed, recon = inference_speed(
                        root, configs, overrides, device, variant, args, references.get(label)
                    )
                    references.setdefault(label, recon)
                    if variant in variants:
                        rows.append({**row, **speed})
                        print(json.dumps(rows[-1]), flush=True)
                    train = {}
    size = "demo-sized (the shipped models' sizes)" if args.demo else "paper-sized (configs/paper.json)"
    size += "".join(f" + configs/{o}.json" for o in args.overlays)
    markdown = "\n".join(
        [
            header(f"Speed of the {size} bundles"),
            f"Inference timed on one volume of {args.slices} slices ({args.volume}); per volume = "
            + ("50 x per slice.\n" if args.volume == "random" else "as timed.\n"),
            markdown_table(rows, COLUMNS),
        ]
    )
    md, _ = write_report(args.out, "speed", markdown, {"variants": variants, "rows": rows, "args": vars(args)})
    print(markdown)
    print(f"\nwritten: {md} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
