"""The IXI-trained T1 models (``configs/ixi_t1.json`` over ``configs/inference.json``): PNG slices read on the MNI152
field of view, the same grid as the benchmark's NIfTI copies, and the shipped weights mapping real slices."""

from __future__ import annotations

import json

import make_atlas_benchmark as mab
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, SHARED_IXI, bundle_parser, run_bundle
from lib.slices import save_slice
from monai.transforms import LoadImage
from PIL import Image
from uad.data import FieldOfViewPNGReader

SHARED_ATLAS = SHARED_IXI.parent / "atlas_t1_axial"
needs_shared = pytest.mark.skipif(
    not (SHARED_IXI.is_dir() and SHARED_ATLAS.is_dir()),
    reason="shared IXI and ATLAS slices not present (../shared/data/ixi_t1_axial, ../shared/data/atlas_t1_axial)",
)
BUNDLES = ("cddpm_bundle", "autoddpm_bundle")


def lesion_slice() -> str:
    """The first ATLAS test slice with a lesion."""
    names = (SHARED_ATLAS / "splits" / "test.txt").read_text().split()
    return next(n for n in names if np.asarray(Image.open(SHARED_ATLAS / "lesions" / n)).any())


def test_png_slices_read_on_their_field_of_view(tmp_path):
    rows = np.arange(64 * 32, dtype=np.uint8).reshape(64, 32)
    Image.fromarray(rows).save(tmp_path / "slice.png")
    img = LoadImage(image_only=True, reader=FieldOfViewPNGReader([233, 197]))(tmp_path / "slice.png")
    assert tuple(img.shape) == (64, 32)  # rows, columns, as stored (MONAI's PILReader swaps them)
    np.testing.assert_array_equal(img.numpy(), rows)
    np.testing.assert_allclose(np.diag(img.affine.numpy()), [233 / 64, 197 / 32, 1.0])
    save_slice(rows.astype(np.float32), tmp_path / "slice.nii.gz")  # other formats: MONAI's default readers
    volume = LoadImage(image_only=True, reader=FieldOfViewPNGReader([233, 197]))(tmp_path / "slice.nii.gz")
    assert tuple(volume.shape) == (64, 32, 1)
    np.testing.assert_allclose(np.diag(volume.affine.numpy()), 1.0)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ixi_t1_smooths_the_map_as_its_threshold_was_calibrated(bundle, bundle_imports):
    """``ixi_t1.json`` smooths the anomaly map (sigma 4 px, chosen on ATLAS val, the setting its ``thresholds.json``
    was calibrated with); ``inference.json`` alone does not (the papers' post-processing)."""
    bundle_imports(bundle)
    assert bundle_parser(bundle, "inference.json", "ixi_t1.json").get_parsed_content("inferer").smooth_sigma == 4.0
    assert bundle_parser(bundle, "inference.json").get_parsed_content("inferer").smooth_sigma == 0.0
    calibration = json.loads((REPO / bundle / "models" / "ixi_t1" / "thresholds.json").read_text())["calibration"]
    assert "sigma 4 px" in calibration


@needs_shared
@pytest.mark.parametrize("bundle", BUNDLES)
def test_atlas_png_lands_on_the_benchmark_grid(bundle, tmp_path, bundle_imports):
    """An ATLAS PNG read through ``ixi_t1.json`` and its copy on the IXI 1 mm grid (the benchmark's NIfTI) give the
    same network input, where a transposed reading would not."""
    bundle_imports(bundle)
    name = lesion_slice()
    nifti = {
        "image": save_slice(mab._resized(SHARED_ATLAS / "images" / name, nearest=False), tmp_path / "t1.nii.gz"),
        "mask": save_slice(mab._resized(SHARED_ATLAS / "brain" / name, nearest=True), tmp_path / "mask.nii.gz"),
    }
    png = {"image": str(SHARED_ATLAS / "images" / name), "mask": str(SHARED_ATLAS / "brain" / name)}
    preprocessing = bundle_parser(bundle, "inference.json", "ixi_t1.json").get_parsed_content("preprocessing")
    a, b = preprocessing(png), preprocessing(nifti)
    assert a["image"].shape == b["image"].shape == (1, 96, 96, 1)
    inside = ((a["mask"] > 0) & (b["mask"] > 0)).flatten()
    x, y = a["image"].flatten()[inside].numpy(), b["image"].flatten()[inside].numpy()
    assert np.corrcoef(x, y)[0, 1] > 0.98
    assert np.corrcoef(a["image"][0, ..., 0].T.flatten()[inside].numpy(), y)[0, 1] < 0.9


@needs_shared
@pytest.mark.parametrize("bundle", BUNDLES)
def test_ixi_t1_model_maps_real_slices(bundle, tmp_path):
    """The shipped IXI T1 model on an ATLAS slice with its brain mask (128 x 128 PNGs) and on a healthy IXI val slice
    (233 x 197, no mask: the head is derived): maps and masks in each PNG's own pixel grid, non-zero inside the brain
    only."""
    name = lesion_slice()
    ixi = sorted((SHARED_IXI / "val").glob("*.png"))[0]
    cases = {
        name: {"input_file": str(SHARED_ATLAS / "images" / name), "input_mask": str(SHARED_ATLAS / "brain" / name)},
        ixi.name: {"input_file": str(ixi)},
    }
    for png, inputs in cases.items():
        out = tmp_path / png
        run_bundle(bundle, ["configs/inference.json", "configs/ixi_t1.json"], {**inputs, "output_dir": str(out)})
        stem = png.removesuffix(".png")
        saved = nib.load(out / f"{stem}_anomaly_map.nii.gz")
        amap, pred = saved.get_fdata(), np.asarray(nib.load(out / f"{stem}_anomaly_mask.nii.gz").dataobj)
        with Image.open(inputs["input_file"]) as im:
            assert amap.shape == pred.shape == (im.height, im.width)
        np.testing.assert_allclose(np.diag(saved.affine)[:2], [233 / amap.shape[0], 197 / amap.shape[1]], rtol=1e-5)
        if "input_mask" in inputs:
            brain = np.asarray(Image.open(inputs["input_mask"])) > 0
            assert (amap[brain] > 0).mean() > 0.5 and np.isfinite(amap).all()
            assert not amap[~brain].any() and not pred[~brain].any()
        else:
            assert (amap > 0).sum() > 0.1 * amap.size
