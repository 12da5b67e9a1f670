"""TorchScript export: one bundle command traces the network with its real inputs and embeds the configs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, bundle_parser, run_bundle, tiny_diffusion_unet
from monai.data import load_net_with_metadata

CONDITIONED = {"cddpm_bundle": True, "autoddpm_bundle": False}


@pytest.mark.parametrize("bundle", list(CONDITIONED))
def test_export_writes_model_ts_that_reproduces_eager_outputs(bundle, bundle_imports, tmp_path):
    path = tmp_path / "models" / "model.ts"
    configs = ["configs/inference.json", "configs/demo.json", "configs/export.json"]
    result = run_bundle(bundle, configs, {"ckpt_path": "models/model.pt", "export_path": str(path)})
    assert "traced network reproduces the eager one" in result.stdout + result.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.ts"]  # nothing half-written beside it

    traced, meta, extra = load_net_with_metadata(str(path), more_extra_files=["inference.json"])
    bundle_meta = json.loads((REPO / bundle / "configs" / "metadata.json").read_text())
    assert (
        meta["version"] == bundle_meta["version"] and meta["network_data_format"] == bundle_meta["network_data_format"]
    )
    embedded, inference = (
        json.loads(extra["inference.json"]),
        json.loads((REPO / bundle / "configs" / "inference.json").read_text()),
    )
    assert embedded.keys() == inference.keys()
    assert all(embedded[k] == inference[k] for k in inference if k != "threshold")  # the shipped sizes already
    shipped = json.loads((REPO / bundle / "models" / "thresholds.json").read_text())
    assert embedded["threshold"] == shipped["threshold"]  # a value: Deploy has no file beside the weights

    bundle_imports(bundle)
    parser = bundle_parser(bundle, "inference.json", "demo.json")
    parser.update({"ckpt_path": str(REPO / bundle / "models" / "model.pt"), "device": "$torch.device('cpu')"})
    parser.update({"cpu_backend": "torch", "amp": False})  # compare fp32 with fp32 (the trace is fp32)
    eager = parser.get_parsed_content("network")
    torch.manual_seed(3)
    x, t = torch.rand(5, 1, 64, 64) * 2 - 1, torch.tensor([3, 50, 200, 640, 999])  # new batch size and timesteps
    inputs = (x, t, (x + 1) / 2) if CONDITIONED[bundle] else (x, t)
    with torch.inference_mode():
        torch.testing.assert_close(traced(*inputs), eager(*inputs), atol=1e-4, rtol=0)
        # the bundle's inferer runs the exported network as it runs the eager one (its keyword call included)
        inferer = parser.get_parsed_content("inferer")
        volume = torch.zeros(1, 1, 64, 64, 6)
        volume[:, :, 12:52, 10:54] = torch.rand(1, 1, 40, 44, 6) * 0.8 + 0.1
        torch.testing.assert_close(inferer(volume, traced), inferer(volume, eager), atol=1e-4, rtol=0)


def test_export_embeds_the_sizes_and_threshold_it_ran_with(tmp_path):
    """An export with overlays (here the tests' tiny sizes) embeds their values in ``inference.json``: MONAI Deploy
    reads that config alone."""
    from uad.export import export_torchscript

    bundle = REPO / "autoddpm_bundle"
    sizes = {"pixdim": [6.0, 6.0, 6.0], "network_def": {"channels": [8, 16, 16], "num_head_channels": 8}}
    path = export_torchscript(
        tiny_diffusion_unet(conditioned=False),
        tmp_path / "model.ts",
        bundle / "configs" / "metadata.json",
        bundle / "configs" / "inference.json",
        (32, 32),
        sizes=sizes,
        threshold=0.25,
    )
    _, _, extra = load_net_with_metadata(str(path), more_extra_files=["inference.json"])
    embedded = json.loads(extra["inference.json"])
    assert embedded["pixdim"] == [6.0, 6.0, 6.0] and embedded["threshold"] == 0.25
    assert embedded["network_def"]["channels"] == [8, 16, 16] and embedded["network_def"]["num_head_channels"] == 8
    assert embedded["network_def"]["norm_num_groups"] == 16  # what the overlays leave stays as written
