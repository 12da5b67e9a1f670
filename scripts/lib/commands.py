"""The bundle commands as users type them: which config files each command merges, and the ``python -m monai.bundle
run`` command line with ``--key value`` overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

__all__ = ["COMMAND_CONFIGS", "REPO", "bundle_command", "bundle_run", "command_configs"]

REPO = Path(__file__).resolve().parents[2]

# The config files of each bundle command, in merge order: evaluate.json is an overlay on inference.json and
# pretrain_encoder.json one on train.json (the model zoo's way); further overlays (demo.json, ema.json...) follow.
COMMAND_CONFIGS = {
    "train": ("train",),
    "inference": ("inference",),
    "evaluate": ("inference", "evaluate"),
    "pretrain_encoder": ("train", "pretrain_encoder"),
}


def command_configs(command: str, *overlays: str) -> list[str]:
    """``configs/<name>.json`` paths of a bundle command followed by the named overlays."""
    return [f"configs/{name}.json" for name in (*COMMAND_CONFIGS[command], *overlays)]


def bundle_command(configs: list[str], overrides: dict) -> list[str]:
    """The ``python -m monai.bundle run`` command line with ``--key value`` overrides, values as the CLI parses them."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        text = value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)
        cmd += [f"--{key}", text]
    return cmd


def bundle_run(bundle: str, configs: list[str], **overrides) -> None:
    """``python -m monai.bundle run`` in the bundle folder with ``--key value`` overrides (exits on failure)."""
    cmd = bundle_command(configs, overrides)
    print(f"\n$ (cd {bundle} && python {' '.join(cmd[1:])})", flush=True)
    subprocess.run(cmd, cwd=REPO / bundle, check=True)
