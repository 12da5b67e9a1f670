"""A packaged bundle carries the shared code and works when unzipped alone."""

from __future__ import annotations

import zipfile

import pytest
from conftest import REPO
from package_bundle import package


def test_package_dereferences_shared_code_and_leaves_weights_out(tmp_path):
    archive = package(REPO / "cddpm_bundle", tmp_path)  # also unzips and instantiates every config's network
    names = zipfile.ZipFile(archive).namelist()
    assert "cddpm_bundle/scripts/uad/evaluation.py" in names and "cddpm_bundle/configs/metadata.json" in names
    assert "cddpm_bundle/LICENSE" in names and "cddpm_bundle/docs/README.md" in names
    assert not any(n.endswith(".pt") or "__pycache__" in n for n in names)
    shared = (REPO / "scripts" / "uad" / "data.py").read_bytes()
    assert zipfile.ZipFile(archive).read("cddpm_bundle/scripts/uad/data.py") == shared


def test_package_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        package(tmp_path, tmp_path / "out")
