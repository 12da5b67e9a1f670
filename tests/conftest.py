"""Shared fixtures: a tiny demo cohort built once per test session, and helpers to run bundle commands."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lib.benchmarking import bundle_context
from lib.commands import bundle_command
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
SHARED_IXI = REPO.parent / "shared" / "data" / "ixi_t1_axial"

# The suite runs on 2 pytest-xdist workers (pyproject.toml): one thread each, so that the two never oversubscribe the
# cores (torch's OpenMP threads spin while they wait).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)


def subprocess_env() -> dict[str, str]:
    """The environment of the bundle commands the tests start: this worker's thread count, no warnings."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(THREADS)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CPU-sized overrides shared by the bundle tests: tiny grid, one epoch of a few slices (networks: per bundle).
TINY_GRID = {"pixdim": [6.0, 6.0, 6.0], "image_size": [32, 32, 16]}
TINY_CDDPM_NETS = {  # the cDDPM bundle's networks at the tests' size
    "latent_dim": 16,
    "encoder#block_inplanes": [8, 8, 8, 8],
    "unet#channels": [8, 16, 16],
    "unet#num_head_channels": 8,
    "unet#norm_num_groups": 8,
    "noise#frequency": 16,
}
TINY_RUN = {**TINY_GRID, "epochs": 1, "val_interval": 1, "batch_size": 4, "slices_per_volume": 2, "num_workers": 0}


def tiny_diffusion_unet(conditioned: bool = True, context_dim: int = 16):
    """The 2D diffusion UNet of the bundle tests' TINY overrides (channels 8/16/16, attention at the lowest level)."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16, 16),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
        with_conditioning=conditioned,
        cross_attention_dim=context_dim if conditioned else None,
    )


def bundle_parser(bundle: str, *names: str) -> ConfigParser:
    """The merged configs ``<bundle>/configs/<name>`` (in order), with ``bundle_root`` set to the bundle."""
    parser = ConfigParser()
    parser.read_config([str(REPO / bundle / "configs" / n) for n in names])
    parser["bundle_root"] = str(REPO / bundle)
    return parser


def brain_crop_slices(bundle: str, overrides: dict, demo_cohort: Path) -> tuple[list[dict], ConfigParser]:
    """Training slices of the first demo volume through ``<bundle>``'s ``brain_crop.json`` overlay (and the parser),
    checked to be the brain's bounding box grown to sides divisible by 4 (the 3 levels of the tiny UNets); the
    validation volumes are cropped to their brain box too."""
    parser = bundle_parser(bundle, "train.json", "demo.json", "brain_crop.json")
    parser.update({**overrides, "dataset_dir": str(demo_cohort)})
    slices = parser.get_parsed_content("train#preprocessing")(parser.get_parsed_content("train#datalist")[0])
    for s in slices:
        ys, xs = s["mask"][0].nonzero(as_tuple=True)
        h, w = s["image"].shape[1:]
        assert (h, w) != tuple(TINY_GRID["image_size"][:2]) and h % 4 == 0 and w % 4 == 0
        assert ys.max() - ys.min() + 1 > h - 4 and xs.max() - xs.min() + 1 > w - 4  # the box, up to divisibility
    volume = parser.get_parsed_content("validate#preprocessing")(parser.get_parsed_content("validate#datalist")[0])
    h, w = volume["image"].shape[1:3]
    assert (h, w) != tuple(TINY_GRID["image_size"][:2]) and h % 4 == 0 and w % 4 == 0
    return slices, parser


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """The ``tiny`` demo cohort (seed 0), in the seed layout with datalists."""
    from lib import demo_cohort

    out = tmp_path_factory.mktemp("demo") / "cohort"
    demo_cohort.build_cohort(out, seed=0, size="tiny", progress=False, figure=False)
    return out


def run_bundle(
    bundle: str, configs: list[str], overrides: dict, timeout: int = 600, nproc: int = 0
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` inside the bundle folder, with ``--key value`` overrides; fails loudly.

    The command's own function (``monai.bundle.scripts.run``, which the CLI calls through ``fire``) runs in this
    process, with the overrides parsed as ``fire`` parses them, so that no run pays for importing MONAI again; its
    printed output and log records (INFO and up, MONAI's logging format) are returned as ``stdout``. With ``nproc`` > 0
    the command runs under ``torchrun --nproc_per_node=nproc`` (gloo on CPU), in subprocesses.
    """
    if nproc:
        return _run_torchrun(bundle, configs, overrides, timeout, nproc)
    from fire.parser import DefaultParseValue
    from monai.bundle.scripts import run

    kwargs = {k: DefaultParseValue(v) if isinstance(v, str) else v for k, v in overrides.items()}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root, level, cwd = logging.getLogger(), logging.getLogger().level, os.getcwd()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.chdir(REPO / bundle)
    streams = {h: h.setStream(out) for h in _stream_handlers()}  # loggers with their own (MONAI's get_logger)
    try:
        with bundle_context(bundle.removesuffix("_bundle")), contextlib.redirect_stdout(out):
            with contextlib.redirect_stderr(out):
                run(config_file=configs, logging_file=False, **kwargs)
    except Exception as e:
        raise AssertionError(f"monai.bundle run {configs} {overrides} failed:\n{out.getvalue()[-6000:]}") from e
    finally:
        os.chdir(cwd)
        root.removeHandler(handler)
        root.setLevel(level)
        for h in _stream_handlers():  # back to where they wrote, or, made during the run, to this process's stdout
            h.setStream(streams.get(h, sys.stdout))
    return subprocess.CompletedProcess(["monai.bundle", "run", *configs], 0, stdout=out.getvalue(), stderr="")


def _stream_handlers() -> list[logging.StreamHandler]:
    """The plain stream handlers of every logger (not pytest's capture handlers)."""
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def _run_torchrun(bundle: str, configs: list[str], overrides: dict, timeout: int, nproc: int):
    python, *command = bundle_command(configs, overrides)
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [python, *launcher, *command]
    env = subprocess_env()
    result = subprocess.run(cmd, cwd=REPO / bundle, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture
def bundle_imports():
    """Make ``scripts`` resolve to a bundle's own package (as ``monai.bundle run`` does from the bundle folder) until
    the test ends: ``benchmarking.bundle_context`` of ``<name>_bundle``."""
    with contextlib.ExitStack() as stack:
        yield lambda bundle: stack.enter_context(bundle_context(bundle.removesuffix("_bundle")))
