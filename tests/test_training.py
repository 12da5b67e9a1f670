"""Checkpoint helpers: resuming picks the latest epoch, corrupt or mismatched weights fail naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import EMAHandler, ProgressBar
from monai.handlers import CheckpointSaver, LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, ValidationHandler
from uad.files import file_digest
from uad.io import check_model_config, mark_thresholds_stale, read_threshold, write_model_config, write_thresholds
from uad.training import (
    FinalModelFallback,
    latest_checkpoint,
    load_checkpoint,
    load_pretrained_encoder,
    load_weights,
    rank_handlers,
)


class Net(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, width)
        self.head = torch.nn.Linear(width, 1)


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


def test_corrupt_and_missing_checkpoints_name_the_file(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_weights(Net(), tmp_path / "nothing.pt")


def test_load_weights_strict_from_state_dict_or_training_checkpoint(tmp_path):
    src = Net()
    torch.save({"network": src.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    dst = load_weights(Net(), tmp_path / "ckpt.pt")
    assert torch.equal(dst.head.weight, src.head.weight)
    torch.save(Net(width=5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="wide.pt: weights do not match"):
        load_weights(Net(), tmp_path / "wide.pt")


def test_pretrained_encoder_loading_is_strict(tmp_path):
    pretrained = Net().encoder
    torch.save(pretrained.state_dict(), tmp_path / "encoder.pt")
    net = load_pretrained_encoder(Net(), tmp_path / "encoder.pt")
    assert torch.equal(net.encoder.weight, pretrained.weight)
    assert load_pretrained_encoder(net, "") is net
    torch.save(Net(width=6).encoder.state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"other.pt: pretrained encoder does not match.*file \(6, 3\) vs network \(4, 3\)"
    ):
        load_pretrained_encoder(Net(), tmp_path / "other.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained_encoder(Net(), tmp_path / "keys.pt")


def test_rank_handlers_keep_what_keeps_ranks_in_step(tmp_path):
    net = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    keep = [
        ValidationHandler(validator=None, interval=1),
        LrScheduleHandler(torch.optim.lr_scheduler.LinearLR(optimizer)),
        EMAHandler(net),
    ]
    report = [
        CheckpointSaver(str(tmp_path), {"network": net}),
        StatsHandler(),
        TensorBoardStatsHandler(log_dir=str(tmp_path)),
        ProgressBar(),
    ]
    handlers = [keep[0], *report, *keep[1:]]  # overlays append after the base handlers
    assert rank_handlers(handlers, 0) == handlers
    assert rank_handlers(handlers, 1) == keep


def test_final_model_fallback_saves_final_weights_only_without_a_validated_model(tmp_path, caplog):
    net = Net()
    engine, validator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    validator.state.best_metric_epoch = -1  # as MONAI's evaluators start
    torch.save({k: torch.ones_like(v) for k, v in net.state_dict().items()}, tmp_path / "stale.pt")
    (tmp_path / "models").mkdir()
    (tmp_path / "stale.pt").rename(tmp_path / "models" / "model.pt")  # e.g. the shipped weights: replaced
    FinalModelFallback(net, validator, tmp_path / "models").attach(engine)
    with caplog.at_level("INFO", logger="uad.training"):
        engine.run([0], max_epochs=1)
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True, map_location="cpu")
    assert saved.keys() == net.state_dict().keys() and all(
        torch.equal(saved[k], v) for k, v in net.state_dict().items()
    )
    assert "no validation ran" in caplog.text and not list((tmp_path / "models").glob(".*tmp*"))
    best = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}  # a validated model.pt is never replaced
    torch.save(best, tmp_path / "models" / "model.pt")
    validator.state.best_metric_epoch = 1
    engine.run([0], max_epochs=2)
    assert all(not v.any() for v in torch.load(tmp_path / "models" / "model.pt", weights_only=True).values())


def test_recorded_sizes_are_checked_never_adopted(tmp_path):
    folder = tmp_path / "models"
    sizes = {"pixdim": [3.0, 3.0, 3.0], "unet": {"channels": [8, 16, 16], "num_res_blocks": 1}}
    write_model_config(folder, sizes)
    recorded = json.loads((folder / "model_config.json").read_text())
    assert recorded == {"pixdim": [3.0, 3.0, 3.0], "unet#channels": [8, 16, 16], "unet#num_res_blocks": 1}
    assert not list(folder.glob(".*tmp*"))
    check_model_config(folder / "model.pt", sizes)  # the same sizes: nothing to say
    wider = {**sizes, "unet": {"channels": [16, 32, 32], "num_res_blocks": 1}}
    with pytest.raises(
        ValueError,
        match=r"model_config\.json\) than the config files set \(unet#channels: \[8, 16, 16\] "
        r"there, \[16, 32, 32\] here\)",
    ):
        check_model_config(folder / "model.pt", wider)
    with pytest.raises(ValueError, match=r"other/model\.pt: no model_config\.json beside the weights"):
        check_model_config(tmp_path / "other" / "model.pt", sizes)  # a second model folder without its sizes

    write_model_config(folder, wider)  # no weights yet: a new run records its own sizes
    torch.save({}, folder / "model.pt")
    with pytest.raises(
        ValueError,
        match=r"model\.pt was trained with other sizes .* \(unet#channels: \[16, 32, 32\] "
        r"there, \[8, 16, 16\] here\): train into an empty ckpt_dir",
    ):
        write_model_config(folder, sizes)  # training would overwrite weights of other sizes
    (folder / "model_config.json").unlink()
    with pytest.raises(ValueError, match="has no model_config.json beside it: a training run"):
        write_model_config(folder, sizes)
    (folder / "model_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_config\.json: not a JSON file"):
        check_model_config(folder / "model.pt", sizes)
    (folder / "model_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object of network sizes, got list"):
        check_model_config(folder / "model.pt", sizes)


def test_a_threshold_applies_only_to_the_weights_it_was_calibrated_on(tmp_path, caplog):
    weights = tmp_path / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save(Net().state_dict(), weights)
    path = tmp_path / "models" / "thresholds.json"
    write_thresholds(path, {"best_dice_val": 0.25, "fpr_5": 0.1}, "best_dice_val", weights)
    assert json.loads(path.read_text())["weights_sha256"] == file_digest(weights)
    assert read_threshold(path, weights) == 0.25 and read_threshold(path) == 0.25
    torch.save(Net(width=5).state_dict(), weights)  # other weights in the same file
    with caplog.at_level("WARNING", logger="uad.io"):
        assert read_threshold(path, weights) is None
    assert "calibrated on other weights" in caplog.text and "without a mask" in caplog.text
    write_thresholds(path, {"best_dice_val": 0.25}, "best_dice_val", weights)
    assert mark_thresholds_stale(tmp_path / "models") == path  # a training run starts in the folder
    caplog.clear()
    with caplog.at_level("WARNING", logger="uad.io"):
        assert read_threshold(path, weights) is None
    assert "a training run started in" in caplog.text
    assert mark_thresholds_stale(tmp_path / "empty") is None
