"""The trained demo weights shipped in each bundle load into its demo-sized inference network and run."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
def test_shipped_demo_weights_load_strictly_and_infer(bundle, bundle_imports, monkeypatch):
    bundle_imports(bundle)
    monkeypatch.chdir(REPO / bundle)
    parser = ConfigParser()
    parser.read_config(["configs/inference.json", "configs/demo.json"])
    parser.update({"ckpt_path": "models/model.pt", "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")  # strict load_weights: any key or shape mismatch fails
    assert not network.training
    inferer = parser.get_parsed_content("inferer")
    image = torch.zeros(1, 1, 64, 64, 2)
    image[..., 16:48, 16:48, :] = 0.5
    anomaly = inferer(image, network, mask=(image > 0).float())
    assert anomaly.shape == image.shape and torch.isfinite(anomaly).all()


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
def test_shipped_demo_weights_are_a_plain_cpu_state_dict(bundle, bundle_imports, monkeypatch):
    """Loadable on a machine without CUDA by tools that pass no ``map_location`` (ignite's ``Checkpoint.load_objects``,
    as ``monai.bundle ckpt_export`` uses it)."""
    from ignite.handlers import Checkpoint

    state = torch.load(REPO / bundle / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    bundle_imports(bundle)
    monkeypatch.chdir(REPO / bundle)
    parser = ConfigParser()
    parser.read_config(["configs/inference.json", "configs/demo.json"])
    network = parser.get_parsed_content("network_def")
    Checkpoint.load_objects({"model": network}, torch.load(REPO / bundle / "models" / "model.pt"))
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
