"""The configs as users merge them, checked on what they build rather than on their text.

``train.json`` and ``inference.json`` stand alone (MONAI Label and Deploy read each alone), so each bundle writes its
network, noise schedule and preprocessing twice: they must build the same network, the same schedule and the same
tensors from a case. The overlays (``evaluate.json`` on ``inference.json``, ``pretrain_encoder.json`` on
``train.json``) must keep the pipeline they extend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import bundle_parser
from lib.commands import command_configs
from monai.transforms import Compose
from uad.files import settings_digest

BUNDLES = ("cddpm_bundle", "autoddpm_bundle")


def merged(bundle: str, command: str, *overlays: str):
    return bundle_parser(bundle, *(c.removeprefix("configs/") for c in command_configs(command, *overlays)))


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("overlays", [(), ("paper",)], ids=["shipped-sizes", "paper-sizes"])
def test_train_and_inference_build_one_model_and_one_protocol(bundle, overlays, demo_cohort, bundle_imports):
    bundle_imports(bundle)
    train, inference = merged(bundle, "train", *overlays), merged(bundle, "inference", *overlays)
    for p in (train, inference):
        p["dataset_dir"] = str(demo_cohort)
    assert train.get_parsed_content("model_sizes") == inference.get_parsed_content("model_sizes")
    shapes = [
        {k: v.shape for k, v in p.get_parsed_content("network_def").state_dict().items()} for p in (train, inference)
    ]
    assert shapes[0] == shapes[1]
    schedules = [p.get_parsed_content("scheduler") for p in (train, inference)]
    assert torch.equal(schedules[0].alphas_cumprod, schedules[1].alphas_cumprod)
    assert schedules[0].prediction_type == schedules[1].prediction_type
    if bundle == "cddpm_bundle":  # the test-time noise is the training noise
        noises = [p.get_parsed_content("noise") for p in (train, inference)]
        assert type(noises[0]) is type(noises[1]) and vars(noises[0]) == vars(noises[1])
    case = train.get_parsed_content("train#datalist")[0]
    trained_on = Compose(train.get_parsed_content("preprocessing"))(dict(case))
    inferred_on = inference.get_parsed_content("preprocessing")(dict(case))
    for key in ("image", "mask"):
        assert torch.equal(torch.as_tensor(trained_on[key]), torch.as_tensor(inferred_on[key])), key


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_extends_the_inference_pipeline(bundle, demo_cohort, bundle_imports):
    bundle_imports(bundle)
    inference, evaluate = merged(bundle, "inference", "demo"), merged(bundle, "evaluate", "demo")
    evaluate.update({"dataset_dir": str(demo_cohort), "test_set": "Tumour"})
    inferers = [p.get_parsed_content("inferer") for p in (inference, evaluate)]
    assert type(inferers[0]) is type(inferers[1]) and settings_digest(inferers[0]) == settings_digest(inferers[1])
    _, test = evaluate.get_parsed_content("entries")["Tumour"]
    case = evaluate.get_parsed_content("preprocessing")(dict(test[0]))
    assert case["seg"].shape == case["image"].shape == case["mask"].shape  # the labels on the inference grid
    plain = inference.get_parsed_content("preprocessing")({k: test[0][k] for k in ("image", "mask")})
    assert torch.equal(torch.as_tensor(plain["image"]), torch.as_tensor(case["image"]))
