"""AutoDDPM bundle: configs, the three inference stages, perceptual terms, and real `monai.bundle run` of every job."""

from __future__ import annotations

import json
import re
import sys
import types

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_GRID, TINY_RUN, brain_crop_slices, bundle_parser, run_bundle
from lib.commands import command_configs
from monai.bundle import ConfigParser
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from uad.io import config_ids
from uad.precision import cpu_bf16_native

from autoddpm_bundle.scripts.diffusion import NoisePredictionPrepareBatch
from autoddpm_bundle.scripts.inferer import STAGE_KEYS, AutoDDPMAnomalyInferer
from autoddpm_bundle.scripts.perceptual import LPIPSDistance, SSIMDistance, build_perceptual
from autoddpm_bundle.scripts.stages import FlattenStagesd, StagesPrepareBatch

BUNDLE = REPO / "autoddpm_bundle"
CONFIGS = BUNDLE / "configs"

TINY = {
    **TINY_RUN,
    "network_def#channels": [8, 16, 16],
    "network_def#num_head_channels": 8,
    "network_def#norm_num_groups": 8,
}
# inference overrides on top of TINY and configs/demo.json (DDIM): 2 + 1 x 2 = 4 network passes per slice
TINY_SAMPLING = {"batch_size": 16, "ddim_mask_steps": 2, "ddim_resample_steps": 1, "resample_repeats": 2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process networks are tiny: one thread avoids OpenMP contention on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parser(*names: str) -> ConfigParser:
    return bundle_parser("autoddpm_bundle", *names)


def tiny_unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16, 16),
        attention_levels=(False, False, True),  # as configs/demo.json
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
    ).eval()


class CountingNetwork(torch.nn.Module):
    """A fake denoiser that records every call's timesteps and returns seeded random noise estimates."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[int] = []
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x, timesteps):
        assert timesteps.shape == (x.shape[0],) and (timesteps == timesteps[0]).all()
        self.timesteps.append(int(timesteps[0]))
        return torch.randn(x.shape, generator=self.generator)


class OracleNetwork(torch.nn.Module):
    """Knows the clean slices x0: returns the exact noise eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def __init__(self, scheduler, clean: torch.Tensor) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.x0 = clean * 2 - 1

    def forward(self, x, timesteps):
        abar = self.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()


class ElementwiseNetwork(torch.nn.Module):
    """A fake denoiser whose estimate for each slice depends on that slice only; records every call's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, timesteps):
        self.batches.append(x.shape[0])
        return 0.3 * x - 0.01 * timesteps.view(-1, 1, 1, 1)


def brain_slices(n: int = 3, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(n, 1, size, size)
    x[..., 4:-4, 4:-4] = torch.rand(n, 1, size - 8, size - 8) * 0.8 + 0.1
    return x, x > 0


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_configs_ship_the_demo_sizes_and_paper_json_the_published_ones(bundle_imports):
    bundle_imports("autoddpm_bundle")
    shipped = parser("train.json").get_parsed_content("model_sizes")
    recorded = json.loads((REPO / "autoddpm_bundle" / "models" / "model_config.json").read_text())
    assert config_ids(shipped) == recorded  # the configs as they stand build the shipped network
    assert shipped["network_def"]["channels"] == [32, 64, 64] and shipped["image_size"] == [64, 64, 32]
    p, value = parser("train.json"), parser("train.json", "paper.json").get_parsed_content
    net = p["network_def"]
    assert net["_target_"] == "monai.networks.nets.DiffusionModelUNet" and value("network_def#channels") == [
        128,
        256,
        256,
    ]
    assert value("network_def#attention_levels") == [False, True, True] and value("network_def#num_res_blocks") == 1
    assert "with_conditioning" not in net  # unconditioned
    assert p["scheduler"]["schedule"] == "linear_beta" and p["scheduler"]["prediction_type"] == "epsilon"
    assert (p["scheduler"]["beta_start"], p["scheduler"]["beta_end"], value("num_train_timesteps")) == (
        1e-4,
        0.02,
        1000,
    )
    assert p["loss"]["_target_"] == "torch.nn.MSELoss" and p["batch_size"] == 16 and p["learning_rate"] == 1e-4
    assert p["train"]["prepare_batch"]["_target_"] == "scripts.diffusion.NoisePredictionPrepareBatch"
    assert p["timestep_range"] == [0, 1000]  # the whole schedule unless an overlay narrows it
    assert p["train"]["prepare_batch"]["timestep_range"] == p["validate"]["prepare_batch"]["timestep_range"]
    assert p["train"]["inferer"]["_target_"] == "monai.inferers.DiffusionInferer"
    assert value("image_size") == [96, 96, 50] and value("pixdim") == [2.0, 2.0, 2.0]
    # resumable like the cDDPM bundle (whose test suite runs an actual resume): same shared hook, same state
    assert "$scripts.uad.training.attach_resume(@train#trainer, @resume_dir, @resume_state, @device)" in p["initialize"]
    cddpm_train = json.loads((REPO / "cddpm_bundle" / "configs" / "train.json").read_text())
    assert p["resume_state"] == cddpm_train["resume_state"]
    inference = parser("inference.json")
    keys = ("mask_noise_level", "resample_noise_level", "resample_repeats", "mask_threshold", "mask_dilation")
    assert [inference[k] for k in keys] == [200, 50, 5, 0.13, 3]
    assert inference["sampler"] == "ddim" and inference["perceptual"] == "ssim"  # fast by default
    assert inference["residual_quantile"] == 0.95 and inference["mask_quantile"] is None
    fast = inference.get_parsed_content("inferer")
    assert isinstance(fast.scheduler, DDIMScheduler) and fast.network_passes_per_slice == 5 + 2 * 5
    assert fast.mask_samples == 1  # the paper's single mask-stage chain
    ixi_t1 = parser("inference.json", "ixi_t1.json").get_parsed_content("inferer")
    assert (ixi_t1.mask_samples, ixi_t1.network_passes_per_slice) == (3, 3 * 12 + 2 * 5)  # what its threshold fits
    reference = parser("inference.json", "reference_sampler.json").get_parsed_content("inferer")
    assert isinstance(reference.scheduler, DDPMScheduler) and reference.network_passes_per_slice == 200 + 50 * 5


def test_configs_instantiate_with_demo_overrides(demo_cohort, bundle_imports, tmp_path, monkeypatch):
    bundle_imports("autoddpm_bundle")
    train = parser("train.json", "demo.json")
    train["dataset_dir"] = str(demo_cohort)
    assert type(train.get_parsed_content("network_def")).__name__ == "DiffusionModelUNet"
    assert len(train.get_parsed_content("train#datalist")) == 4
    multi_gpu = parser("train.json", "demo.json", "multi_gpu_train.json")
    assert multi_gpu["train#sampler"]["_target_"] == "DistributedSampler"
    assert multi_gpu["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    multi_gpu.update({"dataset_dir": str(demo_cohort), "network": "@network_def", "rank": 1})
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun sets it
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        handlers = multi_gpu.get_parsed_content("train#trainer#train_handlers")
    finally:
        idist.finalize()  # ignite caches the process group: drop it, or later savers in this process ask its rank
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert [type(h).__name__ for h in handlers] == ["ValidationHandler"]  # other ranks neither save nor log
    inferer = parser("inference.json", "demo.json").get_parsed_content("inferer")
    assert type(inferer).__name__ == "AutoDDPMAnomalyInferer" and inferer.sampler == "ddim"
    assert inferer.brain_box_multiple is None
    boxed = parser("inference.json", "demo.json")
    boxed["brain_crop"] = True
    assert boxed.get_parsed_content("inferer").brain_box_multiple == 4  # 3 UNet levels
    evaluate = parser("inference.json", "evaluate.json", "demo.json")
    evaluate.update({"dataset_dir": str(demo_cohort), "test_set": "Tumour"})
    val, test = evaluate.get_parsed_content("entries")["Tumour"]
    assert sum("seg" in e for e in val) == 2 and sum("seg" not in e for e in val) == 2 and len(test) == 2
    assert evaluate.get_parsed_content("extra")["perceptual"] == "1-ssim"


def test_training_slices_are_in_unit_range(demo_cohort, bundle_imports):
    """The data protocol ends in [0, 1] (background 0; the prepare batch maps to the model range), as plain tensors,
    slices_per_volume per volume."""
    bundle_imports("autoddpm_bundle")
    train = parser("train.json", "demo.json")
    train.update({"dataset_dir": str(demo_cohort), **TINY_GRID, "slices_per_volume": 3})
    entry = train.get_parsed_content("train#datalist")[0]
    samples = train.get_parsed_content("train#preprocessing")(entry)
    assert len(samples) == 3
    for s in samples:
        image = s["image"]
        assert type(image) is torch.Tensor and image.shape == (1, 32, 32)
        assert image.min() == 0 and image.max() <= 1 and (image[s["mask"] == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# training and validation batches


def test_seeded_validation_batch_stacks_brain_slices_and_repeats_per_epoch():
    prepare = NoisePredictionPrepareBatch(1000, seed=3)
    volume = torch.zeros(2, 1, 8, 8, 5)
    mask = torch.zeros_like(volume)
    mask[0, :, 2:6, 2:6, 1:3] = 1
    mask[1, :, 2:6, 2:6, 4] = 1
    volume[mask > 0] = 0.5
    images, noise, args, kwargs = prepare({"image": volume, "mask": mask})
    assert images.shape == (3, 1, 8, 8) and torch.equal(kwargs["noise"], noise) and args == ()
    assert torch.equal(images[2], volume[1, ..., 4] * 2 - 1)  # in the model range, background -1
    assert ((kwargs["timesteps"] >= 0) & (kwargs["timesteps"] < 1000)).all()
    prepare.reset()  # what the evaluator's epoch start does
    again = prepare({"image": volume, "mask": mask})
    assert torch.equal(again[1], noise) and torch.equal(again[3]["timesteps"], kwargs["timesteps"])
    assert not torch.equal(prepare({"image": volume, "mask": mask})[1], noise)
    assert torch.equal(prepare({"image": volume})[0], images)  # without a mask: the foreground's slices


def test_training_batch_draws_timesteps_from_the_range():
    prepare = NoisePredictionPrepareBatch(1000, timestep_range=(0, 200))
    images, noise, _, kwargs = prepare({"image": torch.rand(4000, 1, 2, 2)})
    steps = kwargs["timesteps"]
    assert images.shape == noise.shape == (4000, 1, 2, 2) and steps.min() >= 0 and steps.max() == 199
    with pytest.raises(ValueError, match="timestep_range"):
        NoisePredictionPrepareBatch(1000, timestep_range=(0, 1001))


def test_brain_crop_gives_brain_box_slices_padded_with_the_background(demo_cohort, bundle_imports):
    bundle_imports("autoddpm_bundle")
    slices, p = brain_crop_slices("autoddpm_bundle", {**TINY_GRID, "slices_per_volume": 3}, demo_cohort)
    assert all((s["image"][s["mask"] <= 0] == 0).all() for s in slices)  # outside the brain: the background
    tall = dict(slices[0], image=torch.full((1, 40, 8), 0.5), mask=torch.ones(1, 40, 8))
    batch = p.get_parsed_content("train#dataloader#collate_fn")([slices, [tall]])
    largest = 40, max(s["image"].shape[2] for s in slices)
    assert batch["image"].shape == (len(slices) + 1, 1, *largest)
    assert (batch["image"][-1][batch["mask"][-1] <= 0] == 0).all() and (batch["mask"][-1] > 0).sum() == 40 * 8


def test_trainer_step_predicts_the_noise():
    """One SupervisedTrainer iteration with MONAI's DiffusionPrepareBatch + DiffusionInferer: target = the noise."""
    from monai.engines import DiffusionPrepareBatch, SupervisedTrainer
    from monai.inferers import DiffusionInferer

    net, seen = tiny_unet().train(), {}

    def loss(pred, target):
        seen["target"] = target
        return torch.nn.functional.mse_loss(pred, target)

    prepare = DiffusionPrepareBatch(1000)
    prepare.get_noise = lambda images: seen.setdefault("noise", torch.randn_like(images))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.rand(2, 1, 16, 16) * 2 - 1}],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-4),
        loss_function=loss,
        inferer=DiffusionInferer(DDPMScheduler(1000)),
        prepare_batch=prepare,
    )
    trainer.run()
    assert torch.equal(seen["target"], seen["noise"])


# ---------------------------------------------------------------------------------------------------------------
# the three stages


def test_binary_mask_threshold_and_dilation():
    inferer = AutoDDPMAnomalyInferer(DDPMScheduler(1000), mask_threshold=0.13)
    m = torch.zeros(2, 1, 9, 9)
    m[0, 0, 4, 4] = 0.2  # above tau: one pixel -> a 3x3 block
    m[1, 0, 2, 2] = 0.13  # not above tau
    brain = torch.ones_like(m, dtype=torch.bool)
    mask = inferer.binary_mask(m, brain)
    expected = torch.zeros_like(m)
    expected[0, 0, 3:6, 3:6] = 1
    assert torch.equal(mask, expected)
    # per-slice quantile: the top 2% of a slice's brain pixels, whatever their absolute value
    quantile = AutoDDPMAnomalyInferer(DDPMScheduler(1000), mask_quantile=0.98, dilation=1)
    ramp = torch.arange(100.0).view(1, 1, 10, 10) / 1000
    assert quantile.binary_mask(ramp, torch.ones_like(ramp, dtype=torch.bool)).sum() == 2


def test_likelihood_map_formula():
    class Half(torch.nn.Module):
        name = "half"

        def forward(self, x, y):
            return torch.full_like(x, 0.5)

    inferer = AutoDDPMAnomalyInferer(DDPMScheduler(1000), perceptual=Half(), residual_quantile=0.5)
    x, brain = brain_slices(2)
    x_hat = x.clone()
    x_hat[brain] += 0.05 * torch.rand(int(brain.sum()))
    m = inferer.likelihood(x, x_hat, brain)
    r = (x - x_hat).abs()
    for i in range(2):
        q = torch.quantile(r[i][brain[i]], 0.5)
        assert torch.allclose(m[i][brain[i]], 0.5 * (r[i][brain[i]] / q).clamp(0, 1))
    assert (m[~brain] == 0).all() and inferer.perceptual_name == "half"


def test_stitch_formula():
    x, x_hat = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    stitched = AutoDDPMAnomalyInferer.stitch(x, x_hat, mask)
    assert torch.equal(stitched, mask * x_hat + (1 - mask) * x)
    assert torch.equal(stitched[mask == 0], x[mask == 0]) and torch.equal(stitched[mask == 1], x_hat[mask == 1])


@pytest.mark.parametrize("scheduler", [DDPMScheduler(1000), DDIMScheduler(1000)], ids=["ddpm", "ddim"])
def test_resample_keeps_unmasked_region_exactly(scheduler):
    """Whatever the network does, the inpainted image equals x outside the mask, bit for bit."""
    inferer = AutoDDPMAnomalyInferer(scheduler, resample_noise_level=6, ddim_resample_steps=2, resample_repeats=3)
    x, _ = brain_slices(2)
    mask = torch.zeros_like(x)
    mask[..., 8:14, 8:14] = 1
    stitched = AutoDDPMAnomalyInferer.stitch(x, torch.rand_like(x), mask)
    generator = torch.Generator().manual_seed(0)
    inpainted = inferer.resample(x, stitched, mask, CountingNetwork(), generator)
    assert torch.equal(inpainted[mask == 0], x[mask == 0])
    assert not torch.equal(inpainted[mask == 1], x[mask == 1]) and inpainted.min() >= 0 and inpainted.max() <= 1


@pytest.mark.parametrize("scheduler", [DDPMScheduler(1000), DDIMScheduler(1000)], ids=["ddpm", "ddim"])
def test_resample_skips_slices_without_mask_with_the_same_stages(scheduler):
    """A slice whose binary mask is empty is not re-sampled by the network, and every stage output equals a run that
    re-samples it (the noise draws do not change)."""

    class FirstSliceOnly(torch.nn.Module):  # perceptual distance: 1 on the first slice, 0 on the others
        name = "first"

        def forward(self, x, y):
            return (torch.arange(x.shape[0]) == 0).float().view(-1, 1, 1, 1).expand_as(x)

    class ResampleAll(AutoDDPMAnomalyInferer):
        def _denoise_step(self, network, x_t, t, generator, active=None):
            return super()._denoise_step(network, x_t, t, generator)

    settings = {"mask_noise_level": 6, "resample_noise_level": 4, "ddim_mask_steps": 2, "ddim_resample_steps": 2}
    x, brain = brain_slices(3)
    outputs, networks = [], []
    for inferer_type in (AutoDDPMAnomalyInferer, ResampleAll):
        inferer = inferer_type(scheduler, FirstSliceOnly(), resample_repeats=2, mask_threshold=0.0, **settings)
        networks.append(ElementwiseNetwork())
        outputs.append(inferer.run_slices(x, brain, networks[-1]))
    skipping, reference = outputs
    assert skipping["stitch_mask"][0].any() and not skipping["stitch_mask"][1:].any()
    mask_passes = len(inferer.mask_chain)
    assert networks[0].batches == [3] * mask_passes + [1] * (inferer.network_passes_per_slice - mask_passes)
    assert networks[1].batches == [3] * inferer.network_passes_per_slice
    assert all(torch.equal(skipping[k], reference[k]) for k in STAGE_KEYS)
    assert torch.equal(skipping["inpainted"][1:], x[1:]) and not torch.equal(skipping["inpainted"][0], x[0])


@pytest.mark.parametrize(
    ("scheduler", "settings", "passes", "first_timesteps", "last_timesteps"),
    [
        (
            DDPMScheduler(1000),
            {"mask_noise_level": 6, "resample_noise_level": 3, "ddim_mask_steps": 2, "ddim_resample_steps": 1},
            6 + 3 * 4,
            [5, 4, 3, 2, 1, 0, 2, 2],
            [1, 0, 0, 0, 0],
        ),
        (
            DDIMScheduler(1000),
            {"mask_noise_level": 200, "resample_noise_level": 50, "ddim_mask_steps": 4, "ddim_resample_steps": 2},
            4 + 2 * 4,
            [199, 149, 99, 49, 49, 49],
            [49, 24, 24, 24, 24],
        ),
    ],
    ids=["ddpm", "ddim"],
)
def test_network_calls_match_settings(scheduler, settings, passes, first_timesteps, last_timesteps):
    settings = {**settings, "mask_threshold": -1.0}  # every pixel masked: every slice is re-sampled
    inferer = AutoDDPMAnomalyInferer(scheduler, resample_repeats=4, batch_size=8, **settings)
    assert inferer.network_passes_per_slice == passes
    x, brain = brain_slices(5)
    net = CountingNetwork()
    stages = inferer.run_slices(x, brain, net)
    assert len(net.timesteps) == passes  # one batch: passes per slice = network calls
    assert net.timesteps[: len(first_timesteps)] == first_timesteps
    assert net.timesteps[-5:] == last_timesteps  # the last re-sample step is repeated r times too
    assert set(stages) == set(STAGE_KEYS) and all(v.shape == x.shape for v in stages.values())
    if isinstance(scheduler, DDIMScheduler):  # the last chain run set the scheduler to its stride
        assert scheduler.num_inference_steps == 1000 // (50 // settings["ddim_resample_steps"])
    net = CountingNetwork()
    AutoDDPMAnomalyInferer(scheduler, resample_repeats=4, batch_size=2, **settings).run_slices(x, brain, net)
    assert len(net.timesteps) == 3 * passes  # three batches of at most 2 slices


def test_mask_samples_average_independent_chains_of_each_slice():
    """``mask_samples = k`` runs the k chains of every slice in one batch (k x N slices per pass) and averages each
    slice's own k reconstructions; the passes per slice count them."""

    x, brain = brain_slices(2)
    x[1] *= 0.5  # distinct slices: a mix-up of slices and samples changes the mean
    settings = {"mask_noise_level": 200, "ddim_mask_steps": 4, "ddim_resample_steps": 1, "resample_repeats": 2}
    single, ensemble = (AutoDDPMAnomalyInferer(DDIMScheduler(1000), mask_samples=k, **settings) for k in (1, 3))
    assert ensemble.network_passes_per_slice == 3 * 4 + 1 * 2 == single.network_passes_per_slice + 2 * 4
    net = ElementwiseNetwork()
    x_hat = ensemble.reconstruct(x, net, torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and net.batches == [6] * 4
    chains = single.reconstruct(x.repeat(3, 1, 1, 1), net, torch.Generator().manual_seed(0))  # the same 6 chains
    torch.testing.assert_close(x_hat, chains.view(3, *x.shape).mean(0))
    assert not torch.allclose(chains[0], chains[2]) and not torch.allclose(x_hat, chains[:2])  # fresh noise each
    net = ElementwiseNetwork()
    stages = ensemble.run_slices(x, brain, net)  # the three stages: the re-sample stage sees the N slices again
    assert all(v.shape == x.shape for v in stages.values()) and net.batches[:4] == [6] * 4
    assert set(net.batches[4:]) <= {1, 2} and len(net.batches) == 4 + 2
    with pytest.raises(ValueError, match="mask_samples"):
        AutoDDPMAnomalyInferer(DDIMScheduler(1000), mask_samples=0)


def test_ddpm_ignores_ddim_steps_and_ddim_checks_strides():
    ddpm = AutoDDPMAnomalyInferer(DDPMScheduler(1000), mask_noise_level=20, ddim_mask_steps=7)
    assert len(ddpm.mask_chain) == 20  # one step per level, like ddim_eta the DDIM steps do not apply
    with pytest.raises(ValueError, match="divisible"):
        AutoDDPMAnomalyInferer(DDIMScheduler(1000), mask_noise_level=200, ddim_mask_steps=7)
    with pytest.raises(ValueError, match="epsilon"):
        AutoDDPMAnomalyInferer(DDPMScheduler(1000, prediction_type="sample"))


def test_oracle_network_reconstructs_and_gives_zero_map():
    """A network that knows the clean image heals nothing: x_hat = x, empty mask, inpainted = x, zero map."""
    scheduler = DDIMScheduler(1000)
    volume = torch.zeros(1, 1, 24, 24, 4)
    volume[..., 4:20, 4:20, :] = torch.rand(1, 1, 16, 16, 4) * 0.8 + 0.1
    slices = volume[0].permute(3, 0, 1, 2)
    inferer = AutoDDPMAnomalyInferer(scheduler, ddim_mask_steps=4, ddim_resample_steps=2, median_kernel=3)
    out = inferer(volume, OracleNetwork(scheduler, slices), mask=volume > 0, return_intermediates=True)
    assert set(out) == {"pred", *STAGE_KEYS} and all(v.shape == volume.shape for v in out.values())
    assert torch.allclose(out["reconstruction"], volume, atol=1e-4)
    assert out["stitch_mask"].sum() == 0 and torch.equal(out["inpainted"], volume) and out["pred"].max() == 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_real_unet_runs_both_samplers_reproducibly(sampler):
    if sampler == "ddpm":
        settings = {"mask_noise_level": 4, "resample_noise_level": 2}
        inferer = AutoDDPMAnomalyInferer(DDPMScheduler(1000), median_kernel=3, **settings)
    else:
        inferer = AutoDDPMAnomalyInferer(DDIMScheduler(1000), ddim_mask_steps=2, ddim_resample_steps=1, median_kernel=3)
    volume = torch.zeros(1, 1, 16, 16, 5)
    volume[..., 3:13, 3:13, 1:4] = torch.rand(1, 1, 10, 10, 3) * 0.8 + 0.1
    net = tiny_unet()
    amap, recon = inferer(volume, net, return_reconstruction=True)
    assert amap.shape == recon.shape == volume.shape and torch.isfinite(amap).all() and amap.min() >= 0
    assert torch.equal(recon[..., [0, 4]], volume[..., [0, 4]]) and amap[..., [0, 4]].max() == 0  # no brain: not run
    assert torch.equal(inferer(volume, net), amap)  # seeded
    assert torch.allclose(inferer(volume, net.to(memory_format=torch.channels_last)), amap, atol=1e-4)  # CPU option
    stack = volume[0].permute(3, 0, 1, 2)
    assert inferer(stack, net).shape == stack.shape


def test_inferer_runs_the_stages_on_the_brain_box_only():
    shapes = []

    class Recorder(torch.nn.Module):
        def forward(self, x, timesteps):
            shapes.append(tuple(x.shape))
            return torch.randn(x.shape, generator=torch.Generator().manual_seed(len(shapes)))

    volume = torch.zeros(1, 1, 32, 32, 3)
    volume[..., 9:19, 6:12, :] = torch.rand(1, 1, 10, 6, 3) * 0.8 + 0.1
    inferer = AutoDDPMAnomalyInferer(
        DDIMScheduler(1000),
        ddim_mask_steps=2,
        ddim_resample_steps=1,
        median_kernel=1,
        erosion_iterations=1,
        mask_threshold=0.0,
        brain_box_multiple=4,
    )
    out = inferer(volume, Recorder(), mask=volume > 0, return_intermediates=True)
    assert set(shapes) == {(3, 1, 12, 8)} and len(shapes) == inferer.network_passes_per_slice
    outside = torch.ones_like(volume, dtype=torch.bool)
    outside[..., 8:20, 5:13, :] = False  # the 12 x 8 box around the brain
    assert out["stitch_mask"][outside].max() == 0 and out["likelihood"][outside].max() == 0
    for key in ("reconstruction", "stitched", "inpainted"):
        assert out[key].shape == volume.shape and torch.equal(out[key][outside], volume[outside])
    assert out["stitch_mask"][volume > 0].min() == 1 and out["pred"].max() > 0


def test_stage_plumbing_for_inference_outputs():
    batch = {"image": torch.rand(1, 1, 4, 4, 2), "mask": torch.ones(1, 1, 4, 4, 2)}
    assert "return_intermediates" not in StagesPrepareBatch(False)(batch)[3]
    assert StagesPrepareBatch(True)(batch)[3]["return_intermediates"] is True
    flat = FlattenStagesd("pred")({"image": 1, "pred": {"pred": 2, "stitched": 3}})
    assert flat == {"image": 1, "pred": 2, "stitched": 3}
    assert FlattenStagesd("pred")({"pred": 5}) == {"pred": 5}


# ---------------------------------------------------------------------------------------------------------------
# perceptual terms


def test_ssim_distance_map():
    x = torch.rand(2, 1, 20, 20)
    ssim = SSIMDistance()
    assert ssim(x, x).shape == x.shape and ssim(x, x).abs().max() < 1e-5
    y = x.clone()
    y[..., 8:12, 8:12] = 1 - y[..., 8:12, 8:12]
    d = ssim(x, y)
    assert d[..., 8:12, 8:12].mean() > 0.3 and d[..., :3, :3].max() < 1e-5 and d.max() <= 1
    assert build_perceptual("ssim", {"ssim": {"kernel_size": 7}}).kernel_size == 7


def test_lpips_without_package_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError, as on a machine without it
    with pytest.raises(ImportError, match="pip install lpips"):
        build_perceptual("lpips")
    with pytest.raises(ValueError, match="unknown perceptual"):
        build_perceptual("dists")


def test_lpips_without_weights_fails_clearly_and_never_downloads(monkeypatch, tmp_path):
    """With the package but no backbone weights in the torch.hub cache: a clear error naming the file."""
    package = tmp_path / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(b"")

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            assert kwargs["spatial"] and kwargs["net"] == "alex"

        def forward(self, a, b):
            assert a.shape[1] == 3 and a.min() >= -1
            return (a - b).abs().mean(1, keepdim=True)

    fake = types.ModuleType("lpips")
    fake.__file__ = str(package / "__init__.py")
    fake.LPIPS = FakeLPIPS
    weights = types.SimpleNamespace(IMAGENET1K_V1=types.SimpleNamespace(url="https://x/alexnet-owt-7be5be79.pth"))
    models = types.ModuleType("torchvision.models")
    models.AlexNet_Weights = weights
    monkeypatch.setitem(sys.modules, "lpips", fake)
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"will not be downloaded.*alexnet-owt-7be5be79\.pth"):
        LPIPSDistance("alex")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    distance = build_perceptual("lpips")
    x = torch.rand(2, 1, 8, 8)
    assert distance.name == "lpips-alex" and distance(x, x).shape == x.shape and distance(x, x).max() == 0
    inferer = AutoDDPMAnomalyInferer(DDPMScheduler(1000), perceptual=distance)
    assert inferer.perceptual_name == "lpips-alex"


# ---------------------------------------------------------------------------------------------------------------
# real bundle runs on tiny generated data


@pytest.fixture(scope="module")
def trained(demo_cohort, tmp_path_factory):
    """Train (one epoch, tiny UNet), then evaluate on the Tumour set with tiny DDIM chains: returns the folders."""
    work = tmp_path_factory.mktemp("autoddpm")
    common = {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(work / "models"), "contrast": "t2"}
    train = run_bundle(
        "autoddpm_bundle", ["configs/train.json", "configs/demo.json"], {**common, "output_dir": str(work / "train")}
    )
    evaluate = run_bundle(
        "autoddpm_bundle",
        command_configs("evaluate", "demo"),
        {**common, **TINY_SAMPLING, "output_dir": str(work / "eval"), "test_set": "Tumour"},
    )
    return {"work": work, "common": common, "train_log": train.stdout + train.stderr, "eval_log": evaluate.stdout}


def test_bundle_train_writes_checkpoints_and_logs(trained):
    models = trained["work"] / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert list(models.glob("checkpoint_checkpoint_epoch=1.pt"))
    state = torch.load(models / "model.pt", weights_only=True)
    assert any(k.startswith("down_blocks.") for k in state) and tiny_unet().state_dict().keys() == state.keys()
    assert "val_mse" in trained["train_log"] and "train_loss" in trained["train_log"]
    assert "model.pt holds the best validated weights" in trained["train_log"]  # the short-run fallback stood by
    assert list((trained["work"] / "train").glob("events.out.tfevents.*"))


def test_bundle_evaluate_writes_metrics_and_records_settings(trained):
    out = trained["work"] / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"val_labelled": 2, "val_healthy": 2, "test": 2, "test_with_lesion": 2}
    assert set(metrics["thresholds"]) == {"best_dice_val", "fpr_1", "fpr_5", "fpr_10"}
    assert 0 <= metrics["summary"]["auprc"]["mean"] <= 1
    assert metrics["extra"] == {
        "method": "AutoDDPM (mask, stitch, re-sample)",
        "sampler": "ddim",
        "perceptual": "1-ssim",
        "network_passes_per_slice": 4,
        "postprocessing": {
            "erosion_iterations": 3,
            "median_kernel": 5,
            "smooth_sigma": 0.0,
        },  # smoothing_sweep reads it
    }
    assert (metrics["min_component_size"], metrics["fprs"]) == (8, [0.01, 0.05, 0.1])
    assert (out / "per_volume.csv").read_text().count("\n") == 3 and list((out / "overlays").glob("*.png"))
    stored = json.loads((trained["work"] / "models" / "thresholds.json").read_text())
    assert stored["threshold"] == metrics["thresholds"]["best_dice_val"]
    assert re.search(r"auprc\s+\d", trained["eval_log"]) and "perceptual term 1-ssim" in trained["eval_log"]


def test_bundle_inference_writes_maps_and_stages_in_input_geometry(trained, demo_cohort, tmp_path):
    out = tmp_path / "maps"
    run_bundle(
        "autoddpm_bundle",
        ["configs/inference.json", "configs/demo.json"],
        {
            **trained["common"],
            **TINY_SAMPLING,
            "output_dir": str(out),
            "datalist": str(demo_cohort / "datalists" / "Tumour_t2.json"),
            "save_intermediates": True,
        },
    )
    tests = json.loads((demo_cohort / "datalists" / "Tumour_t2.json").read_text())["test"]
    assert len(tests) == 2
    for entry in tests:
        source = nib.load(demo_cohort / "datalists" / entry["image"])
        case = entry["image"].split("/")[-1].removesuffix(".nii.gz")
        for postfix, dtype in [
            ("anomaly_map", np.float32),
            ("anomaly_mask", np.uint8),
            ("stage1_reconstruction", np.float32),
            ("likelihood", np.float32),
            ("stitch_mask", np.uint8),
            ("stitched", np.float32),
            ("inpainted", np.float32),
        ]:
            img = nib.load(out / f"{case}_{postfix}.nii.gz")
            assert img.shape == source.shape and np.allclose(img.affine, source.affine, atol=1e-4), postfix
            assert img.get_data_dtype() == dtype and np.isfinite(img.get_fdata()).all(), postfix
        assert set(np.unique(nib.load(out / f"{case}_stitch_mask.nii.gz").get_fdata())) <= {0.0, 1.0}
    assert not list(out.glob(".*tmp*"))


def test_bundle_inference_on_one_file_without_mask(trained, demo_cohort, tmp_path):
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    out = tmp_path / "one"
    result = run_bundle(
        "autoddpm_bundle",
        ["configs/inference.json", "configs/demo.json"],
        {**trained["common"], **TINY_SAMPLING, "output_dir": str(out), "input_file": str(image)}
        | {"amp": "True", "channels_last": "True"},  # explicit bf16 autocast, channels-last weights
    )
    assert "no brain mask given" in result.stdout + result.stderr
    assert cpu_bf16_native() or "bf16 autocast runs 20-40x slower" in result.stdout + result.stderr
    written = nib.load(out / image.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
    assert written.shape == nib.load(image).shape and not list(out.glob("*_stitched.nii.gz"))
