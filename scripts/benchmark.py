"""Quality benchmark: every method trained at the same budget on the same data, evaluated by the one shared evaluation.

Methods (``--methods``):

- ``intensity``: the intensity itself as anomaly map (no training);
- ``mean_image``: residual to the mean healthy training image (no training);
- ``ddpm``: the cDDPM bundle with conditioning switched off (``configs/ablation_ddpm.json``);
- ``pddpm``: pDDPM, the patched DDPM of the cDDPM bundle (``configs/pddpm.json``): one square noised at a time, the
  rest of the slice clean as context;
- ``cddpm``: the cDDPM bundle (simplex noise); ``cddpm_gaussian``: with Gaussian noise (``gaussian_noise.json``);
- ``cddpm_spark``: cDDPM whose encoder starts from SparK pretraining (``pretrain_encoder.json``, budget / 2 iterations);
- ``autoddpm_ref`` / ``autoddpm_fast``: one AutoDDPM training, evaluated with the exact DDPM chain (450 passes per
  slice) and with the DDIM setting (15 passes);
- learning-efficiency variants of ``cddpm``, one change each: ``cddpm_t200_800`` (train on t in [200, 800), the test
  noise levels), ``cddpm_linear`` (linear instead of cosine schedule), ``cddpm_small`` (UNet 16/32/32),
  ``cddpm_warmup`` (``configs/warmup.json``), ``cddpm_ema`` (``configs/ema.json``, EMA weights validated and saved),
  ``cddpm_brain_crop`` (``configs/brain_crop.json``, training slices cropped to the brain box; inference on the
  brain box, ``--brain_crop True``);
- the efficient recipe, both changes that paid off together (t in [200, 800) and the brain-box crop), with and
  without conditioning: ``cddpm_efficient`` and ``ddpm_efficient``.
- ``cddpm_efficient_<setting>``: the ``cddpm_efficient`` weights with other test-time settings (final weights only):
  noise levels ``t200``, ``t250``, ``t250_500``, ``t500_750``, ``t750``; ``erosion1``, the brain mask eroded once
  instead of 3 times (``mean_image_erosion1``: the baseline so); ``ddpm_efficient_t200`` likewise.
- AutoDDPM's efficient recipe, its test noise levels (t in [0, 200)) and the brain-box crop, with both samplers:
  ``autoddpm_efficient_ref`` and ``autoddpm_efficient_fast`` (one training); ``autoddpm_efficient_fast_<setting>``:
  its final weights with other mask-stage settings, ``m100`` and ``m400`` (from noise level 100 or 400, not 200) and
  ``tau030`` (mask threshold 0.3, not 0.13); ``autoddpm_t500_m400``: trained on t in [0, 500), its mask stage from
  level 400; ``autoddpm_t800_m600``: trained on t in [0, 800), its mask stage from level 600 in 6 DDIM steps
  (``autoddpm_t800_m600_s12``: in 12; ``autoddpm_t800_m600_s12k3``: in 12, three chains averaged;
  ``autoddpm_t800_m600_s12k3r100``: and re-sampled from level 100).

Every training and evaluation is the bundle's own ``python -m monai.bundle run`` command (the commands are logged).
Training runs in ``--curve-points`` stages of ``budget / points`` iterations, resuming from the bundle's checkpoint;
after each stage the current weights are evaluated, which gives the learning curve. Thresholds are calibrated on
validation data only (labelled and healthy), never on the test cases.

Data (``--data``): ``demo`` (the demo cohort, one training per contrast, evaluated per lesion set), ``ixi`` (real
healthy slices from ``--ixi``; lesions inserted by ``scripts/make_ixi_benchmark.py``; evaluated per polarity) and
``atlas`` (real strokes: trained on the healthy IXI slices of ``--ixi``, calibrated on ATLAS ``val`` and the healthy
IXI val slices, tested on ATLAS ``test`` from ``--atlas``; ``scripts/make_atlas_benchmark.py``). The table adds the
false-positive pixels per lesion-free test case at the validation threshold.

Writes ``benchmark.md`` (tables, command and machine at the top), ``benchmark.json`` (every row, every curve point),
``learning_curve_<data>.png`` and ``example_maps_<data>_<target>.png`` to ``--out``.

    python scripts/benchmark.py --budget 2000 --device cuda --out runs/benchmark
    python scripts/benchmark.py --data ixi --budget 400 --methods mean_image cddpm ddpm --out runs/bench_cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lib.baselines import mean_healthy_image  # noqa: E402
from lib.benchmarking import (  # noqa: E402
    BUNDLES,
    REPO,
    bundle_context,
    chance_auprc,  # noqa: E402
    header,
    load_config,
    markdown_table,
    quality_row,
    write_report,
)
from lib.commands import bundle_command  # noqa: E402
from lib.demo_cohort import SIZES  # noqa: E402
from uad.files import atomic_output, atomic_write_figure, atomic_write_text  # noqa: E402
from uad.precision import parse_amp  # noqa: E402

logger = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Method:
    """How a method is trained and evaluated with a bundle."""

    label: str
    bundle: str = "cddpm"
    training: str | None = None  # name of the training it uses (methods sharing one training name it alike)
    configs: tuple[str, ...] = ()  # extra bundle config files, for training and evaluation
    train_configs: tuple[str, ...] = ()  # extra bundle config files, for training only
    overrides: dict[str, Any] = field(default_factory=dict)  # config keys, for training and evaluation
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    pretrain: bool = False
    curve: bool = True  # evaluated at every curve point (False: final weights only)
    template: bool = False  # a baseline: the residual to the mean healthy training image (else the intensity)


TEST_NOISE_LEVELS = {"timestep_range": [200, 800]}  # train on the noise levels used at test time
BRAIN_CROP = {"train_configs": ("brain_crop",), "eval_overrides": {"brain_crop": True}}  # crop to train, box to infer
AUTODDPM_EFFICIENT = {  # its mask and re-sample chains start below level 200
    "bundle": "autoddpm",
    "training": "autoddpm_efficient",
    "overrides": {"timestep_range": [0, 200]},
    "train_configs": BRAIN_CROP["train_configs"],
}
TEST_SETTINGS = {  # cDDPM's: name: (label, inference keys)
    "t200": ("tested at t = 200", {"ensemble_timesteps": [200]}),
    "t250": ("tested at t = 250", {"ensemble_timesteps": [250]}),
    "t250_500": ("tested at t = 250, 500", {"ensemble_timesteps": [250, 500]}),
    "t500_750": ("tested at t = 500, 750", {"ensemble_timesteps": [500, 750]}),
    "t750": ("tested at t = 750", {"ensemble_timesteps": [750]}),
    "erosion1": ("brain mask eroded once (not 3 times)", {"inferer#erosion_iterations": 1}),
    "t200_g4": ("tested at t = 200, map smoothed (sigma 4 px)", {"ensemble_timesteps": [200], "smooth_sigma": 4.0}),
}
SMOOTHING = {"g3": ("map smoothed (sigma 3 px)", {"inferer#smooth_sigma": 3.0})}  # the mean image's, chosen on val
AUTODDPM_TEST_SETTINGS = {  # AutoDDPM's: name: (label, inference keys)
    "m100": ("mask stage from level 100", {"mask_noise_level": 100}),
    "tau030": ("mask threshold 0.3", {"mask_threshold": 0.3}),
    "m400": (
        "mask stage from level 400 (8 DDIM steps; beyond the trained levels)",
        {"mask_noise_level": 400, "ddim_mask_steps": 8},
    ),
}
AUTODDPM_T800_SETTINGS = {  # on the [0, 800) weights
    "s12": ("12 DDIM steps", {"ddim_mask_steps": 12}),
    "s12k3": ("12 DDIM steps, 3 chains averaged", {"ddim_mask_steps": 12, "mask_samples": 3}),
    "s12k3r100": (
        "12 DDIM steps, 3 chains averaged, re-sample from level 100",
        {"ddim_mask_steps": 12, "mask_samples": 3, "resample_noise_level": 100},
    ),
    "s12k3r100_g4": (
        "12 DDIM steps, 3 chains averaged, re-sample from level 100, map smoothed (sigma 4 px)",
        {"ddim_mask_steps": 12, "mask_samples": 3, "resample_noise_level": 100, "smooth_sigma": 4.0},
    ),
}
AUTODDPM_DDIM_EVAL = {**BRAIN_CROP["eval_overrides"], "sampler": "ddim"}  # the brain box, the DDIM chains


def autoddpm_trained_on(top: int, mask_stage: dict[str, int]) -> Method:
    """AutoDDPM's efficient recipe trained on t in [0, ``top``) (training ``autoddpm_t<top>``), evaluated with DDIM and
    ``mask_stage`` (``mask_noise_level`` and ``ddim_mask_steps``): a mask chain through the levels it was trained on."""
    return Method(
        f"AutoDDPM, t in [0, {top}) + brain-box crop, mask stage from level {mask_stage['mask_noise_level']} "
        f"({mask_stage['ddim_mask_steps']} DDIM steps)",
        **{**AUTODDPM_EFFICIENT, "training": f"autoddpm_t{top}", "overrides": {"timestep_range": [0, top]}},
        eval_overrides={**AUTODDPM_DDIM_EVAL, **mask_stage},
    )


METHODS = {
    "intensity": Method("intensity only"),
    "mean_image": Method("mean healthy image", template=True),
    "ddpm": Method("DDPM (unconditioned)", training="ddpm", configs=("ablation_ddpm",)),
    "pddpm": Method("pDDPM (patched, unconditioned)", training="pddpm", configs=("pddpm",)),
    "cddpm": Method("cDDPM (simplex)", training="cddpm"),
    "cddpm_gaussian": Method("cDDPM (Gaussian)", training="cddpm_gaussian", configs=("gaussian_noise",)),
    "cddpm_spark": Method("cDDPM + SparK encoder", training="cddpm_spark", pretrain=True),
    "autoddpm_ref": Method(
        "AutoDDPM (DDPM, reference)", "autoddpm", "autoddpm", eval_overrides={"sampler": "ddpm"}, curve=False
    ),
    "autoddpm_fast": Method("AutoDDPM (DDIM, fast)", "autoddpm", "autoddpm", eval_overrides={"sampler": "ddim"}),
    # AutoDDPM's efficient recipe: train on its test noise levels (below 200) and on brain-box crops
    "autoddpm_efficient_ref": Method(
        "AutoDDPM, t in [0, 200) + brain-box crop (DDPM, reference)",
        **AUTODDPM_EFFICIENT,
        eval_overrides={**BRAIN_CROP["eval_overrides"], "sampler": "ddpm"},
        curve=False,
    ),
    "autoddpm_efficient_fast": Method(
        "AutoDDPM, t in [0, 200) + brain-box crop (DDIM, fast)", **AUTODDPM_EFFICIENT, eval_overrides=AUTODDPM_DDIM_EVAL
    ),
    # the mask stage from higher levels (Gaussian noise leaves a stroke's low frequencies in place below level 500),
    # trained on the levels that chain passes through
    "autoddpm_t500_m400": autoddpm_trained_on(500, AUTODDPM_TEST_SETTINGS["m400"][1]),
    "autoddpm_t800_m600": autoddpm_trained_on(800, {"mask_noise_level": 600, "ddim_mask_steps": 6}),
    # learning-efficiency changes, each against `cddpm`
    "cddpm_t200_800": Method("cDDPM, t in [200, 800)", training="cddpm_t200_800", overrides=TEST_NOISE_LEVELS),
    "cddpm_linear": Method(
        "cDDPM, linear schedule", training="cddpm_linear", overrides={"scheduler#schedule": "linear_beta"}
    ),
    "cddpm_small": Method(
        "cDDPM, UNet 16/32/32",
        training="cddpm_small",
        overrides={"unet#channels": [16, 32, 32], "unet#num_head_channels": 16, "unet#norm_num_groups": 8},
    ),
    "cddpm_warmup": Method("cDDPM, LR warm-up 100 it", training="cddpm_warmup", train_configs=("warmup",)),
    "cddpm_ema": Method("cDDPM, EMA weights", training="cddpm_ema", train_configs=("ema",)),
    "cddpm_brain_crop": Method("cDDPM, brain-box crop", training="cddpm_brain_crop", **BRAIN_CROP),
    # the efficient recipe (t in [200, 800) and brain-box crop together), with and without conditioning
    "ddpm_efficient": Method(
        "DDPM, t in [200, 800) + brain-box crop",
        training="ddpm_efficient",
        configs=("ablation_ddpm",),
        overrides=TEST_NOISE_LEVELS,
        **BRAIN_CROP,
    ),
    "cddpm_efficient": Method(
        "cDDPM, t in [200, 800) + brain-box crop", training="cddpm_efficient", overrides=TEST_NOISE_LEVELS, **BRAIN_CROP
    ),
    "mean_image_erosion1": Method(
        f"mean healthy image, {TEST_SETTINGS['erosion1'][0]}",
        eval_overrides=TEST_SETTINGS["erosion1"][1],
        template=True,
    ),
}


def with_test_settings(key: str, settings: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Method]:
    """``<key>_<name>``: the weights of method ``key`` evaluated with other inference keys (final weights only)."""
    method = METHODS[key]
    return {
        f"{key}_{name}": replace(
            method, label=f"{method.label}, {label}", eval_overrides={**method.eval_overrides, **keys}, curve=False
        )
        for name, (label, keys) in settings.items()
    }


# test-time settings on the final weights: cDDPM's noise levels and brain-mask erosion (DDPM at cDDPM's best level),
# AutoDDPM's mask stage (its level, threshold and DDIM steps); the smoothing of the map (sigma chosen on val)
METHODS.update(with_test_settings("cddpm_efficient", TEST_SETTINGS))
METHODS.update(with_test_settings("ddpm_efficient", {"t200": TEST_SETTINGS["t200"]}))
METHODS.update(with_test_settings("autoddpm_efficient_fast", AUTODDPM_TEST_SETTINGS))
METHODS.update(with_test_settings("autoddpm_t800_m600", AUTODDPM_T800_SETTINGS))
METHODS.update(with_test_settings("mean_image", SMOOTHING))
DEFAULT_METHODS = [
    "intensity",
    "mean_image",
    "ddpm",
    "pddpm",
    "cddpm",
    "cddpm_gaussian",
    "cddpm_spark",
    "autoddpm_ref",
    "autoddpm_fast",
]
COLUMNS = (
    ("method", "method"),
    ("val_best_dice", "val Dice (best)"),
    ("val_auprc", "val AUPRC"),
    ("dice@best_dice_val", "Dice@val-thr"),
    ("dice@fpr_5", "Dice@5%FPR"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
    ("oracle_dice", "oracle Dice*"),
    ("pooled_dice", "pooled Dice@val-thr"),
    ("pooled_auprc", "pooled AUPRC"),
    ("pooled_auroc", "pooled AUROC"),
    ("healthy_fp_px", "FP px per lesion-free test case"),
    ("healthy_ssim", "healthy SSIM"),
    ("healthy_psnr", "healthy PSNR"),
    ("passes", "passes/slice"),
    ("infer_s_per_slice", "infer s/slice"),
    ("infer_s_per_volume", "infer s/volume (x50)"),
    ("train_s_per_iter", "train s/iter"),
    ("train_peak_mb", "train peak RSS MB"),
)
# the real 2D slices (IXI, ATLAS) on their 1 mm grid, resampled to 2.5 mm and padded to 96 x 96, one slice each
SLICE_GRID = {"pixdim": [2.5, 2.5, 1.0], "image_size": [96, 96, 1], "slices_per_volume": 1, "batch_size": 16}
EPOCH_TIME = re.compile(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


@dataclass
class Dataset:
    """One training set and the test targets evaluated with the models trained on it."""

    name: str
    overrides: dict[str, Any]  # data keys for every bundle command (training and evaluation)
    targets: dict[str, dict[str, Any]]  # target name -> evaluation overrides
    slices_per_volume: int


def run_bundle(bundle: str, configs: list[str], log: Path, **overrides) -> tuple[float, float, str]:
    """``python -m monai.bundle run`` in the bundle folder, with the repository's ``scripts/`` on ``PYTHONPATH`` (the
    baselines' inferer lives there, outside the bundles); returns (wall seconds, peak RSS MB, output).

    Fails with the tail of the log when the command fails.
    """
    cmd = bundle_command([c if c.endswith(".json") else f"configs/{c}.json" for c in configs], overrides)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "scripts"), os.getenv("PYTHONPATH")]))}
    logger.info("$ (cd %s && python %s)", BUNDLES[bundle].name, " ".join(cmd[1:]))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=BUNDLES[bundle], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bundle command failed ({log}):\n" + "\n".join(text.splitlines()[-30:]))
    return seconds, usage.ru_maxrss / 1024, text


def epoch_seconds(text: str) -> list[float]:
    """Durations of the trainer's epochs logged in ``text``."""
    return [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in EPOCH_TIME.findall(text)]


def demo_datasets(out: Path, args) -> list[Dataset]:
    data = args.demo_data or out / "data" / "demo"
    if not (data / "splits").is_dir():
        cmd = [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(data)]
        subprocess.run(cmd + ["--size", args.demo_size, "--seed", str(args.seed)], check=True)
    return [
        Dataset(
            f"demo_{contrast}",
            {"dataset_dir": str(data), "contrast": contrast},
            {s: {"test_set": s} for s in args.demo_sets},
            slices_per_volume=32,
        )
        for contrast in args.contrasts
    ]


def ixi_datasets(out: Path, args) -> list[Dataset]:
    if not args.ixi.is_dir():
        print(f"skipping the IXI benchmark: {args.ixi} not found (real healthy slices, see README)", flush=True)
        return []
    data = out / "data" / "ixi"
    if not (data / "datalist_hyper.json").is_file():
        cmd = [sys.executable, str(REPO / "scripts" / "make_ixi_benchmark.py"), "--ixi", str(args.ixi)]
        subprocess.run(cmd + ["--out", str(data), "--seed", str(args.seed)], check=True)
    return [
        Dataset(
            "ixi",
            {"datalist": str(data / "datalist_hyper.json"), **SLICE_GRID},
            {p: {"datalist": str(data / f"datalist_{p}.json")} for p in ("hyper", "hypo")},
            slices_per_volume=1,
        )
    ]


def baseline_config(method: str, dataset: Dataset, work: Path) -> str:
    """A config file turning the cDDPM evaluation into a baseline (``scripts/lib/baselines.py``); returns its path."""
    template = None
    if METHODS[method].template:
        template = work / "mean_image.pt"
        if not template.is_file():
            with bundle_context("cddpm") as root:
                parser = load_config(root, ["train", "demo"], dataset.overrides)
                entries = parser.get_parsed_content("train#datalist")
                mean = mean_healthy_image(entries, parser.get_parsed_content("validate#preprocessing"))
            with atomic_output(template) as tmp:
                torch.save(mean, tmp)
    inferer = {"_target_": "lib.baselines.TemplateResidualInferer", "template": template and str(template)}
    extra = {"method": METHODS[method].label, "network_passes_per_slice": 0}
    config = {"network": "$torch.nn.Identity()", "inferer": inferer, "extra": extra}
    return str(atomic_write_text(work / f"{method}.json", json.dumps(config, indent=2)))


def train_stage(name: str, method: Method, dataset: Dataset, work: Path, stage: int, args) -> dict[str, float]:
    """Train ``name`` up to the end of curve stage ``stage`` (resuming); returns its timing for this stage."""
    common = {**dataset.overrides, **method.overrides, "device": f"$torch.device('{args.device}')"}
    common["num_workers"] = args.num_workers
    per_stage = args.budget // args.curve_points
    stage_keys = {"epochs": stage, "train#trainer#epoch_length": per_stage, "val_interval": 1}
    configs = ["train", "demo", *method.configs, *method.train_configs]
    log = work / "train.log"
    if method.pretrain:
        encoder = work / "pretrain" / "encoder.pt"
        if not encoder.is_file():
            pretrain_keys = {"epochs": 1, "train#trainer#epoch_length": max(args.budget // 2, 1), "val_interval": 1}
            run_bundle(
                "cddpm",
                ["train", "pretrain_encoder", "demo"],
                work / "pretrain.log",
                **common,
                **pretrain_keys,
                ckpt_dir=str(work / "pretrain"),
                output_dir=str(work / "pretrain"),
            )
        common["pretrained_encoder"] = str(encoder)
    seconds, peak_mb, text = run_bundle(
        method.bundle, configs, log, **common, **stage_keys, ckpt_dir=str(work / "models"), output_dir=str(work / "tb")
    )
    epoch = epoch_seconds(text)[-1]
    return {"train_s_per_iter": epoch / per_stage, "train_peak_mb": peak_mb, "train_stage_wall_s": seconds}


def evaluate(
    method_name: str, weights: Path | None, dataset: Dataset, target: str, out: Path, work: Path, args
) -> dict[str, Any]:
    """The bundle's ``evaluate.json`` on one target; returns the table row."""
    method = METHODS[method_name]
    configs = ["inference", "evaluate", "demo", *method.configs]
    if weights is None:
        configs.append(baseline_config(method_name, dataset, work))
    overrides = {**dataset.overrides, **dataset.targets[target], **method.overrides, **method.eval_overrides}
    overrides.pop("batch_size", None)  # training batch size; the inferers batch all slices of a volume
    overrides.update({"device": f"$torch.device('{args.device}')", "output_dir": str(out), "amp": args.amp})
    overrides["threshold_file"] = str(out / "thresholds.json")
    if weights is not None:
        overrides["ckpt_path"] = str(weights)
    seconds, _, _ = run_bundle(method.bundle, configs, work / "evaluate.log", **overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    summary, counts = metrics["summary"], metrics["counts"]
    recon = metrics.get("reconstruction_healthy_val", {})
    n_slices = (counts["val_labelled"] + counts["val_healthy"] + counts["test"]) * dataset.slices_per_volume
    row = quality_row(metrics, [k for k, _ in COLUMNS])
    row.update(
        {
            "method": method.label,
            "healthy_ssim": recon.get("ssim", {}).get("mean"),
            "healthy_psnr": recon.get("psnr", {}).get("mean"),
            "passes": metrics.get("extra", {}).get("network_passes_per_slice"),
            "infer_s_per_slice": seconds / n_slices,
            "infer_s_per_volume": seconds / n_slices * 50,
            "chance_auprc": chance_auprc(summary),
        }
    )
    return row


def atlas_datasets(out: Path, args) -> list[Dataset]:
    """The IXI -> ATLAS benchmark on the IXI slices' 1 mm grid, as the IXI benchmark resamples it (2.5 mm, 96 x 96)."""
    missing = [p for p in (args.ixi, args.atlas) if not p.is_dir()]
    if missing:
        print(f"skipping the ATLAS benchmark: {missing[0]} not found (real slices, see README)", flush=True)
        return []
    data = out / "data" / "atlas"
    if not (data / "datalist_atlas.json").is_file():
        cmd = [sys.executable, str(REPO / "scripts" / "make_atlas_benchmark.py"), "--ixi", str(args.ixi)]
        subprocess.run(cmd + ["--atlas", str(args.atlas), "--out", str(data)], check=True)
    datalist = {"datalist": str(data / "datalist_atlas.json")}
    return [Dataset("atlas", {**datalist, **SLICE_GRID}, {"ATLAS": datalist}, slices_per_volume=1)]


def run_dataset(dataset: Dataset, out: Path, args) -> list[dict[str, Any]]:
    """Train every method of ``args.methods`` on ``dataset`` stage by stage and evaluate it; returns all rows."""
    rows: list[dict[str, Any]] = []
    per_stage = args.budget // args.curve_points
    trainings = {METHODS[m].training for m in args.methods} - {None}
    for stage in range(1, args.curve_points + 1):
        final = stage == args.curve_points
        timing = {}
        for name in sorted(trainings):  # a rerun skips the stages already trained (their timing is on file)
            method = next(METHODS[m] for m in args.methods if METHODS[m].training == name)
            work = out / dataset.name / name
            done = work / "models" / f"timing_{stage * per_stage}.json"
            if not done.is_file():  # the timing marks the stage done, so it is written after its weights
                stage_timing = train_stage(name, method, dataset, work, stage, args)
                os.replace(work / "models" / "model_final.pt", work / "models" / f"step_{stage * per_stage}.pt")
                atomic_write_text(done, json.dumps(stage_timing))
            timing[name] = json.loads(done.read_text())
        for method_name in args.methods:
            method = METHODS[method_name]
            if method.training is None and not final:
                continue  # baselines do not train: evaluated once
            if not (method.curve or final):
                continue
            work = out / dataset.name / (method.training or method_name)
            weights = None if method.training is None else work / "models" / f"step_{stage * per_stage}.pt"
            for target in dataset.targets:
                eval_dir = out / dataset.name / "eval" / f"{method_name}_{target}_{stage * per_stage}"
                if (eval_dir / "row.json").is_file():  # evaluated by an earlier, interrupted run
                    rows.append(json.loads((eval_dir / "row.json").read_text()))
                    continue
                row = evaluate(method_name, weights, dataset, target, eval_dir, work, args)
                row.update(timing.get(method.training, {}))
                row.update({"key": method_name, "data": dataset.name, "target": target, "step": stage * per_stage})
                row["eval_dir"] = str(eval_dir)
                atomic_write_text(eval_dir / "row.json", json.dumps(row))
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("data", "target", "key", "step", "auprc")}), flush=True)
    return rows


def final_rows(rows: list[dict[str, Any]], data: str, target: str) -> dict[str, dict[str, Any]]:
    """Per method, its row at the last evaluated step for one data set and target (rows come in step order)."""
    return {r["key"]: r for r in rows if r["data"] == data and r["target"] == target}


def plot_curves(rows: list[dict[str, Any]], data: str, path: Path) -> None:
    """AUPRC and Dice@val-thr against training iterations, one panel per target; baselines as lines."""
    targets = sorted({r["target"] for r in rows if r["data"] == data})
    fig, axes = plt.subplots(2, len(targets), figsize=(4.5 * len(targets), 7), squeeze=False)
    for col, target in enumerate(targets):
        sel = [r for r in rows if r["data"] == data and r["target"] == target]
        for key in dict.fromkeys(r["key"] for r in sel):
            pts = sorted((r["step"], r) for r in sel if r["key"] == key)
            for ax, metric in zip(axes[:, col], ("auprc", "dice@best_dice_val"), strict=True):
                xs, ys = [p[0] for p in pts], [p[1].get(metric) for p in pts]
                if METHODS[key].training is None:
                    ax.axhline(
                        ys[-1], ls="--", lw=1, label=METHODS[key].label, color="grey" if key == "intensity" else "k"
                    )
                else:
                    ax.plot(xs, ys, marker="o", label=METHODS[key].label)
                ax.set_title(f"{data} / {target}: {metric}")
                ax.set_xlabel("training iterations")
    handles, labels = axes[0, 0].get_legend_handles_labels()  # one legend under the panels, clear of the curves
    legend_height = 0.2 * len(labels)  # inches
    fig.set_figheight(fig.get_figheight() + legend_height)
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    atomic_write_figure(fig, path, dpi=100)


def plot_examples(rows: list[dict[str, Any]], data: str, target: str, path: Path) -> None:
    """The first overlay (input, reconstruction, map, ground truth) of every method's final evaluation, stacked."""
    final = final_rows(rows, data, target)
    panels = [(k, sorted(Path(r["eval_dir"], "overlays").glob("*.png"))) for k, r in final.items()]
    panels = [(k, files[0]) for k, files in panels if files]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (key, png) in zip(axes[:, 0], panels, strict=True):
        ax.imshow(plt.imread(png))
        ax.set_title(f"{METHODS[key].label}: {png.stem}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)


def report(rows: list[dict[str, Any]], args, out: Path) -> str:
    """Markdown: per data set and target, the final-step table."""
    parts = [header("Anomaly detection benchmark: all methods at the same training budget")]
    parts.append(
        f"Budget: {args.budget} training iterations per diffusion model (SparK pretraining: {args.budget // 2} more), "
        f"evaluated at {args.curve_points} points; network sizes of the shipped models. Thresholds calibrated on "
        "validation only; * oracle Dice uses the test labels (an upper bound, not a result). Inference and training "
        "seconds are end-to-end bundle-command wall times (per slice: evaluation wall / slices evaluated). A rerun "
        "with the same --out continues where an interrupted one stopped.\n"
    )
    for data in dict.fromkeys(r["data"] for r in rows):
        for target in dict.fromkeys(r["target"] for r in rows if r["data"] == data):
            last = final_rows(rows, data, target)
            chance = next(iter(last.values()))["chance_auprc"]
            parts.append(f"## {data} / {target} (chance AUPRC {chance:.3f})\n")
            parts.append(markdown_table(list(last.values()), COLUMNS) + "\n")
        parts.append(f"![learning curve](learning_curve_{data}.png)\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=2000, help="training iterations per diffusion model")
    parser.add_argument("--curve-points", type=int, default=4, help="evaluations along the training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", nargs="+", default=["demo", "ixi"], choices=("demo", "ixi", "atlas"))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=list(METHODS),
        help="default: all but the learning-efficiency variants",
    )
    parser.add_argument("--ixi", type=Path, default=REPO.parent / "shared" / "data" / "ixi_t1_axial")
    parser.add_argument("--atlas", type=Path, default=REPO.parent / "shared" / "data" / "atlas_t1_axial")
    parser.add_argument("--demo-data", type=Path, default=None, help="an existing demo cohort (default: generate one)")
    parser.add_argument("--demo-size", default="default", choices=list(SIZES))
    parser.add_argument("--demo-sets", nargs="+", default=["Tumour", "MS", "Stroke"])
    parser.add_argument("--contrasts", nargs="+", default=["t2"], choices=("t1", "t2"))
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--amp",
        default="auto",
        type=parse_amp,
        help="autocast in the evaluations: auto (CUDA, or a CPU with native bf16), True or False",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (demo cohort, inserted lesions)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    args = parser.parse_args(argv)
    if args.budget < args.curve_points:
        parser.error("--budget must be at least --curve-points")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    builders = {"demo": demo_datasets, "ixi": ixi_datasets, "atlas": atlas_datasets}
    datasets = [dataset for data in args.data for dataset in builders[data](out, args)]
    rows = [row for dataset in datasets for row in run_dataset(dataset, out, args)]
    for dataset in datasets:
        plot_curves(rows, dataset.name, out / f"learning_curve_{dataset.name}.png")
        for target in dataset.targets:
            plot_examples(rows, dataset.name, target, out / f"example_maps_{dataset.name}_{target}.png")
    markdown = report(rows, args, out)
    md, _ = write_report(out, "benchmark", markdown, {"args": vars(args), "rows": rows})
    print(markdown)
    print(f"\nwritten: {md} (+ .json, learning curves, example maps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
