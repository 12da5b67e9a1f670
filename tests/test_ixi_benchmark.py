"""Tests of the IXI lesion benchmark builder ``scripts/make_ixi_benchmark.py`` on a tiny fake IXI folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import make_ixi_benchmark as mib
import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_IXI
from lib import slices
from PIL import Image
from scipy import ndimage as ndi
from uad.data import dataset_entries

SHAPE = (233, 197)
N_TRAIN, N_VAL, N_CAL, N_HEALTHY = 3, 6, 2, 1


def _fake_slice(rng: np.random.Generator) -> np.ndarray:
    """A template slice in the IXI orientation with a bright skull ring around it and noise, as uint8."""
    brain = slices.best_slice({"z": 95 + int(rng.integers(-2, 3)), "code": 5}, SHAPE)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    rho = np.hypot((yy - 118) / 100.0, (xx - 98) / 82.0)
    skull = ((rho > 0.95) & (rho < 1.05)) * 200.0
    image = 220.0 * brain / brain.max() + skull + rng.normal(0.0, 4.0, SHAPE)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fake_ixi(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ixi")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        (root / split).mkdir()
        for i in range(n):
            name = f"sub-IXI{100 * (split == 'val') + i:03d}_ses-M00_T1w_space-MNI152NLin2009cSym_res-1x1x1_T1w.png"
            Image.fromarray(_fake_slice(rng)).save(root / split / name)
    return root


@pytest.fixture(scope="module")
def bench(fake_ixi, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "out"
    return out, mib.build_ixi_benchmark(fake_ixi, out, seed=0, n_calibration=N_CAL, n_healthy_calibration=N_HEALTHY)


def _load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_template_match_and_masks(bench):
    out, summary = bench
    assert summary["template"]["code"] in (5, 7) and abs(summary["template"]["z"] - 95) <= 2
    assert summary["template"]["correlation"] > 0.6 and summary["template"]["exact_shape"]
    for entry in dataset_entries(None, out / "datalist_hyper.json", "training"):
        image, _ = _load(entry["image"])
        mask, _ = _load(entry["mask"])
        assert image.dtype == np.float32 and mask.dtype == np.uint8 and mask.shape == (*SHAPE, 1)
        assert 0.2 < mask.mean() < 0.6
        assert image[mask > 0].min() > 0.0 and image[mask == 0].max() > 150  # the skull ring stays outside


def test_datalists(bench):
    out, _ = bench
    n_test = N_VAL - N_CAL - N_HEALTHY
    for name in ("hyper", "hypo", "mixed"):
        datalist = out / f"datalist_{name}.json"
        assert len(dataset_entries(None, datalist, "training")) == N_TRAIN
        validation = dataset_entries(None, datalist, "validation")
        assert sum("seg" in e for e in validation) == N_CAL and len(validation) == N_CAL + N_HEALTHY
        test = dataset_entries(None, datalist, "test")
        assert len(test) == n_test and all("seg" in e and "mask" in e for e in test)
        for entry in validation + test:
            affines = [_load(entry[k])[1] for k in ("image", "mask", "seg") if k in entry]
            assert all(np.array_equal(a, affines[0]) for a in affines)
    manifest = json.loads((out / "manifest.json").read_text())
    source = {c["case"]: c["source"] for c in manifest["cases"]}
    for name in ("hyper", "hypo", "mixed"):  # each lesion type calibrated on its own kind, on other subjects
        sections = [dataset_entries(None, out / f"datalist_{name}.json", k) for k in ("validation", "test")]
        polarities = [[e["name"].split("_")[1] for e in section if "seg" in e] for section in sections]
        n = max(N_CAL, n_test)
        expected = [["hyper", "hypo"][j % 2] for j in range(n)] if name == "mixed" else [name] * n
        assert polarities == [expected[:N_CAL], expected[:n_test]]
        subjects = [{source[e["name"].removesuffix("_t1")] for e in section if "seg" in e} for section in sections]
        assert len(subjects[0]) == N_CAL and not subjects[0] & subjects[1]
    assert manifest["seed"] == 0 and len(manifest["cases"]) == 2 * N_CAL + 2 * n_test
    assert (out / "ixi_benchmark.png").stat().st_size > 0


def test_lesions(bench, fake_ixi):
    out, _ = bench
    cases = {c["case"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}
    sources = {p.name: np.asarray(Image.open(p), dtype=np.float32) for p in (fake_ixi / "val").glob("*.png")}
    for polarity, sign in (("hyper", 1.0), ("hypo", -1.0)):
        for entry in dataset_entries(None, out / f"datalist_{polarity}.json", "test"):
            lesion, mask, seg = (_load(entry[k])[0][..., 0] for k in ("image", "mask", "seg"))
            params = cases[entry["name"].removesuffix("_t1")]
            original = sources[params["source"]]
            assert seg.any() and np.isfinite(lesion).all()
            assert not (seg & (1 - mask)).any()
            changed = np.abs(lesion - original) > 1e-3
            assert not (changed & ~ndi.binary_erosion(mask > 0)).any()  # the soft edge stays inside the brain
            assert original.min() <= lesion.min() and lesion.max() <= original.max()
            rel = lesion[seg > 0].mean() / original[seg > 0].mean() - 1.0
            assert sign * rel > 0.03 and abs(rel) < mib.CONTRAST_RANGE[1] + 0.1
            assert params["contrast"] <= mib.CONTRAST_RANGE[1] and params["polarity"] == polarity
            assert params["capped"] or params["contrast"] >= mib.CONTRAST_RANGE[0]
            assert params["area_px"] == int(seg.sum())


def test_insert_lesion_bounds():
    rng = np.random.default_rng(1)
    image = _fake_slice(rng).astype(np.float32)
    mask = slices.brain_mask(image, slices.best_slice({"z": 95, "code": 5}, SHAPE) > 0.2 * 255)
    for k in range(6):
        polarity = ("hyper", "hypo")[k % 2]
        out, seg, params = mib.insert_lesion(image, mask, np.random.default_rng([7, k]), polarity)
        assert out.dtype == np.float32 and seg.any() and not (seg.astype(bool) & ~mask).any()
        upper = np.percentile(image[mask], 99.9)
        assert out[mask].max() <= max(upper, image[mask].max()) + 1e-3 and out.min() >= image.min() - 1e-3
        assert 2.0 < params["equivalent_radius_mm"] < 20.0


def test_deterministic(bench, fake_ixi, tmp_path):
    out, _ = bench
    kwargs = {"n_calibration": N_CAL, "n_healthy_calibration": N_HEALTHY}
    mib.build_ixi_benchmark(fake_ixi, tmp_path / "same", seed=0, **kwargs)
    mib.build_ixi_benchmark(fake_ixi, tmp_path / "other", seed=1, **kwargs)
    first = json.loads((out / "manifest.json").read_text())["cases"]
    assert json.loads((tmp_path / "same" / "manifest.json").read_text())["cases"] == first
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["cases"] != first
    for entry in dataset_entries(None, out / "datalist_hypo.json", "test"):
        rel = Path(entry["image"]).relative_to(out)
        assert np.array_equal(_load(entry["image"])[0], _load(tmp_path / "same" / rel)[0])


def test_cli_errors(tmp_path, fake_ixi, capsys):
    assert mib.main(["--ixi", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "IXI folder not found" in capsys.readouterr().err
    assert mib.main(["--ixi", str(fake_ixi), "--out", str(tmp_path / "o"), "--n-calibration", "9"]) == 2
    with pytest.raises(SystemExit):
        mib.main(["--help"])


@pytest.mark.skipif(not SHARED_IXI.is_dir(), reason="shared IXI slices not present (../shared/data/ixi_t1_axial)")
def test_real_ixi_subset(tmp_path):
    for split, n in (("train", 4), ("val", 5)):
        (tmp_path / "ixi" / split).mkdir(parents=True)
        for p in sorted((SHARED_IXI / split).glob("*.png"))[:n]:
            shutil.copy(p, tmp_path / "ixi" / split / p.name)
    summary = mib.build_ixi_benchmark(tmp_path / "ixi", tmp_path / "out", n_calibration=2, n_healthy_calibration=1)
    assert summary["template"]["code"] in (5, 7) and abs(summary["template"]["z"] - 95) <= 3
    assert summary["template"]["correlation"] > 0.75
    assert summary["mask"]["fraction_of_template_mask_min_median_max"][0] > 0.9
    assert len(dataset_entries(None, tmp_path / "out" / "datalist_mixed.json", "test")) == 2
