"""Training helpers of both bundles: resuming from the latest checkpoint, strict loading of pretrained weights."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import pad_list_data_collate
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler, StatsHandler, TensorBoardStatsHandler
from torch import nn

from .errors import InputError, MissingInputError, NonFiniteLossError
from .files import atomic_output
from .io import MODEL_CONFIG_FILE, check_model_config

__all__ = [
    "BestMetricState",
    "EpochSeeded",
    "FinalModelFallback",
    "FiniteLoss",
    "SameDrawsEveryEpoch",
    "attach_resume",
    "latest_checkpoint",
    "load_checkpoint",
    "load_pretrained_encoder",
    "load_weights",
    "pad_slices_collate",
    "state_mismatch",
    "rank_handlers",
    "timestep_bounds",
]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


class EpochSeeded:
    """Mixin for seeded batch preparation: draws come from ``seeded_generator(device)``, a generator seeded with
    ``seed`` until ``reset``; with ``seed`` None the generator is None (the global RNG, fresh draws).

    ``SameDrawsEveryEpoch`` resets it at every epoch start of an engine, so that every validation round sees the same
    random draws and validation losses are comparable across epochs.
    """

    seed: int | None = None
    generator: torch.Generator | None = None

    def reset(self) -> None:
        self.generator = None

    def seeded_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


class SameDrawsEveryEpoch:
    """Handler resetting a seeded batch preparation (``EpochSeeded``) at every epoch start of the engine it is
    attached to, e.g. the validator's ``prepare_batch``: every validation round then draws the same noise, timesteps or
    masks."""

    def __init__(self, prepare_batch: EpochSeeded) -> None:
        self.prepare_batch = prepare_batch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.prepare_batch.reset())


def timestep_bounds(timestep_range: Sequence[int] | None, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the timesteps a training batch draws: ``timestep_range`` checked against the schedule, or the
    whole schedule when it is None."""
    low, high = timestep_range if timestep_range is not None else (0, num_train_timesteps)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"timestep_range must lie in [0, {num_train_timesteps}], got {(low, high)}")
    return int(low), int(high)


def pad_slices_collate(batch: list, background: float = 0.0) -> dict:
    """Collate slices of different sizes (e.g. cropped to the brain): pad each to the largest of the batch.

    Items may be lists of slices (``num_samples`` of a random crop per volume); they are flattened first. Every key
    is padded with ``background``, the value of the images outside the brain (0: the data are in [0, 1], the
    networks map them to their own range), so a padded mask reads "not brain" too.
    """
    slices = [s for item in batch for s in (item if isinstance(item, list) else [item])]
    return pad_list_data_collate(slices, value=background)


class FiniteLoss(nn.Module):
    """A training loss that stops training on a NaN or infinite value, before the optimizer steps with it.

    The weights stay those of the last good step, and nothing non-finite reaches a checkpoint; the message names the
    latest resumable checkpoint.

    Args:
        loss: the loss module, called as ``loss(*args)``.
        ckpt_dir: the folder of the resumable checkpoints (``attach_resume``), for the message.
    """

    def __init__(self, loss: nn.Module, ckpt_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.ckpt_dir = ckpt_dir

    def forward(self, *args, **kwargs) -> torch.Tensor:
        value = self.loss(*args, **kwargs)
        if not torch.isfinite(value.detach()).all():
            latest = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
            resume = f"run again to resume from {latest}" if latest else "no epoch had completed (no checkpoint)"
            raise NonFiniteLossError(
                f"training stopped: the loss is {value.detach().float().mean().item()} (not finite), before the "
                f"optimizer step; {resume}, with a lower learning_rate or amp false if it happens again"
            )
        return value


class FinalModelFallback:
    """Leave a ``model.pt`` after every training run: when no validation has picked a best model (e.g. a run shorter
    than ``val_interval``), the final weights are saved as ``<ckpt_dir>/<filename>``, with a log line saying so.

    A ``model.pt`` already in the folder (e.g. the shipped weights, or an earlier run's) is replaced unless the
    validator has a best epoch, restored with the rest when training resumes.

    Args:
        network: the trained network (its ``state_dict`` is saved, on the CPU).
        evaluator: the validation workflow whose key-metric ``CheckpointSaver`` writes the best model.
        ckpt_dir: where that saver writes it.
        filename: that model's file name.
    """

    def __init__(
        self, network: nn.Module, evaluator: Engine, ckpt_dir: str | os.PathLike, filename: str = "model.pt"
    ) -> None:
        self.network = network
        self.evaluator = evaluator
        self.path = Path(ckpt_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        best_epoch = getattr(self.evaluator.state, "best_metric_epoch", -1)
        if best_epoch > 0 and self.path.is_file():
            logger.info("%s holds the best validated weights (epoch %d)", self.path, best_epoch)
            return
        network = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel
        state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        with atomic_output(self.path) as tmp:
            torch.save(state, tmp)
        logger.info(
            "no validated best model (no validation ran, e.g. val_interval > epochs): %s holds the final weights",
            self.path,
        )


REPORTING_HANDLERS = (
    CheckpointSaver,
    FinalModelFallback,
    StatsHandler,
    TensorBoardStatsHandler,
    MLFlowHandler,
    ProgressBar,
)


def rank_handlers(handlers: list, rank: int) -> list:
    """The engine handlers one distributed rank runs: all on rank 0; on the others all but those that save, log or
    show progress (``REPORTING_HANDLERS``), so validation, learning-rate schedules and EMA keep every rank in step."""
    return list(handlers) if rank == 0 else [h for h in handlers if not isinstance(h, REPORTING_HANDLERS)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The resumable checkpoint (``*checkpoint_epoch=N.pt``) with the highest epoch in ``ckpt_dir``, or None."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH.search(p.name))]
    return str(max(found)[1]) if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"{path}: not a readable PyTorch checkpoint (corrupt or incomplete file?): {e}") from e


def state_mismatch(own: dict, state: dict, guess_network: bool = True) -> str:
    """What differs between a network's ``state_dict`` (``own``) and a loaded one: missing, unexpected and
    differently shaped keys (a few of each) and, with ``guess_network``, which bundle's network the file holds. Empty
    when they match."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))

    def few(keys: list[str]) -> str:
        return f"{keys[:3]}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"

    details = [
        f"missing keys {few(missing)}" if missing else "",
        f"unexpected keys {few(unexpected)}" if unexpected else "",
        ", ".join(f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}" for k in mismatched[:3]),
    ]
    if not guess_network:
        return "; ".join(filter(None, details))
    kinds = {True: "a cDDPM network (keys unet.*, encoder.*)", False: "a bare diffusion UNet (AutoDDPM)"}
    file_cddpm, own_cddpm = (any(k.startswith(("unet.", "encoder.")) for k in keys) for keys in (state, own))
    if not set(own) & set(state) and file_cddpm != own_cddpm:
        details.insert(0, f"the file holds {kinds[file_cddpm]}, the config builds {kinds[own_cddpm]}")
    elif (file_encoder := any(k.startswith("encoder.") for k in state)) != any(k.startswith("encoder.") for k in own):
        with_encoder, without = ("the file's", "the config's") if file_encoder else ("the config's", "the file's")
        details.insert(0, f"{with_encoder} network has a conditioning encoder, {without} has none")
    elif mismatched:
        details.insert(0, "the file holds a network of another size")
    return "; ".join(filter(None, details))


def load_weights(
    network: nn.Module, path: str | os.PathLike, sizes: Mapping | None = None, key: str = "network"
) -> nn.Module:
    """Load trained weights into ``network`` (strict), from a bare ``state_dict`` or a training checkpoint.

    Args:
        network: the network the config files build.
        path: the weights.
        sizes: the network sizes and input grid the config files set (nested as in the config); when given, they must
            be those recorded beside the weights (:func:`~uad.io.check_model_config`).
        key: the entry of a training checkpoint that holds the network.

    Raises:
        InputError: naming the file and what differs (another bundle's network, another size, other keys).
    """
    if sizes is not None:
        check_model_config(path, sizes)
    state = load_checkpoint(path)
    for name in (key, "model"):  # a training checkpoint, or {"model": ...} as MONAI Label's loader names it
        if isinstance(state.get(name), dict):
            state = state[name]
            break
    problem = state_mismatch(network.state_dict(), state)
    if problem:
        raise InputError(
            f"{path}: weights do not match the configured network: {problem}. Use the weights with the config "
            f"overlay they were trained with ({Path(path).parent / MODEL_CONFIG_FILE} records their sizes)."
        )
    network.load_state_dict(state, strict=True)
    return network


def load_pretrained_encoder(network: nn.Module, path: str | os.PathLike | None, key: str = "encoder") -> nn.Module:
    """Initialise ``network.<key>`` from a pretrained encoder checkpoint; strict: any key or shape mismatch fails.

    The file holds the encoder's ``state_dict`` either directly or under ``"encoder"``. An empty ``path`` leaves the
    network as it is.
    """
    if not path:
        return network
    module = getattr(network, key, None)
    if module is None:
        raise InputError(f"{path}: the network has no {key!r} to load a pretrained encoder into")
    state = load_checkpoint(path)
    state = state.get(key, state) if isinstance(state, dict) else state
    problem = state_mismatch(module.state_dict(), state, guess_network=False)
    if problem:
        raise InputError(f"{path}: pretrained encoder does not match the configured encoder: {problem}")
    module.load_state_dict(state, strict=True)
    logger.info("initialised the %s from the pretrained weights in %s", key, path)
    return network


class BestMetricState:
    """The best validation so far, as resumable state: the evaluator's best key metric and epoch, and what its
    key-metric ``CheckpointSaver`` has saved. Put it in ``attach_resume``'s state so that a resumed run replaces the
    best model (e.g. ``model.pt``) only when it improves on the one saved before the interruption.

    Args:
        evaluator: the validation workflow (``SupervisedEvaluator``) with a key metric.
        saver: the ``CheckpointSaver`` attached to it with ``save_key_metric=True``.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver) -> None:
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("BestMetricState needs a CheckpointSaver with save_key_metric=True")
        self.evaluator = evaluator
        self.checkpoint = saver._key_metric_checkpoint  # the ignite Checkpoint that keeps the best model

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "key_metric_checkpoint": dict(self.checkpoint.state_dict()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.checkpoint.load_state_dict(state["key_metric_checkpoint"])


def attach_resume(trainer: Engine, ckpt_dir: str | os.PathLike, state: dict, map_location=None) -> str | None:
    """Make training resumable: save ``state`` every epoch and, if a checkpoint exists, continue from it.

    Args:
        trainer: the Ignite trainer.
        ckpt_dir: folder of the resumable checkpoints (``checkpoint_checkpoint_epoch=N.pt``, the latest one kept).
        state: objects to save and restore, e.g. ``{"network": ..., "optimizer": ..., "trainer": trainer}``.
        map_location: device to load the checkpoint onto.

    Returns:
        the checkpoint training resumes from, or None for a fresh start.
    """
    CheckpointSaver(
        save_dir=str(ckpt_dir), save_dict=state, file_prefix="checkpoint", save_interval=1, n_saved=1, epoch_level=True
    ).attach(trainer)
    path = latest_checkpoint(ckpt_dir)
    if path is not None:
        load_checkpoint(path)  # fail early, naming the file, on a corrupt checkpoint
        CheckpointLoader(load_path=path, load_dict=state, map_location=map_location).attach(trainer)
        logger.info("resuming training from %s", path)
    return path
