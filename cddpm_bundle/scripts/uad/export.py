"""TorchScript export of a bundle network: traced with its real inputs, checked against eager, saved with the configs.

MONAI's ``ckpt_export`` scripts the network or traces it with one input, and ``verify_net_in_out`` calls ``net(x)``;
both fail for the diffusion networks here, which take the timestep (and, for cDDPM, the clean image) as well. So the
network is traced with ``(x, timesteps[, condition])``, the trace is checked on a new batch size and new timesteps,
and ``models/model.ts`` is written with ``metadata.json`` and ``inference.json`` embedded (``extra/``), as MONAI Deploy
reads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata
from torch import nn

from .backends import example_inputs, tracing
from .files import atomic_output, remove_stale_temporaries
from .io import config_ids

__all__ = ["export_torchscript", "trace_network"]

logger = logging.getLogger(__name__)


def trace_network(
    network: nn.Module, example_size: Sequence[int], condition: bool = False, atol: float = 1e-4
) -> torch.jit.ScriptModule:
    """Trace ``network(x, timesteps[, condition])`` on the CPU in fp32 and check the trace at a new batch size and
    new timesteps.

    Args:
        network: the trained network.
        example_size: (H, W) of the slices it runs on.
        condition: whether it takes the clean image as a third input (cDDPM).
        atol: largest accepted difference from the eager output.

    Raises:
        RuntimeError: the trace does not reproduce the eager network.
    """
    network = network.cpu().float().eval()
    with tracing():
        traced = torch.jit.trace(network, example_inputs(2, example_size, condition, seed=0), check_trace=False)
        check = example_inputs(3, example_size, condition, seed=1)
        diff = float((traced(*check) - network(*check)).abs().max())
    if not diff <= atol:
        raise RuntimeError(f"the traced network differs from the eager one by {diff:.3g} (> {atol}) on new inputs")
    logger.info("traced network reproduces the eager one on a new batch size and timesteps (max abs diff %.2g)", diff)
    return traced


def export_torchscript(
    network: nn.Module,
    path: str | os.PathLike,
    meta_file: str | os.PathLike,
    config_file: str | os.PathLike,
    example_size: Sequence[int],
    condition: bool = False,
    sizes: Mapping | None = None,
    threshold: float | None = None,
) -> Path:
    """Trace ``network`` (see ``trace_network``) and write it to ``path`` (e.g. ``models/model.ts``) atomically, with
    ``metadata.json`` (the bundle's metadata plus versions) and ``inference.json`` embedded; returns the path.

    The embedded ``inference.json`` holds the values this export ran with where overlays or files beside the weights
    set them: the network ``sizes`` and input grid (nested as in the config) and the calibrated ``threshold``. MONAI
    Deploy runs the embedded config alone.

    The file is written under its final name in a temporary folder beside it (``atomic_output(keep_name=True)``),
    then moved: TorchScript archives name their root folder after the file, and MONAI Deploy finds the embedded
    configs by that name.
    """
    path = Path(path)
    traced = trace_network(network, example_size, condition)
    meta = json.loads(Path(meta_file).read_text())
    config = ConfigParser(json.loads(Path(config_file).read_text()))
    for config_id, value in {**config_ids(sizes or {}), "threshold": threshold}.items():
        config[config_id] = value
    remove_stale_temporaries(path.parent)
    with atomic_output(path, keep_name=True) as staged:
        save_net_with_metadata(
            traced,
            str(staged),
            meta_values=meta,
            more_extra_files={"inference.json": json.dumps(config.config, indent=4).encode()},
        )
    logger.info("TorchScript network with metadata.json and inference.json written to %s", path)
    return path
