"""The model zoo's checks of a bundle (``ci/verify_bundle.py -m min`` of Project-MONAI/model-zoo), run offline.

``monai.bundle verify_metadata`` validates ``metadata.json`` against a JSON schema; the zoo downloads its schema, this
test writes the schema's required fields locally (the file is then used as it is, nothing is downloaded). The
directory, version and format checks are ported from the zoo's CI and its pre-commit JSON hook.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO
from monai.bundle import ConfigParser, verify_metadata

BUNDLES = ["cddpm_bundle", "autoddpm_bundle"]
IO_FIELDS = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"]
SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": [
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "changelog": {"type": "object", "minProperties": 1},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                part: {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {"type": "object", "required": IO_FIELDS},
                }
                for part in ("inputs", "outputs")
            },
        },
    },
}


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.filterwarnings("ignore:No hash value provided")  # the local schema is not downloaded, so has no hash
def test_metadata_passes_verify_metadata_against_the_schema(bundle, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    verify_metadata(meta_file=str(REPO / bundle / "configs" / "metadata.json"), filepath=str(schema))
    broken = json.loads((REPO / bundle / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["outputs"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError):  # the check can fail
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_layout_and_version_as_the_zoo_checks_them(bundle):
    root = REPO / bundle
    for necessary in ("configs/metadata.json", "LICENSE", "configs/inference.json", "docs/README.md"):
        assert (root / necessary).is_file(), necessary
    assert (root / "docs" / "data_license.txt").is_file()
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and next(iter(meta["changelog"])) == meta["version"]
    large = yaml.safe_load((root / "large_files.yml").read_text())
    assert all({"path", "url"} <= set(entry) for entry in large["large_files"])
    assert all(p.stat().st_size < 25 * 2**20 for p in root.rglob("*") if p.is_file())
    assert (root / "models" / "model.pt").is_file()  # "necessary file models/model.pt" of verify_bundle -m min


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_data_format_says_what_the_network_takes_and_pred_is(bundle):
    meta = json.loads((REPO / bundle / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == [64, 64] and image["is_patch_data"]  # 2D slices (of the shipped demo model)
    assert "timesteps" in meta["description"] and ("condition" in meta["description"]) == (bundle == "cddpm_bundle")
    assert pred["channel_def"] == {"0": "background", "1": "anomaly"} and pred["dtype"] == "uint8"
    assert list(meta["network_data_format"]["inputs"]) == ["image"] and list(
        meta["network_data_format"]["outputs"]
    ) == ["pred"]  # MONAI Label reads data["image"] / data["pred"]; MONAI Deploy makes a port of every entry


@pytest.mark.parametrize("bundle", BUNDLES)
def test_one_required_packages_list_with_every_package(bundle):
    meta = ConfigParser()
    meta.read_meta(str(REPO / bundle / "configs" / "metadata.json"))
    required = meta.get("_meta_")["required_packages_version"]  # as monai parses it
    packages = (
        "einops",
        "nibabel",
        "pytorch-ignite",
        "scipy",
        "matplotlib",
        "tqdm",
        "mlflow",
        "onnxruntime",
        "highdicom",
    )
    for package in packages:
        assert package in required, package
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    assert all(pins[name] == version for name, version in required.items() if name in pins)


@pytest.mark.parametrize("path", sorted(REPO.glob("*_bundle/configs/*.json")), ids=lambda p: p.name)
def test_configs_are_json_in_4_space_indent(path):
    """The zoo's pre-commit ``pretty-format-json --indent=4 --no-sort-keys``."""
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path}: reformat with 4-space indent"
