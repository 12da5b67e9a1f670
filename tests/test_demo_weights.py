"""The trained demo weights shipped in each bundle load into the network ``inference.json`` builds as it stands (the
sizes its config files state, which ``models/model_config.json`` records) and run; weights of the other bundle or of
another size are refused, and so are overlays that set other sizes and weights without their recorded sizes."""

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
    parser.read_config("configs/inference.json")  # no overlay: the configs' own sizes are the shipped model's
    parser.update({"device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")  # strict load_weights: any key or shape mismatch fails
    demo = ConfigParser()
    demo.read_config(["configs/train.json", "configs/demo.json"])
    assert parser.get_parsed_content("image_size") == demo.get_parsed_content("image_size") == [64, 64, 32]
    assert not network.training
    inferer = parser.get_parsed_content("inferer")
    image = torch.zeros(1, 1, 64, 64, 1)
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


@pytest.mark.parametrize(
    "bundle, configs, ckpt, message",
    [
        (
            "cddpm_bundle",
            [],
            "autoddpm_bundle",
            "the file holds a bare diffusion UNet .AutoDDPM., the config builds a cDDPM",
        ),
        (
            "autoddpm_bundle",
            [],
            "cddpm_bundle",
            "the file holds a cDDPM network .keys unet.., encoder..., the config builds a bare",
        ),
        (
            "cddpm_bundle",
            ["configs/ablation_ddpm.json"],
            "cddpm_bundle",
            "the file's network has a conditioning encoder",
        ),
        (
            "cddpm_bundle",
            ["configs/paper.json"],
            "cddpm_bundle",
            "the file holds a network of another size; .*vs network",
        ),
    ],
)
def test_weights_of_the_other_bundle_or_another_size_are_refused(bundle, configs, ckpt, message, bundle_imports):
    from uad.training import load_weights

    bundle_imports(bundle)
    parser = ConfigParser()
    parser.read_config([str(REPO / bundle / "configs" / "inference.json")] + [str(REPO / bundle / c) for c in configs])
    parser.update({"bundle_root": str(REPO / bundle), "ckpt_path": str(REPO / bundle / "models" / "model.pt")})
    network = parser.get_parsed_content("network_def")
    weights = REPO / ckpt / "models" / "model.pt"
    with pytest.raises(ValueError, match=rf"model\.pt: weights do not match the configured network: {message}"):
        load_weights(network, weights)


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
def test_sizes_the_weights_do_not_have_are_refused_naming_both_files(bundle, bundle_imports, tmp_path):
    bundle_imports(bundle)
    parser = ConfigParser()
    parser.read_config([str(REPO / bundle / "configs" / n) for n in ("inference.json", "paper.json")])
    parser.update({"bundle_root": str(REPO / bundle), "device": "$torch.device('cpu')"})
    with pytest.raises(RuntimeError) as failure:  # the published sizes over the shipped demo-sized weights
        parser.get_parsed_content("network")
    message = str(failure.value.__cause__)
    assert message.startswith(f"{REPO / bundle / 'models' / 'model.pt'} was trained with other sizes (")
    assert f"{REPO / bundle / 'models' / 'model_config.json'}) than the config files set (" in message
    assert "image_size: [64, 64, 32] there, [96, 96, 50] here" in message and "configs/paper.json" in message

    second = tmp_path / "ixi_t1"  # a second model folder, its sizes not recorded beside the weights
    second.mkdir()
    (second / "model.pt").write_bytes((REPO / bundle / "models" / "model.pt").read_bytes())
    parser = ConfigParser()
    parser.read_config(str(REPO / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(REPO / bundle), "device": "$torch.device('cpu')", "ckpt_dir": str(second)})
    with pytest.raises(RuntimeError) as failure:
        parser.get_parsed_content("network")
    assert str(failure.value.__cause__).startswith(
        f"{second / 'model.pt'}: no model_config.json beside the weights ({second / 'model_config.json'})"
    )


def test_a_truncated_checkpoint_is_named(tmp_path):
    from uad.training import load_weights

    truncated = tmp_path / "model.pt"
    truncated.write_bytes((REPO / "cddpm_bundle" / "models" / "model.pt").read_bytes()[:100_000])
    with pytest.raises(ValueError, match="model.pt: not a readable PyTorch checkpoint"):
        load_weights(torch.nn.Linear(1, 1), truncated)
