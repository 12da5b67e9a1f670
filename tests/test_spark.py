"""SparK encoder pretraining: masks, sparse encoding, masked loss, weight transfer to cDDPM, real bundle runs."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY_RUN, bundle_parser, run_bundle, tiny_diffusion_unet
from lib.commands import command_configs
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet
from uad.training import load_pretrained_encoder

from cddpm_bundle.scripts.networks import ConditionedDiffusionModel
from cddpm_bundle.scripts.spark import (
    MaskedMSELoss,
    SparKModel,
    SparKPrepareBatch,
    normalise_patches,
    patch_grid,
    pixel_mask,
    random_patch_mask,
    save_spark_figure,
)

BUNDLE = REPO / "cddpm_bundle"
CONFIGS = BUNDLE / "configs"

# the tiny encoder of the cDDPM bundle tests, on the tiny grid: 32 px images give a 2x2 grid of 16 px patches
TINY = {
    **TINY_RUN,
    "latent_dim": 16,
    "encoder#block_inplanes": [8, 8, 8, 8],
    "unet#channels": [8, 16, 16],  # pretraining builds the cDDPM network once, to check the written encoder fits
    "unet#num_head_channels": 8,
    "unet#norm_num_groups": 8,
}
TINY_CDDPM = {**TINY, "noise#frequency": 16}


def tiny_encoder(width: int = 8) -> ResNet:
    return ResNet("basic", [1, 1, 1, 1], [width] * 4, spatial_dims=2, n_input_channels=1, num_classes=16)


def bundle_tiny_encoder() -> ResNet:
    """The encoder the bundle configs build with the TINY overrides (the shipped model's layout, width 8)."""
    return tiny_encoder()


def tiny_cddpm() -> ConditionedDiffusionModel:
    unet = tiny_diffusion_unet()
    return ConditionedDiffusionModel(unet, tiny_encoder())


def tiny_spark() -> SparKModel:
    return SparKModel(tiny_encoder(), decoder_channels=(8, 8, 8, 8))


def parser(*names: str) -> ConfigParser:
    return bundle_parser("cddpm_bundle", *names)


# ---------------------------------------------------------------------------------------------------------------
# masks


def test_mask_ratio_and_grid_are_as_configured():
    mask = random_patch_mask(50, (3, 3), 0.65, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (50, 1, 3, 3) and mask.dtype == torch.bool
    assert (mask.sum(dim=(1, 2, 3)) == 6).all()  # round(0.65 * 9) = 6 of 9 patches, in every sample
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 10  # random per sample
    assert (mask.float().mean(0) > 0.4).all()  # every patch gets masked sometimes
    assert (random_patch_mask(8, (4, 4), 0.65).sum(dim=(1, 2, 3)) == 10).all()  # round(10.4)
    for ratio in (0.01, 0.99):
        with pytest.raises(ValueError, match="at least one patch"):
            random_patch_mask(1, (2, 2), ratio)
    assert patch_grid((96, 96), 32) == (3, 3) and patch_grid((1, 1, 64, 32), 16) == (4, 2)
    with pytest.raises(ValueError, match="not a multiple of the mask patch size"):
        patch_grid((64, 64), 24)
    spread = pixel_mask(mask[:2], (96, 96))
    assert spread.shape == (2, 1, 96, 96)
    assert torch.equal(spread[:, :, ::32, ::32], mask[:2]) and torch.equal(spread[:, :, 31::32, 31::32], mask[:2])


def test_prepare_batch_draws_seeded_masks_and_stacks_volumes():
    prepare = SparKPrepareBatch(patch_size=32, mask_ratio=0.65, seed=7)
    images = torch.rand(4, 1, 96, 96)
    inputs, target, args, kwargs = prepare({"image": images})
    assert torch.equal(inputs, images) and torch.equal(target, images) and args == ()
    assert kwargs["patch_mask"].shape == (4, 1, 3, 3) and (kwargs["patch_mask"].sum((1, 2, 3)) == 6).all()
    prepare.reset()  # validation: the same masks every epoch
    assert torch.equal(prepare({"image": images})[3]["patch_mask"], kwargs["patch_mask"])
    assert not torch.equal(prepare({"image": images})[3]["patch_mask"], kwargs["patch_mask"])
    volume = torch.zeros(1, 1, 32, 32, 5)
    volume[..., 1:4] = 0.5
    stacked, _, _, kw = SparKPrepareBatch(patch_size=16)({"image": volume, "mask": volume > 0})
    assert stacked.shape == (3, 1, 32, 32) and kw["patch_mask"].shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="mask_ratio"):
        SparKPrepareBatch(mask_ratio=1.0)


# ---------------------------------------------------------------------------------------------------------------
# loss and sparse encoding


@pytest.mark.parametrize("normalise", [False, True])
def test_loss_counts_masked_patches_only(normalise):
    torch.manual_seed(0)
    loss = MaskedMSELoss(normalise_targets=normalise)
    target = torch.rand(3, 1, 32, 32)
    mask = random_patch_mask(3, (2, 2), 0.5)
    masked = pixel_mask(mask, (32, 32))
    reconstruction = torch.rand(3, 1, 32, 32)
    value = loss((reconstruction, mask), target)
    changed_visible = torch.where(masked, reconstruction, torch.rand_like(reconstruction) * 100)
    assert torch.equal(loss((changed_visible, mask), target), value)
    changed_masked = torch.where(masked, reconstruction + 1, reconstruction)
    assert loss((changed_masked, mask), target) > value + 0.5
    goal = normalise_patches(target, (2, 2)) if normalise else target
    assert float(loss((goal, mask), target)) == pytest.approx(0.0, abs=1e-10)
    expected = ((reconstruction - goal) ** 2)[masked].mean()
    assert torch.allclose(value, expected)


@pytest.mark.parametrize("train_mode", [False, True])
def test_masked_patch_content_does_not_reach_visible_features(train_mode):
    """Two inputs that differ only inside masked patches give identical encoder features and reconstructions."""
    torch.manual_seed(0)
    model = tiny_spark().train(train_mode)
    a = torch.rand(4, 1, 64, 64)
    mask = random_patch_mask(4, (4, 4), 0.65)  # 16 px patches, each stage resolution splits evenly
    masked = pixel_mask(mask, a.shape[-2:])
    b = torch.where(masked, torch.rand_like(a) * 5 - 2, a)
    assert not torch.equal(a, b)
    with torch.no_grad():
        features_a, features_b = model.encode(a, mask), model.encode(b, mask)
        assert [f.shape[-1] for f in features_a] == [32, 16, 8, 4]
        for fa, fb in zip(features_a, features_b, strict=True):
            visible = ~pixel_mask(mask, fa.shape[-2:])
            assert torch.equal(fa * visible, fb * visible)
            assert torch.count_nonzero(fa * ~visible) == 0  # sparse: masked positions are zero after each stage
            assert torch.count_nonzero(fa * visible) > 0
        assert torch.equal(model(a, mask)[0], model(b, mask)[0])
        # the visible content does reach the features
        c = torch.where(masked, a, torch.rand_like(a))
        assert not torch.equal(model.encode(c, mask)[3], features_a[3])


def test_mask_tokens_fill_masked_positions_before_decoding():
    model = tiny_spark()
    assert [t.shape for t in model.mask_tokens] == [(1, 8, 1, 1)] * 4
    mask = random_patch_mask(2, (2, 2), 0.5)
    reconstruction, returned = model(torch.rand(2, 1, 32, 32), mask)
    assert reconstruction.shape == (2, 1, 32, 32) and returned is mask
    MaskedMSELoss()((reconstruction, mask), torch.rand(2, 1, 32, 32)).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in model.mask_tokens)
    assert model.encoder.fc.weight.grad is None  # the classification head is kept, not trained


def test_unaligned_patches_and_foreign_encoders_are_rejected():
    model = tiny_spark()
    with pytest.raises(ValueError, match="does not split into the"):
        model(torch.rand(1, 1, 48, 48), random_patch_mask(1, (2, 2), 0.5))  # 24 px patches vs stride 16
    with pytest.raises(TypeError, match="2D monai.networks.nets.ResNet"):
        SparKModel(torch.nn.Conv2d(1, 1, 3))
    with pytest.raises(TypeError, match="2D"):
        SparKModel(ResNet("basic", [1, 1, 1, 1], [8] * 4, spatial_dims=3, n_input_channels=1))


# ---------------------------------------------------------------------------------------------------------------
# weight transfer to cDDPM


def test_pretrained_encoder_loads_into_cddpm(tmp_path):
    spark = tiny_spark()
    optimizer = torch.optim.AdamW(spark.parameters(), lr=1e-2)
    images = torch.rand(4, 1, 32, 32)
    for _ in range(2):
        optimizer.zero_grad()
        MaskedMSELoss()(spark(images, random_patch_mask(4, (2, 2), 0.65)), images).backward()
        optimizer.step()
    cddpm = tiny_cddpm()
    assert list(spark.encoder.state_dict()) == list(cddpm.encoder.state_dict())  # fc included
    path = tmp_path / "encoder.pt"
    torch.save(spark.encoder.state_dict(), path)
    before = {k: v.clone() for k, v in cddpm.encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in cddpm.unet.state_dict().items()}
    load_pretrained_encoder(cddpm, path)
    after = cddpm.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in spark.encoder.state_dict().items())
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert all(torch.equal(cddpm.unet.state_dict()[k], v) for k, v in unet_before.items())


def test_mismatched_encoder_file_fails_loudly(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(SparKModel(tiny_encoder(width=16), (8, 8, 8, 8)).encoder.state_dict(), path)
    shapes = (
        r"wide\.pt: pretrained encoder does not match the configured encoder: .*[\w.]+: file \([\d, ]+\) vs network"
    )
    with pytest.raises(ValueError, match=shapes):  # names (up to 5 of) the mismatched tensors with both shapes
        load_pretrained_encoder(tiny_cddpm(), path)
    full = tmp_path / "spark_model.pt"  # the whole SparK model (decoder keys) is not an encoder file
    torch.save(tiny_spark().state_dict(), full)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        load_pretrained_encoder(tiny_cddpm(), full)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_hyperparameters_and_demo_overrides(demo_cohort, bundle_imports):
    bundle_imports("cddpm_bundle")
    paper = parser("train.json", "pretrain_encoder.json", "paper.json")
    assert paper["optimizer"]["_target_"] == "torch.optim.AdamW" and paper["learning_rate"] == 1e-4
    assert paper["weight_decay"] == 0.05 and paper["betas"] == [0.9, 0.95] and paper["batch_size"] == 32
    assert paper["mask_ratio"] == 0.65 and paper.get_parsed_content("patch_size") == 32  # 3x3 grid at 96 px
    assert paper.get_parsed_content("decoder_channels") == [512, 256, 128, 64]
    demo = parser("train.json", "pretrain_encoder.json", "demo.json")
    demo["dataset_dir"] = str(demo_cohort)
    assert demo.get_parsed_content("patch_size") == 16  # 4x4 grid at the demo's 64 px
    net = demo.get_parsed_content("network_def")
    assert type(net).__name__ == "SparKModel" and net.stage_channels == (16, 32, 64, 64)
    cddpm = parser("train.json", "demo.json").get_parsed_content("network_def")
    assert list(net.encoder.state_dict()) == list(cddpm.encoder.state_dict())
    assert all(v.shape == cddpm.encoder.state_dict()[k].shape for k, v in net.encoder.state_dict().items())
    assert len(demo.get_parsed_content("train#datalist")) == 4 and len(demo.get_parsed_content("validate#datalist"))


# ---------------------------------------------------------------------------------------------------------------
# real bundle runs


def test_figure_shows_masked_input_reconstruction_and_target(tmp_path):
    images = torch.rand(3, 1, 32, 32)
    save_spark_figure(tmp_path / "f.png", images, images * 0.5, random_patch_mask(3, (2, 2), 0.65), title="t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bundle_pretrain_then_cddpm_uses_the_encoder(demo_cohort, tmp_path):
    models = tmp_path / "models"
    common = {**TINY, "dataset_dir": str(demo_cohort), "ckpt_dir": str(models)}
    result = run_bundle(
        "cddpm_bundle", command_configs("pretrain_encoder"), {**common, "output_dir": str(tmp_path / "pretrain")}
    )
    log = result.stdout + result.stderr
    assert "val_masked_mse" in log and "train_loss" in log
    assert f"from the pretrained weights in {models / 'encoder_final.pt'}" in log  # finalize: fits cDDPM
    assert (tmp_path / "pretrain" / "spark_reconstructions.png").stat().st_size > 0
    assert list((tmp_path / "pretrain").glob("events.out.tfevents.*"))
    # resumable checkpoints live apart from cDDPM's, so train.json never resumes from a SparK checkpoint
    assert (models / "pretrain_encoder" / "checkpoint_checkpoint_epoch=1.pt").is_file()
    assert not list(models.glob("checkpoint_*"))
    encoder = torch.load(models / "encoder.pt", weights_only=True)
    assert list(encoder) == list(bundle_tiny_encoder().state_dict())
    assert set(torch.load(models / "encoder_final.pt", weights_only=True)) == set(encoder)

    train = run_bundle(
        "cddpm_bundle",
        ["configs/train.json"],
        {
            **TINY_CDDPM,
            "dataset_dir": str(demo_cohort),
            "ckpt_dir": str(tmp_path / "cddpm"),
            "output_dir": str(tmp_path / "train"),
            "pretrained_encoder": str(models / "encoder.pt"),
        },
    )
    assert f"from the pretrained weights in {models / 'encoder.pt'}" in train.stdout + train.stderr
    trained = torch.load(tmp_path / "cddpm" / "model_final.pt", weights_only=True)
    # one epoch of Adam at lr 1e-4 moves the weights by far less than the distance between two random inits
    moved = (trained["encoder.conv1.weight"] - encoder["conv1.weight"]).abs().max()
    fresh = (bundle_tiny_encoder().state_dict()["conv1.weight"] - encoder["conv1.weight"]).abs().max()
    assert moved < 0.01 < fresh
