"""A bundle folder stands alone: copied anywhere, or packaged and unzipped, it carries the shared code and runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import nibabel as nib
import pytest
import sync_shared
from conftest import REPO
from package_bundle import package


def test_package_dereferences_shared_code_and_leaves_weights_out(tmp_path):
    archive = package(REPO / "cddpm_bundle", tmp_path)  # also unzips and instantiates every config's network
    names = zipfile.ZipFile(archive).namelist()
    assert "cddpm_bundle/scripts/uad/metrics.py" in names and "cddpm_bundle/configs/metadata.json" in names
    assert "cddpm_bundle/LICENSE" in names and "cddpm_bundle/docs/README.md" in names
    assert not any(n.endswith(".pt") or "__pycache__" in n for n in names)
    shared = (REPO / "scripts" / "uad" / "data.py").read_bytes()
    assert zipfile.ZipFile(archive).read("cddpm_bundle/scripts/uad/data.py") == shared


def test_package_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        package(tmp_path, tmp_path / "out")


def test_every_bundle_carries_an_exact_copy_of_the_shared_code():
    assert sync_shared.drift() == [], "run python scripts/sync_shared.py"


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
def test_bundle_folder_copied_elsewhere_runs_inference(bundle, demo_cohort, tmp_path):
    """``cp -r <bundle> /elsewhere`` (symlinks kept as links), then ``inference.json`` as it stands from the copy alone
    (AutoDDPM with a short DDIM sampler: 4 network passes per slice)."""
    copy = tmp_path / "elsewhere" / bundle
    shutil.copytree(REPO / bundle, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    image = next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--input_file", str(image), "--output_dir", str(tmp_path / "out")]
    if bundle == "autoddpm_bundle":
        cmd += ["--sampler", "ddim", "--ddim_mask_steps", "2", "--ddim_resample_steps", "1", "--resample_repeats", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = nib.load(tmp_path / "out" / image.name.replace(".nii.gz", "_anomaly_map.nii.gz"))
    assert written.shape == nib.load(image).shape and written.get_fdata().max() > 0
    assert (tmp_path / "out" / image.name.replace(".nii.gz", "_anomaly_mask.nii.gz")).is_file()  # shipped threshold
