"""cDDPM bundle: configs, the x0 trainer, the inferer, and real `monai.bundle run` of train, evaluate and inference."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CDDPM_NETS, TINY_RUN, brain_crop_slices, bundle_parser, run_bundle, tiny_diffusion_unet
from lib.commands import command_configs
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler
from uad.inference import brain_box
from uad.io import config_ids
from uad.postprocessing import erode_mask_per_slice, gaussian_smooth
from uad.precision import cpu_bf16_native
from uad.training import load_weights

from cddpm_bundle.scripts.diffusion import X0PrepareBatch
from cddpm_bundle.scripts.inferer import CDDPMAnomalyInferer
from cddpm_bundle.scripts.networks import ConditionedDiffusionModel
from cddpm_bundle.scripts.simplex import GaussianNoise, SimplexNoise

BUNDLE = REPO / "cddpm_bundle"
CONFIGS = BUNDLE / "configs"

TINY = {**TINY_RUN, **TINY_CDDPM_NETS}


def parser(*names: str) -> ConfigParser:
    return bundle_parser("cddpm_bundle", *names)


def tiny_unet(conditioned: bool = True) -> ConditionedDiffusionModel:
    from monai.networks.nets import ResNet

    unet = tiny_diffusion_unet(conditioned)
    encoder = ResNet("basic", [1, 1, 1, 1], [8, 8, 8, 8], spatial_dims=2, n_input_channels=1, num_classes=16)
    return ConditionedDiffusionModel(unet, encoder if conditioned else None)


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_configs_ship_the_demo_sizes_and_paper_json_the_published_ones():
    shipped = parser("train.json").get_parsed_content("model_sizes")
    recorded = json.loads((REPO / "cddpm_bundle" / "models" / "model_config.json").read_text())
    assert config_ids(shipped) == recorded  # the configs as they stand build the shipped network
    assert shipped["unet"]["channels"] == [32, 64, 64] and shipped["image_size"] == [64, 64, 32]
    p = parser("train.json", "paper.json")
    value = p.get_parsed_content
    assert value("unet#channels") == [128, 256, 256] and value("unet#num_res_blocks") == 3
    assert value("unet#attention_levels") == [False, False, True] and p["unet"]["with_conditioning"]
    assert value("encoder#layers") == [3, 4, 6, 3] and value("encoder#block") == "bottleneck"  # ResNet-50
    assert value("latent_dim") == 128 and value("image_size") == [96, 96, 50] and value("pixdim") == [2.0, 2.0, 2.0]
    assert p["scheduler"]["schedule"] == "cosine" and value("num_train_timesteps") == 1000
    assert p["scheduler"]["prediction_type"] == "sample" and p["loss"]["_target_"] == "torch.nn.L1Loss"
    assert p["noise"] == {"_target_": "scripts.simplex.SimplexNoise", "octaves": 6, "persistence": 0.8, "frequency": 64}
    assert p["batch_size"] == 32 and p["learning_rate"] == 1e-4
    assert parser("inference.json")["ensemble_timesteps"] == [250, 500, 750]


def test_paper_cpu_overlay_runs_one_noise_level_on_the_brain_box(bundle_imports):
    """``paper_cpu.json`` over ``paper.json``: the paper's single reconstruction (t = 500, one pass per slice) on each
    slice's brain box, in sides divisible by the paper UNet's downsampling (4)."""
    bundle_imports("cddpm_bundle")
    inferer = parser("inference.json", "paper.json", "paper_cpu.json").get_parsed_content("inferer")
    assert inferer.timesteps == (500,) and inferer.network_passes_per_slice == 1
    assert inferer.brain_box_multiple == 4


def test_paper_sized_network_instantiates_and_runs(bundle_imports):
    bundle_imports("cddpm_bundle")
    net = parser("train.json", "paper.json").get_parsed_content("network_def")
    assert 40e6 < sum(p.numel() for p in net.unet.parameters()) < 46e6  # UNet 128/256/256, 3 res blocks: 42.9M
    assert 23e6 < sum(p.numel() for p in net.encoder.parameters()) < 25e6  # ResNet-50 trunk, 128-d head: 23.8M
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        assert net(x * 2 - 1, torch.tensor([10, 900]), condition=x).shape == x.shape


def test_configs_instantiate_with_demo_overrides(demo_cohort, bundle_imports):
    bundle_imports("cddpm_bundle")
    train = parser("train.json", "demo.json")
    train["dataset_dir"] = str(demo_cohort)
    net = train.get_parsed_content("network_def")
    assert type(net).__name__ == "ConditionedDiffusionModel" and net.encoder is not None
    assert train.get_parsed_content("train#prepare_batch").timestep_range == (0, 1000)
    assert len(train.get_parsed_content("train#datalist")) == 4
    assert type(train.get_parsed_content("noise")).__name__ == "SimplexNoise"
    gaussian = parser("train.json", "demo.json", "gaussian_noise.json")
    assert type(gaussian.get_parsed_content("noise")).__name__ == "GaussianNoise"
    inference = parser("inference.json", "demo.json")
    inferer = inference.get_parsed_content("inferer")
    assert type(inferer).__name__ == "CDDPMAnomalyInferer" and inferer.timesteps == (250, 500, 750)
    assert inference.get_parsed_content("threshold") is None or isinstance(
        inference.get_parsed_content("threshold"), float
    )
    evaluate = parser("inference.json", "evaluate.json", "demo.json")
    evaluate.update({"dataset_dir": str(demo_cohort), "test_set": "Tumour"})
    val, test = evaluate.get_parsed_content("entries")["Tumour"]
    assert sum("seg" in e for e in val) == 2 and sum("seg" not in e for e in val) == 2 and len(test) == 2


# ---------------------------------------------------------------------------------------------------------------
# the trainer's batch and the inferer


def test_prepare_batch_target_is_x0_and_condition_is_clean_image():
    scheduler = DDPMScheduler(1000, schedule="cosine", prediction_type="sample")
    prepare = X0PrepareBatch(scheduler, GaussianNoise(), timestep_range=(200, 800), seed=3)
    images = torch.rand(6, 1, 16, 16)
    x_t, target, args, kwargs = prepare({"image": images})
    assert torch.equal(target, images * 2 - 1) and torch.equal(kwargs["condition"], images) and args == ()
    t = kwargs["timesteps"]
    assert ((t >= 200) & (t < 800)).all()
    # x_t is the forward process applied to x0 with the drawn step: recover the noise and check its scale
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * target) / (1 - abar).sqrt()
    assert abs(float(eps.std()) - 1) < 0.1
    # seeded: reset gives the same draw (validation comparable across epochs), a further call a new one
    prepare.reset()
    again = prepare({"image": images})
    assert torch.equal(again[0], x_t) and not torch.equal(prepare({"image": images})[0], x_t)


def test_prepare_batch_stacks_brain_slices_of_volumes():
    prepare = X0PrepareBatch(DDPMScheduler(1000, schedule="cosine"), GaussianNoise())
    volume = torch.zeros(2, 1, 8, 8, 5)
    volume[0, :, 2:6, 2:6, 1:3] = 0.5
    volume[1, :, 2:6, 2:6, 4] = 0.7
    _, target, _, kwargs = prepare({"image": volume, "mask": volume > 0})
    assert target.shape == (3, 1, 8, 8) and torch.equal(kwargs["condition"][2], volume[1, :, :, :, 4])


def test_trainer_step_uses_x0_target():
    """One real SupervisedTrainer iteration: the loss is L1 between the network output and x0."""
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer

    net = tiny_unet()
    seen = {}

    def loss(pred, target):
        seen["target"] = target
        return torch.nn.functional.l1_loss(pred, target)

    images = torch.rand(2, 1, 16, 16)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": images}],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=loss,
        inferer=SimpleInferer(),
        prepare_batch=X0PrepareBatch(DDPMScheduler(1000, schedule="cosine"), SimplexNoise(frequency=8)),
    )
    trainer.run()
    assert torch.equal(seen["target"], images * 2 - 1)


class _Identity(torch.nn.Module):
    """A 'denoiser' that returns the clean condition exactly: a perfect reconstruction."""

    def forward(self, x, timesteps, condition):
        return condition * 2 - 1


def test_identity_network_gives_zero_anomaly_map():
    inferer = CDDPMAnomalyInferer(DDPMScheduler(1000, schedule="cosine"), SimplexNoise(frequency=8), batch_size=4)
    volume = torch.zeros(1, 1, 24, 24, 6)
    volume[..., 4:20, 4:20, 1:5] = torch.rand(1, 1, 16, 16, 4) * 0.9 + 0.1
    amap, recon = inferer(volume, _Identity(), mask=volume > 0, return_reconstruction=True)
    assert amap.shape == volume.shape and torch.count_nonzero(amap) == 0
    assert torch.allclose(recon, volume, atol=1e-6)
    # a slice stack (N, 1, H, W) comes back as a slice stack
    stack = volume[0].permute(3, 0, 1, 2)
    assert inferer(stack, _Identity()).shape == stack.shape
    assert torch.count_nonzero(inferer(torch.zeros_like(volume), _Identity())) == 0  # no brain: nothing to run


def test_brain_box_is_the_brain_extent_grown_to_multiples_inside_the_image():
    brain = torch.zeros(3, 1, 24, 20, dtype=torch.bool)
    brain[0, 0, 5:10, 3:8] = True
    brain[2, 0, 7:15, 6:9] = True  # union: rows 5-14 (10), columns 3-8 (6)
    rows, cols = brain_box(brain, 4)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (12, 8)
    assert rows.start <= 5 and rows.stop >= 15 and cols.start <= 3 and cols.stop >= 9
    edge = torch.zeros(1, 1, 24, 20, dtype=torch.bool)
    edge[0, 0, 0:3, 17:20] = True  # at the corner: the box is shifted inside the image
    assert brain_box(edge, 8) == (slice(0, 8), slice(12, 20))
    assert brain_box(torch.zeros_like(edge), 4) == (slice(0, 24), slice(0, 20))


def _network_inputs_on_brain_boxes(volume: torch.Tensor) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
    """The shapes the network is called with by a brain-box inferer on ``volume``, the map and the reconstruction."""
    seen = []

    class Recorder(_Identity):
        def forward(self, x, timesteps, condition=None):
            seen.append(tuple(x.shape))
            return super().forward(x, timesteps, condition)

    inferer = CDDPMAnomalyInferer(
        DDPMScheduler(1000), SimplexNoise(frequency=8), timesteps=(500,), brain_box_multiple=4
    )
    amap, recon = inferer(volume, Recorder(), mask=volume > 0, return_reconstruction=True)
    return seen, amap, recon


def test_inferer_runs_each_slice_on_its_own_brain_box():
    volume = torch.zeros(1, 1, 32, 32, 3)
    volume[..., 9:19, 6:12, :] = 0.5
    seen, amap, recon = _network_inputs_on_brain_boxes(volume)
    assert seen == [(3, 1, 12, 8)] and torch.count_nonzero(amap) == 0 and torch.equal(recon, volume)
    volume = torch.zeros(1, 1, 32, 32, 4)
    volume[..., 9:19, 6:12, 0] = 0.5  # box 12 x 8
    volume[..., 4:28, 3:28, 1] = 0.7  # 24 x 28
    volume[..., 20:28, 1:5, 2] = 0.3  # 8 x 4, at the edge
    volume[..., 11:21, 20:26, 3] = 0.6  # 12 x 8, batched with the first
    seen, amap, recon = _network_inputs_on_brain_boxes(volume)
    assert seen == [(1, 1, 8, 4), (2, 1, 12, 8), (1, 1, 24, 28)]  # one call per box size, smaller first
    assert torch.equal(recon, volume) and torch.count_nonzero(amap) == 0  # every crop put back in its place


def test_inferer_marks_inserted_anomaly_with_healing_network():
    """A network that 'heals' (returns the healthy image) makes the residual peak at the lesion."""
    healthy = torch.zeros(1, 1, 32, 32, 8)
    healthy[..., 4:28, 4:28, :] = 0.5
    lesion = healthy.clone()
    lesion[..., 14:20, 14:20, 3:6] = 1.0

    class Healer(torch.nn.Module):
        def forward(self, x, timesteps, condition):
            return torch.full_like(condition, 0.5) * 2 - 1

    inferer = CDDPMAnomalyInferer(DDPMScheduler(1000), SimplexNoise(frequency=8), timesteps=(500,), median_kernel=3)
    amap = inferer(lesion, Healer(), mask=healthy > 0)
    inside = amap[..., 15:19, 15:19, 4].mean()
    assert inside > 0.4 and amap[..., 6:10, 6:10, :].max() == 0
    smoothing = CDDPMAnomalyInferer(
        DDPMScheduler(1000), SimplexNoise(frequency=8), timesteps=(500,), median_kernel=3, smooth_sigma=1.0
    )
    eroded = erode_mask_per_slice(healthy > 0, 3).float()
    torch.testing.assert_close(smoothing(lesion, Healer(), mask=healthy > 0), gaussian_smooth(amap, 1.0) * eroded)
    with pytest.raises(ValueError, match="smooth_sigma"):
        CDDPMAnomalyInferer(DDPMScheduler(1000), SimplexNoise(frequency=8), smooth_sigma=-1.0)


def test_conditioned_model_requires_consistent_unet():
    net = tiny_unet(conditioned=True)
    with pytest.raises(ValueError, match="with_conditioning"):
        ConditionedDiffusionModel(net.unet, None)
    with pytest.raises(ValueError, match="condition"):
        net(torch.rand(1, 1, 16, 16), torch.tensor([10]))
    ablation = tiny_unet(conditioned=False)
    assert ablation(torch.rand(1, 1, 16, 16), torch.tensor([10]), condition=None).shape == (1, 1, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# real bundle runs on tiny generated data


@pytest.fixture(scope="module")
def trained(demo_cohort, tmp_path_factory):
    """Train (one epoch, tiny nets), then evaluate on the Tumour set: returns the folders."""
    work = tmp_path_factory.mktemp("cddpm")
    common = {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(work / "models")}
    train = run_bundle(
        "cddpm_bundle", ["configs/train.json", "configs/demo.json"], {**common, "output_dir": str(work / "train")}
    )
    evaluate = run_bundle(
        "cddpm_bundle",
        command_configs("evaluate", "demo"),
        {**common, "output_dir": str(work / "eval"), "test_set": "Tumour", "ensemble_timesteps": [500]},
    )
    return {"work": work, "common": common, "train_log": train.stdout + train.stderr, "eval_log": evaluate.stdout}


def test_bundle_train_writes_checkpoints_and_logs(trained):
    models = trained["work"] / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert list(models.glob("checkpoint_checkpoint_epoch=1.pt"))
    state = torch.load(models / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    assert "val_l1" in trained["train_log"]
    assert list((trained["work"] / "train").glob("events.out.tfevents.*"))


def test_bundle_train_resumes_from_checkpoint(trained, tmp_path):
    """Training continues from the checkpoint, and the best model saved before the interruption is only replaced by
    a better one: here the recorded best val_l1 is made unbeatable (0), so model.pt must survive the resumed run."""
    models = tmp_path / "models"
    models.mkdir()
    src = next((trained["work"] / "models").glob("checkpoint_checkpoint_epoch=1.pt"))
    state = torch.load(src, weights_only=True)
    assert state["best_model"]["best_metric_epoch"] == 1
    ((_, saved_name),) = state["best_model"]["key_metric_checkpoint"]["_saved"]  # (priority = -val_l1, name)
    state["best_model"]["best_metric"] = 0.0
    state["best_model"]["key_metric_checkpoint"]["_saved"] = [(-0.0, saved_name)]
    torch.save(state, models / src.name)
    for name in ("model.pt", "model_config.json"):  # the folder of the interrupted run
        (models / name).write_bytes((trained["work"] / "models" / name).read_bytes())
    best_before = (models / "model.pt").read_bytes()
    result = run_bundle(
        "cddpm_bundle",
        ["configs/train.json", "configs/demo.json"],
        {**trained["common"], "ckpt_dir": str(models), "output_dir": str(tmp_path / "train"), "epochs": 2},
    )
    log = result.stdout + result.stderr
    assert "resuming training from" in log and "Epoch: 2/2" in log and "Epoch: 1/2" not in log
    assert (models / "checkpoint_checkpoint_epoch=2.pt").is_file()
    assert (models / "model.pt").read_bytes() == best_before
    assert "val_l1 best value: 0.0 at epoch: 1" in log


def test_bundle_evaluate_writes_metrics_thresholds_and_figures(trained):
    out = trained["work"] / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"val_labelled": 2, "val_healthy": 2, "test": 2, "test_with_lesion": 2}
    assert set(metrics["thresholds"]) == {"best_dice_val", "fpr_1", "fpr_5", "fpr_10"}
    assert 0 <= metrics["summary"]["auprc"]["mean"] <= 1 and 0 <= metrics["summary"]["oracle_dice"]["mean"] <= 1
    assert (out / "pr_curve.png").stat().st_size > 0 and list((out / "overlays").glob("*.png"))
    assert (out / "per_volume.csv").read_text().count("\n") == 3
    stored = json.loads((trained["work"] / "models" / "thresholds.json").read_text())
    assert stored["method"] == "best_dice_val" and stored["threshold"] == metrics["thresholds"]["best_dice_val"]
    assert re.search(r"auprc\s+\d", trained["eval_log"])


def test_bundle_evaluate_again_reads_the_cases_it_inferred(trained):
    """Run again into the same folder (as after an interruption), evaluation infers nothing and reports the same."""
    out = trained["work"] / "eval"
    before = json.loads((out / "metrics.json").read_text())
    result = run_bundle(
        "cddpm_bundle",
        command_configs("evaluate", "demo"),
        {**trained["common"], "output_dir": str(out), "test_set": "Tumour", "ensemble_timesteps": [500]},
    )
    log = result.stdout + result.stderr
    assert "validation: 4 of 4 case(s) read from" in log and "test: 2 of 2 case(s) read from" in log
    after = json.loads((out / "metrics.json").read_text())
    assert after["summary"] == before["summary"] and after["thresholds"] == before["thresholds"]


def test_bundle_inference_writes_maps_in_input_geometry(trained, demo_cohort, tmp_path):
    out = tmp_path / "maps"
    run_bundle(
        "cddpm_bundle",
        ["configs/inference.json", "configs/demo.json"],
        {
            **trained["common"],
            "output_dir": str(out),
            "datalist": str(demo_cohort / "datalists" / "Tumour_t2.json"),
            "ensemble_timesteps": [500],
        },
    )
    tests = json.loads((demo_cohort / "datalists" / "Tumour_t2.json").read_text())["test"]
    assert len(tests) == 2
    for entry in tests:
        source = nib.load(demo_cohort / "datalists" / entry["image"])
        case = entry["image"].split("/")[-1].removesuffix(".nii.gz")
        amap = nib.load(out / f"{case}_anomaly_map.nii.gz")
        binary = nib.load(out / f"{case}_anomaly_mask.nii.gz")
        assert amap.shape == source.shape and np.allclose(amap.affine, source.affine, atol=1e-4)
        assert binary.shape == source.shape and binary.get_data_dtype() == np.uint8
        assert amap.get_data_dtype() == np.float32 and np.isfinite(amap.get_fdata()).all()
        assert set(np.unique(binary.get_fdata())) <= {0.0, 1.0}
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_training_shorter_than_val_interval_leaves_a_model_that_inference_finds(demo_cohort, tmp_path):
    common = {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(tmp_path / "models")}
    train = run_bundle(
        "cddpm_bundle",
        ["configs/train.json", "configs/demo.json"],
        {**common, "val_interval": 5, "output_dir": str(tmp_path / "train")},
    )
    assert "no validated best model (no validation ran" in train.stdout + train.stderr
    assert "val_l1" not in train.stdout + train.stderr
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    run_bundle(
        "cddpm_bundle",
        ["configs/inference.json", "configs/demo.json"],
        {**common, "output_dir": str(tmp_path / "out"), "input_file": str(image), "ensemble_timesteps": [500]},
    )
    assert (tmp_path / "out" / image.name.replace(".nii.gz", "_anomaly_map.nii.gz")).is_file()


def test_bundle_inference_on_one_file_without_mask(trained, demo_cohort, tmp_path):
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    out = tmp_path / "one"
    result = run_bundle(
        "cddpm_bundle",
        ["configs/inference.json", "configs/demo.json"],
        {**trained["common"], "output_dir": str(out), "input_file": str(image), "ensemble_timesteps": [500]}
        | {"amp": "True", "channels_last": "True"},  # explicit bf16 autocast, channels-last weights
    )
    assert "no brain mask given" in result.stdout + result.stderr
    assert cpu_bf16_native() or "bf16 autocast runs 20-40x slower" in result.stdout + result.stderr
    written = nib.load(out / image.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
    assert written.shape == nib.load(image).shape
    amap = np.asarray(written.dataobj)
    assert np.isfinite(amap).all() and amap.max() > 0  # bf16 autocast: a finite map (CheckAnomalyMapd refuses others)


def test_bundle_trains_with_torchrun_on_two_cpu_processes(demo_cohort, tmp_path):
    """DDP on 2 gloo processes, with the warm-up and EMA overlays (their handlers run on every rank), and the device
    given as users type it (``--device cpu``, a plain string)."""
    models = tmp_path / "models"
    configs = ["configs/train.json", "configs/demo.json", "configs/warmup.json", "configs/ema.json"]
    result = run_bundle(
        "cddpm_bundle",
        [*configs, "configs/multi_gpu_train.json"],
        {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(models), "output_dir": str(tmp_path / "out")}
        | {"device": "cpu"},
        nproc=2,
    )
    log = result.stdout + result.stderr
    assert "val_l1" in log and (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    checkpoint = torch.load(models / "checkpoint_checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 1 and not any(
        k.startswith("module.") for k in checkpoint["ema_network"]
    )
    state = torch.load(models / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP wrapper not saved: loads into the plain network
    load_weights(tiny_unet(), models / "model.pt")


def test_bundle_tracks_runs_in_mlflow_sqlite(demo_cohort, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_bundle(
        "cddpm_bundle",
        ["configs/train.json", "configs/demo.json"],
        {
            **TINY,
            "tracking": "mlflow",
            "tracking_uri": uri,
            "experiment_name": "cddpm_ci",
            "dataset_dir": str(demo_cohort),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "out"),
        },
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["cddpm_ci"])
    assert len(runs) == 1 and runs["metrics.train_loss"].notna().all() and runs["metrics.val_l1"].notna().all()


# ---------------------------------------------------------------------------------------------------------------
# learning-efficiency overlays: warm-up, EMA weights, brain-box crop


def test_overlays_compose_by_appending_handlers_and_resume_state():
    p = parser("train.json", "warmup.json", "ema.json", "brain_crop.json")
    targets = [h if isinstance(h, str) else h["_target_"] for h in p["train#handlers"]]
    assert targets[:2] == ["ValidationHandler", "CheckpointSaver"] and targets[-2:] == ["LrScheduleHandler", "@ema"]
    assert set(p["resume_state"]) == {"network", "optimizer", "trainer", "best_model", "lr_scheduler", "ema_network"}
    train = parser("train.json")
    assert (
        train["validate#evaluator#network"] == "@validated_network" and train["saved_network"] == "@validated_network"
    )
    assert p["validated_network"] == "$@ema.ema_model"  # validated, kept as model.pt and model_final.pt


def test_brain_crop_gives_brain_box_slices_padded_to_the_batch(demo_cohort, bundle_imports):
    bundle_imports("cddpm_bundle")
    slices, p = brain_crop_slices("cddpm_bundle", TINY, demo_cohort)
    collate = p.get_parsed_content("train#dataloader#collate_fn")
    batch = collate([slices, slices[:1]])
    largest = max(s["image"].shape[1] for s in slices), max(s["image"].shape[2] for s in slices)
    assert batch["image"].shape == (len(slices) + 1, 1, *largest)


def test_bundle_trains_and_resumes_with_warmup_and_ema(demo_cohort, tmp_path):
    """Warm-up continues where it stopped on resume (not from the start), the EMA weights are what is validated and
    saved, and both are restored from the checkpoint."""
    models = tmp_path / "models"
    configs = ["configs/train.json", "configs/demo.json", "configs/warmup.json", "configs/ema.json"]
    common = {**TINY, "batch_size": 2, "warmup_iterations": 8, "dataset_dir": str(demo_cohort)}
    common.update({"ckpt_dir": str(models), "output_dir": str(tmp_path / "out")})  # 4 volumes: 2 iterations/epoch
    for epochs, iterations in ((1, 2), (2, 4)):
        run_bundle("cddpm_bundle", configs, {**common, "epochs": epochs})
        state = torch.load(models / f"checkpoint_checkpoint_epoch={epochs}.pt", weights_only=True)
        assert state["lr_scheduler"]["last_epoch"] == iterations
        lr = state["optimizer"]["param_groups"][0]["lr"]
        assert lr == pytest.approx(1e-4 * (1 / 8 + 7 / 8 * iterations / 8))
    ema, online = state["ema_network"], state["network"]
    assert ema.keys() == online.keys() and any(not torch.equal(ema[k], online[k]) for k in ema)
    final = torch.load(models / "model_final.pt", weights_only=True)
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    load_weights(tiny_unet(), models / "model.pt")


# ---------------------------------------------------------------------------------------------------------------
# pDDPM: the patched variant (configs/pddpm.json)


def test_pddpm_training_noises_one_square_per_slice_and_keeps_the_context_clean():
    from cddpm_bundle.scripts.diffusion import random_patches

    generator = torch.Generator().manual_seed(0)
    squares = random_patches((5, 1, 16, 12), 8, generator, "cpu")
    assert squares.shape == (5, 1, 16, 12) and (squares.sum(dim=(1, 2, 3)) == 64).all()
    assert random_patches((2, 1, 6, 6), 8, generator, "cpu").all()  # a square larger than the slice: all of it
    scheduler = DDPMScheduler(1000, schedule="cosine", prediction_type="sample")
    prepare = X0PrepareBatch(scheduler, GaussianNoise(), timestep_range=(900, 1000), patch_size=8, seed=1)
    images = torch.rand(4, 1, 16, 16)
    x_t, target, _, _ = prepare({"image": images})
    kept = x_t == images * 2 - 1  # the clean context, in the model range
    assert (kept.sum(dim=(1, 2, 3)) == 16 * 16 - 64).all() and torch.equal(target, images * 2 - 1)


class SquareRecorder(torch.nn.Module):
    """Returns its input, recording which pixels each call saw noised (differing from the clean slice)."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean, self.noised = clean * 2 - 1, []

    def forward(self, x, timesteps, condition=None):
        self.noised.append((x != self.clean).any(dim=0))
        return x


def test_pddpm_inference_covers_every_pixel_with_overlapping_squares():
    scheduler = DDPMScheduler(1000, schedule="cosine", prediction_type="sample")
    inferer = CDDPMAnomalyInferer(scheduler, GaussianNoise(), timesteps=(300,), patch_size=8, slice_size=(20, 16))
    assert inferer.patch_starts(20) == [0, 4, 8, 12] and inferer.patch_starts(16) == [0, 4, 8]
    assert inferer.network_passes_per_slice == 4 * 3
    slices = torch.rand(2, 1, 20, 16) * 0.8 + 0.1
    network = SquareRecorder(slices)
    recon = inferer.reconstruct_slices(slices, slices > 0, network, torch.Generator().manual_seed(0))["reconstruction"]
    assert len(network.noised) == 12 and all(n.sum() <= 64 for n in network.noised)  # one 8 x 8 square a call
    assert torch.stack(network.noised).any(dim=0).all()  # together they cover the slice
    assert recon.shape == slices.shape and torch.isfinite(recon).all()
    whole = CDDPMAnomalyInferer(scheduler, GaussianNoise(), timesteps=(300,))
    assert whole.patch_starts(20) == [0] and whole.network_passes_per_slice == 1


def test_pddpm_trains_and_infers_with_the_bundle_commands(demo_cohort, tmp_path, bundle_imports):
    common = {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(tmp_path / "models")}
    run_bundle("cddpm_bundle", command_configs("train", "demo", "pddpm"), {**common, "output_dir": str(tmp_path / "t")})
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("encoder.") for k in state)  # unconditioned, as the paper's pDDPM
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    out = tmp_path / "maps"
    overrides = {**common, "input_file": str(image), "output_dir": str(out), "ensemble_timesteps": [400]}
    run_bundle("cddpm_bundle", command_configs("inference", "demo", "pddpm"), overrides)
    written = nib.load(out / image.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
    assert written.shape == nib.load(image).shape and written.get_fdata().max() > 0
    bundle_imports("cddpm_bundle")
    shipped = parser("inference.json", "pddpm.json").get_parsed_content("inferer")  # the shipped 64 px grid
    assert (shipped.patch_size, shipped.patch_stride, shipped.network_passes_per_slice) == (32, 16, 3 * 3)
