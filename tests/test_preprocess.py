"""Tests of ``scripts/preprocess.py``: registration to MNI152 (known affine), output geometry, N4, batch mode, errors.

The key test moves the nilearn MNI152 template by a known random affine (rotation 5-10 degrees, scaling up to 8 %,
translation 5-10 mm), adds a smooth multiplicative bias field, stores it on a 2 mm grid with a non-RAS (LSP) axis
order, and checks that the preprocessing maps its brain mask back onto the template brain mask.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import preprocess
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (ITK) world coordinates


def _template() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(preprocess.DEFAULT_TEMPLATE)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _on_template_grid(path: str) -> np.ndarray:
    """A label map resampled (nearest neighbour, world coordinates) onto the template grid, as a boolean array."""
    template, t_affine = _template()
    img = nib.load(path)
    vox = np.linalg.inv(img.affine) @ t_affine
    data = np.asarray(img.dataobj, dtype=np.float32)
    return ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=template.shape, order=0) > 0.5


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """The template moved by a known affine ``world`` (RAS, subject = world @ template), with bias field and lesion."""
    out = tmp_path_factory.mktemp("case")
    rng = np.random.default_rng(0)
    template, t_affine = _template()
    rotation = Rotation.from_euler("xyz", rng.uniform(5, 10, 3) * rng.choice([-1, 1], 3), degrees=True).as_matrix()
    linear = rotation @ np.diag(1 + rng.uniform(-0.08, 0.08, 3))
    centre = t_affine[:3, :3] @ (np.array(template.shape) / 2) + t_affine[:3, 3]
    world = np.eye(4)
    world[:3, :3] = linear
    world[:3, 3] = centre + rng.uniform(5, 10, 3) * rng.choice([-1, 1], 3) - linear @ centre
    # 2 mm grid, voxel axes towards Left, Superior, Posterior, centred on the moved brain
    shape = np.array([100, 115, 120])
    affine = np.eye(4)
    affine[:3, :3] = [[-2.0, 0, 0], [0, 0, -2.0], [0, 2.0, 0]]
    affine[:3, 3] = world[:3, :3] @ centre + world[:3, 3] - affine[:3, :3] @ (shape / 2)
    vox = np.linalg.inv(t_affine) @ np.linalg.inv(world) @ affine  # subject voxel -> template voxel
    warp = dict(matrix=vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(shape), order=1)
    clean = ndimage.affine_transform(ndimage.gaussian_filter(template, 0.8), **warp).astype(np.float32)
    mask = (ndimage.affine_transform((template > 0).astype(np.float32), **warp) > 0.5).astype(np.uint8)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    bias = np.exp(0.3 * grid[0] - 0.2 * grid[1] * grid[2] + 0.15 * grid[2] ** 2)
    seg = np.zeros(shape, np.uint8)
    lesion_centre = np.array(np.nonzero(mask)).mean(axis=1) + 8
    seg[np.linalg.norm(np.indices(shape) - lesion_centre[:, None, None, None], axis=0) < 5] = 1
    assert nib.aff2axcodes(affine) == ("L", "S", "P")
    return {
        "image": _save((clean * bias).astype(np.float32), affine, out / "sub1_T1.nii.gz"),
        "clean": _save(clean, affine, out / "clean_T1.nii.gz"),
        "mask": _save(mask, affine, out / "sub1_brainmask.nii.gz"),
        "seg": _save(seg, affine, out / "sub1_lesion.nii.gz"),
        "world": world,
        "dir": out,
    }


@pytest.fixture(scope="module")
def registered(case) -> dict:
    return preprocess.preprocess_case(case["image"], case["mask"], case["dir"] / "reg", seg_path=case["seg"])


@pytest.fixture(scope="module")
def unregistered(case) -> dict:
    out = case["dir"] / "noreg"
    return preprocess.preprocess_case(case["image"], case["mask"], out, seg_path=case["seg"], n4=False, register=False)


def test_registration_recovers_known_affine(case, registered, unregistered):
    template, t_affine = _template()
    reference = template > 0
    dice_reg = _dice(_on_template_grid(registered["mask"]), reference)
    dice_noreg = _dice(_on_template_grid(unregistered["mask"]), reference)
    print(f"\nbrain-mask Dice with the template: registered {dice_reg:.4f}, not registered {dice_noreg:.4f}")
    assert dice_reg > 0.9, f"Dice after registration {dice_reg:.4f} (without: {dice_noreg:.4f})"
    assert dice_noreg < dice_reg - 0.05, f"registration did not help: {dice_reg:.4f} vs {dice_noreg:.4f}"

    # the saved transform maps template points (ITK LPS) to the input points: compare with the known affine
    (transform,) = itk.transformread(registered["transform"])
    matrix, offset = itk.array_from_matrix(transform.GetMatrix()), np.asarray(transform.GetOffset())
    voxels = np.argwhere(reference)[::500]
    points = (t_affine @ np.c_[voxels, np.ones(len(voxels))].T).T  # RAS, homogeneous
    expected = (LPS @ case["world"] @ points.T).T[:, :3]
    found = (LPS @ points.T).T[:, :3] @ matrix.T + offset
    error = np.linalg.norm(found - expected, axis=1)
    assert error.mean() < 1.5, f"mean error of the recovered affine {error.mean():.2f} mm (max {error.max():.2f})"


@pytest.mark.parametrize("outputs", ["registered", "unregistered"])
def test_output_geometry(outputs, request, case):
    paths = request.getfixturevalue(outputs)
    assert sorted(paths) == (
        ["image", "mask", "seg", "transform"] if outputs == "registered" else ["image", "mask", "seg"]
    )
    assert all(Path(p).name.startswith("sub1_T1_") for p in paths.values())
    images = {key: nib.load(paths[key]) for key in ("image", "mask", "seg")}
    for key, img in images.items():
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S"), key
        np.testing.assert_allclose(img.header.get_zooms()[:3], 1.0, atol=1e-5)
        assert img.shape == images["image"].shape, key
        np.testing.assert_allclose(img.affine, images["image"].affine, atol=1e-4)
    image = np.asarray(images["image"].dataobj)
    mask, seg = (np.asarray(images[k].dataobj) for k in ("mask", "seg"))
    assert image.dtype == np.float32 and np.isfinite(image).all() and image[mask > 0].mean() > 0
    assert set(np.unique(mask)) == {0, 1} and set(np.unique(seg)) == {0, 1}
    assert (seg > mask).sum() == 0  # the lesion lies inside the brain
    # cropped to the brain bounding box plus the 2-voxel margin (less where the template grid ends)
    bounds = np.argwhere(mask)
    lower, upper = bounds.min(axis=0), np.array(mask.shape) - bounds.max(axis=0) - 1
    if outputs == "registered":
        template, t_affine = _template()
        start = np.round(np.linalg.inv(t_affine) @ images["mask"].affine[:, 3])[:3].astype(int)
        np.testing.assert_array_equal(lower, np.minimum(2, start + lower))
        np.testing.assert_array_equal(upper, np.minimum(2, np.array(template.shape) - start - mask.shape + upper))
    else:
        np.testing.assert_array_equal(np.r_[lower, upper], 2)
    # the lesion volume (~4/3 pi 10^3 mm^3 at 2 mm voxels) survives resampling, up to the affine scaling
    assert 2500 < seg.sum() < 6000


def test_n4_reduces_bias(case):
    biased = preprocess.read_case(case["image"], case["mask"])
    clean = itk.array_from_image(preprocess.read_case(case["clean"], case["mask"])["image"])
    corrected = itk.array_from_image(preprocess.n4_bias_correction(biased["image"], biased["mask"], shrink=2))
    brain = (itk.array_from_image(biased["mask"]) > 0) & (clean > 0.2 * clean.max())

    def spread(array: np.ndarray) -> float:
        return float(np.log(np.maximum(array[brain], 1e-3) / clean[brain]).std())

    before, after = spread(itk.array_from_image(biased["image"])), spread(corrected)
    assert after < 0.6 * before, f"log-bias spread {before:.3f} -> {after:.3f}"


def test_reorient_ras(case):
    image = preprocess.reorient_ras(preprocess.read_case(case["image"], case["mask"])["image"])
    np.testing.assert_allclose(itk.array_from_matrix(image.GetDirection()), np.diag([-1.0, -1.0, 1.0]), atol=1e-6)


def test_datalist_batch(case, tmp_path):
    for sub in ("sub1", "sub2"):
        (tmp_path / sub).mkdir()
        for key in ("image", "mask", "seg"):
            shutil.copy(case[key], tmp_path / sub / f"{key}.nii.gz")
    datalist = {
        "training": [{"image": "sub1/image.nii.gz", "mask": "sub1/mask.nii.gz", "seg": "sub1/seg.nii.gz"}],
        "test": [{"image": str(tmp_path / "sub2/image.nii.gz"), "mask": str(tmp_path / "sub2/mask.nii.gz")}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    out = tmp_path / "out"
    argv = ["--datalist", str(tmp_path / "datalist.json"), "--out-dir", str(out), "--no-n4", "--no-register"]
    assert preprocess.main(argv) == 0
    written = json.loads((out / "datalist.json").read_text())
    assert sorted(written) == ["test", "training"]
    assert sorted(written["training"][0]) == ["image", "mask", "seg"] and sorted(written["test"][0]) == [
        "image",
        "mask",
    ]
    names = sorted(p.name for p in out.glob("*.nii.gz"))  # the repeated stem "image" gets the folder as prefix
    expected = [f"sub1_image_{k}.nii.gz" for k in ("image", "mask", "seg")] + [
        f"sub2_image_{k}.nii.gz" for k in ("image", "mask")
    ]
    assert names == sorted(expected)
    for entry in written["training"] + written["test"]:
        for path in entry.values():
            assert (out / path).is_file()
    assert not list(out.glob(".*")), "temporary files left behind"


def test_cli_help_and_missing_mask(capsys):
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--help"])
    assert exit_info.value.code == 0
    assert "Skull stripping is NOT done here" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--image", "x.nii.gz", "--out-dir", "out"])
    assert exit_info.value.code == 2
    assert "--mask is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def small(tmp_path) -> dict:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.random.default_rng(0).uniform(1, 2, (12, 14, 16)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[3:9, 3:11, 3:13] = 1
    return {"dir": tmp_path, "affine": affine, "image": image, "mask": mask}


def _bad_case(small: dict, problem: str) -> tuple[str, str, type, str]:
    """Paths (image, mask) for one kind of bad input, the expected error, and the file its message must name."""
    d, affine, image, mask = small["dir"], small["affine"], small["image"], small["mask"]
    image_path, mask_path = d / "img.nii.gz", d / "brainmask.nii.gz"
    _save(image, affine, image_path)
    _save(mask, affine, mask_path)
    if problem == "missing image":
        return str(d / "nope.nii.gz"), str(mask_path), FileNotFoundError, "nope.nii.gz"
    if problem == "missing mask":
        return str(image_path), str(d / "nomask.nii.gz"), FileNotFoundError, "nomask.nii.gz"
    if problem == "4D image":
        _save(np.stack([image] * 3, axis=-1), affine, image_path)
        return str(image_path), str(mask_path), ValueError, "img.nii.gz"
    if problem == "mask geometry":
        shifted = affine.copy()
        shifted[:3, 3] = 5.0
        _save(mask, shifted, mask_path)
        return str(image_path), str(mask_path), ValueError, "brainmask.nii.gz"
    if problem == "mask size":
        _save(mask[:-1], affine, mask_path)
        return str(image_path), str(mask_path), ValueError, "brainmask.nii.gz"
    if problem == "NaN":
        image[5, 5, 5] = np.nan
        _save(image, affine, image_path)
        return str(image_path), str(mask_path), ValueError, "img.nii.gz"
    if problem == "empty mask":
        _save(np.zeros_like(mask), affine, mask_path)
        return str(image_path), str(mask_path), ValueError, "brainmask.nii.gz"
    raise AssertionError(problem)


@pytest.mark.parametrize(
    "problem, words",
    [
        ("missing image", "not found"),
        ("missing mask", "not found"),
        ("4D image", "must be a 3D image"),
        ("mask geometry", "origin"),
        ("mask size", "size"),
        ("NaN", "NaN"),
        ("empty mask", "empty"),
    ],
)
def test_bad_inputs(small, problem, words):
    image_path, mask_path, error, name = _bad_case(small, problem)
    with pytest.raises(error, match=re.escape(name)) as info:
        preprocess.preprocess_case(image_path, mask_path, small["dir"] / "out")
    assert words in str(info.value)
    assert not (small["dir"] / "out").exists()


def test_template_mask_geometry(small):
    _save(small["image"], small["affine"], small["dir"] / "template.nii.gz")
    _save(small["mask"][:, :-1], small["affine"], small["dir"] / "template_mask.nii.gz")
    with pytest.raises(ValueError, match="template_mask.nii.gz: template mask geometry"):
        preprocess.load_template(str(small["dir"] / "template.nii.gz"), str(small["dir"] / "template_mask.nii.gz"))
