"""MONAI Label's contract with a bundle, on a copy of each bundle placed as a MONAI Label app keeps it
(``<app>/model/<name>``): MONAI Label 0.8.5's own ``BundleInferTask`` and ``BundleTrainTask`` (installed from
``requirements-label.txt``; skipped without it), and, for the lean install (``requirements.txt``, no MONAI Label), a
stand-in that drives the bundle as those tasks do.

The stand-in follows their source (``monailabel/tasks/infer/bundle.py``, ``tasks/infer/basic_infer.py``,
``transform/pre.py`` ``LoadImageTensord``, ``transform/post.py`` ``Restored``, ``tasks/train/bundle.py``): the
config read alone, ``bundle_root`` and ``device`` (a plain string) set on the parser, ``network_def`` built and
``models/model.pt`` loaded with ``strict=False``, every ``LoadImaged`` wrapped so that each of its keys must be in the
request, transforms run one by one, ``inferer(image[None], network)``, ``SaveImaged`` dropped and ``Restored``
appended; training through ``monai.bundle.run`` with the task's overrides and a ``CheckpointLoader`` of the current
``model.pt`` inserted first among the handlers.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigItem, ConfigParser
from monai.bundle import run as bundle_run
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, Resize, SaveImaged
from uad.io import write_thresholds

BUNDLES = ["cddpm_bundle", "autoddpm_bundle"]


@pytest.fixture
def app_bundle(tmp_path, monkeypatch):
    """A copy of a bundle in a MONAI Label app's model folder, importable as the tasks make it (``scripts``)."""

    def place(bundle: str) -> Path:
        path = tmp_path / "app" / "model" / bundle
        shutil.copytree(REPO / bundle, path, symlinks=True)
        if bundle == "autoddpm_bundle":  # a shorter DDIM sampler, set in the app's copy as a user would (4 passes)
            config = path / "configs" / "inference.json"
            fast = {"ddim_mask_steps": 2, "ddim_resample_steps": 1, "resample_repeats": 2}
            config.write_text(json.dumps({**json.loads(config.read_text()), **fast}, indent=4))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            monkeypatch.delitem(sys.modules, name)  # unload_module("scripts")
        monkeypatch.syspath_prepend(str(path))
        return path

    return place


def load_bundle_config(path: Path, name: str) -> ConfigParser:
    """``_load_bundle_config``: the one config file, ``bundle_root`` set to the bundle folder."""
    parser = ConfigParser()
    parser.read_config(str(path / "configs" / name))
    parser.config.update({"bundle_root": str(path)})
    return parser


def update_device(parser: ConfigParser, device: str) -> None:
    """``_update_device``: the device as MONAI Label names it (``name_to_device``: "cpu", "cuda", "cuda:N")."""
    parser.config.update({"device": device})
    if parser.ref_resolver.items.get("device"):
        parser.ref_resolver.items["device"] = ConfigItem(config=device, id="device")


class LoadImageTensord:
    """MONAI Label's wrapper of each ``LoadImaged``: every key must be in the request (no ``allow_missing_keys``)."""

    def __init__(self, load: LoadImaged) -> None:
        self.keys, self.load = load.keys, load

    def __call__(self, data: dict) -> dict:
        if all(isinstance(data[key], str) for key in self.keys):  # KeyError for a key the request does not carry
            return self.load(data)
        raise AssertionError("MONAI Label passes image paths")


def restored(data: dict, key: str = "pred", ref_image: str = "image") -> dict:
    """``Restored(keys=pred, ref_image=image)``, appended to the bundle's post-transforms."""
    d = dict(data)
    meta = d[ref_image].meta if isinstance(d[ref_image], MetaTensor) else d.get(f"{ref_image}_meta_dict", {})
    result = d[key]
    current = result.shape[1:]
    spatial = list(meta.get("spatial_shape", current))[-len(current) :]
    if np.any(np.not_equal(current, spatial)):
        result = Resize(spatial_size=spatial, mode="nearest")(result)
    d[key] = result if len(result.shape) <= 3 else result[0] if result.shape[0] == 1 else result
    d[f"{key}_meta_dict"] = {"affine": meta.get("original_affine")}
    return d


def monai_label_infer(path: Path, image: str, device: str = "cpu") -> tuple[dict, dict]:
    """One infer request as ``BundleInferTask`` serves it; returns the final data and the task's labels."""
    parser = load_bundle_config(path, "inference.json")
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    key_image = next(iter(meta["network_data_format"]["inputs"]))
    key_pred = next(iter(meta["network_data_format"]["outputs"]))
    assert (key_image, key_pred) == ("image", "pred")  # run_inferer reads data["image"], writes data["pred"]
    channel_def = meta["network_data_format"]["outputs"][key_pred].get("channel_def", {})
    labels = {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
    model_path = path / "models" / "model.pt"
    assert model_path.is_file()  # else the task would look for model.ts, else ignore the bundle
    network = parser.get_parsed_content("network_def", instantiate=True)  # built once, before any device override

    data = {"image": image, "image_path": image, "model": path.name, "device": device, "model_filename": ["model.pt"]}
    update_device(parser, device)
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False
    pre = [LoadImageTensord(t) if isinstance(t, LoadImaged) else t for t in pre]
    for t in pre:  # run_transforms(use_compose=False)
        data = t(data)

    update_device(parser, device)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    net = copy.deepcopy(network).to(torch.device(device))
    checkpoint = torch.load(model_path, map_location=torch.device(device))
    net.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
    net.eval()
    inputs = data["image"]
    inputs = (inputs if torch.is_tensor(inputs) else torch.from_numpy(inputs))[None].to(torch.device(device))
    with torch.no_grad():
        outputs = inferer(inputs, net)
    data["pred"] = outputs[0]

    update_device(parser, device)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    post = [t for t in (list(post.transforms) if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)]
    for t in post:
        data = t(data)
    return restored(data, key_pred, key_image), labels


def write_result(data: dict, out: Path) -> nib.Nifti1Image:
    """What MONAI Label's writer saves: ``pred`` with the affine ``Restored`` put in ``pred_meta_dict``."""
    pred = data["pred"]
    array = np.asarray(pred.array if isinstance(pred, MetaTensor) else pred)
    affine = data["pred_meta_dict"]["affine"]
    nib.save(nib.Nifti1Image(array, np.asarray(affine)), out)
    return nib.load(out)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_infer_task_returns_the_anomaly_label_volume_in_the_input_geometry(bundle, app_bundle, demo_cohort, tmp_path):
    path = app_bundle(bundle)
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    source = nib.load(image)

    (path / "models" / "thresholds.json").unlink(missing_ok=True)
    data, labels = monai_label_infer(path, str(image))
    assert labels == {"anomaly": 1}
    amap = write_result(data, tmp_path / "map.nii.gz")  # no threshold: pred is the anomaly map
    assert amap.shape == source.shape and np.allclose(amap.affine, source.affine, atol=1e-4)
    assert amap.get_fdata().max() > 0 and np.isfinite(amap.get_fdata()).all()
    assert isinstance(data["image_path"], str) and data["image_path"] == str(image)  # the writer's extension

    threshold = float(np.quantile(amap.get_fdata()[amap.get_fdata() > 0], 0.9))
    write_thresholds(path / "models" / "thresholds.json", {"test": threshold}, "test", path / "models" / "model.pt")
    data, _ = monai_label_infer(path, str(image))
    label = write_result(data, tmp_path / "label.nii.gz")
    values = np.unique(label.get_fdata())
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    assert set(values) == {0.0, 1.0}, values  # the labels of channel_def: 0 background, 1 anomaly


def test_infer_task_uses_a_brain_mask_the_request_carries(app_bundle, demo_cohort):
    path = app_bundle("cddpm_bundle")
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    mask = Path(str(image).replace("/t2/", "/mask/").replace("_t2.", "_mask."))
    half = nib.load(mask)
    array = np.asarray(half.dataobj).copy()
    array[: array.shape[0] // 2] = 0  # one hemisphere: nothing outside it can be anomalous
    nib.save(nib.Nifti1Image(array, half.affine), path / "half_mask.nii.gz")
    parser = load_bundle_config(path, "inference.json")
    pre = parser.get_parsed_content("preprocessing")
    with_mask = pre({"image": str(image), "mask": str(path / "half_mask.nii.gz")})
    without = pre({"image": str(image)})
    assert with_mask["mask"].sum() < 0.75 * without["mask"].sum()  # the request's mask, not a derived one


def test_train_task_leaves_a_model_pt_that_the_infer_task_loads(app_bundle, demo_cohort, tmp_path):
    path = app_bundle("cddpm_bundle")
    cases = sorted((demo_cohort / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:4]
    datalist = [{"image": str(c), "label": str(c).replace("/t2/", "/mask/").replace("_t2.", "_mask.")} for c in cases]
    shipped = torch.load(path / "models" / "model.pt", weights_only=True)
    parser = load_bundle_config(path, "train.json")
    train_handlers = parser.get("train#handlers", [])
    assert isinstance(train_handlers, list) and all(isinstance(h, dict) for h in train_handlers)
    train_handlers.insert(
        0,
        {
            "_target_": "CheckpointLoader",
            "load_path": str(path / "models" / "model.pt"),
            "load_dict": {"model": "$@network"},
            "strict": False,
        },
    )
    overrides = {
        "bundle_root": str(path),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": datalist[:3],
        "device": "cpu",
        "train#handlers": train_handlers,
        "validate#dataset#data": datalist[3:],
        "num_workers": 0,  # not a MONAI Label override: keeps the test's process count down
    }
    bundle_run(
        run_id="run",
        init_id=None,
        final_id=None,
        meta_file=str(path / "configs" / "metadata.json"),
        config_file=str(path / "configs" / "train.json"),
        **overrides,
    )
    trained = torch.load(path / "models" / "model.pt", weights_only=True)
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)  # trained on from model.pt
    assert json.loads((path / "models" / "thresholds.json").read_text())["stale"]  # calibrated on the old weights
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    data, _ = monai_label_infer(path, str(image))
    assert tuple(data["pred"].shape) == nib.load(image).shape
    assert len(np.unique(np.asarray(data["pred"]))) > 2  # the anomaly map: no mask at a threshold of other weights


@pytest.fixture
def monailabel_tasks(monkeypatch) -> SimpleNamespace:
    """MONAI Label 0.8.5's bundle tasks, or a skip when it is not installed.

    ``monailabel.transform.post`` imports ``torchvision.utils`` (``make_grid``, ``save_image``, which the bundle tasks
    never call); where torchvision does not import (absent, or PyPI's CUDA build beside the CPU torch) an empty
    stand-in is put in its place for this test.
    """
    pytest.importorskip(
        "monailabel", reason="MONAI Label 0.8.5 not installed (pip install --no-deps -r requirements-label.txt)"
    )
    try:
        import torchvision.utils  # noqa: F401
    except Exception:
        utils = ModuleType("torchvision.utils")
        utils.make_grid = utils.save_image = None
        torchvision = ModuleType("torchvision")
        torchvision.utils = utils
        monkeypatch.setitem(sys.modules, "torchvision", torchvision)
        monkeypatch.setitem(sys.modules, "torchvision.utils", utils)
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask

    class CpuTrainTask(BundleTrainTask):
        """The train task with the DataLoader workers of the tests (``_update_overrides``, MONAI Label's hook)."""

        def _update_overrides(self, overrides: dict) -> dict:
            overrides["num_workers"] = 0
            return overrides

    return SimpleNamespace(infer=BundleInferTask, train=CpuTrainTask)


class Datastore:
    """What ``BundleTrainTask`` reads of MONAI Label's datastore: ``datalist()``, the labelled images."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def datalist(self) -> list[dict]:
        return self.items


def real_infer(tasks: SimpleNamespace, path: Path, image: Path) -> tuple[nib.Nifti1Image, dict]:
    """One request to MONAI Label's ``BundleInferTask`` on the app's bundle: the label file it writes, and its json."""
    task = tasks.infer(str(path), {})
    assert task.is_valid()
    label_file, result = task({"image": str(image), "device": "cpu"})
    return nib.load(label_file), result


@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_label_infer_task_returns_the_label_volume_in_the_input_geometry(
    bundle, app_bundle, monailabel_tasks, demo_cohort
):
    path = app_bundle(bundle)
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    source = nib.load(image)
    label, result = real_infer(monailabel_tasks, path, image)  # the shipped model.pt and thresholds.json
    assert result["label_names"] == {"anomaly": 1}
    assert label.shape == source.shape and np.allclose(label.affine, source.affine, atol=1e-4)
    assert set(np.unique(label.get_fdata())) == {0.0, 1.0}  # the labels of channel_def: 0 background, 1 anomaly


def test_monai_label_train_task_fine_tunes_model_pt_and_the_infer_task_loads_it(
    app_bundle, monailabel_tasks, demo_cohort
):
    path = app_bundle("cddpm_bundle")
    cases = sorted((demo_cohort / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:4]
    datalist = [{"image": str(c), "label": str(c).replace("/t2/", "/mask/").replace("_t2.", "_mask.")} for c in cases]
    shipped = torch.load(path / "models" / "model.pt", weights_only=True)
    task = monailabel_tasks.train(str(path), {})
    assert task.is_valid()
    request = {"model": path.name, "max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False}
    task(request, Datastore(datalist))  # 3 volumes to train on, 1 to validate, from the shipped model.pt
    trained = torch.load(path / "models" / "model.pt", weights_only=True)
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped)  # trained on from model.pt
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    assert json.loads((path / "models" / "thresholds.json").read_text())["stale"]  # calibrated on the old weights
    label, _ = real_infer(monailabel_tasks, path, image)
    assert label.shape == nib.load(image).shape and np.isfinite(label.get_fdata()).all()
    assert len(np.unique(label.get_fdata())) > 2  # the anomaly map: no mask at a threshold of other weights
