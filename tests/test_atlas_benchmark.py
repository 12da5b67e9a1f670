"""The IXI -> ATLAS benchmark (``scripts/make_atlas_benchmark.py``, ``benchmark.py --data atlas``) on a few of the
shared real slices, and the errors for incomplete folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import benchmark
import make_atlas_benchmark as mab
import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_IXI
from PIL import Image
from uad.errors import InputError
from uad.metrics import pooled_dice, volume_metrics

SHARED_ATLAS = SHARED_IXI.parent / "atlas_t1_axial"
needs_shared = pytest.mark.skipif(
    not (SHARED_IXI.is_dir() and SHARED_ATLAS.is_dir()),
    reason="shared IXI and ATLAS slices not present (../shared/data/ixi_t1_axial, ../shared/data/atlas_t1_axial)",
)


@pytest.fixture
def few_slices(tmp_path) -> tuple[Path, Path]:
    """6 IXI train, 3 IXI val slices; 3 ATLAS val and 4 ATLAS test slices (lesion and lesion-free ones)."""
    ixi, atlas = tmp_path / "ixi", tmp_path / "atlas"
    for split, n in (("train", 6), ("val", 3)):
        (ixi / split).mkdir(parents=True)
        for path in sorted((SHARED_IXI / split).glob("*.png"))[:n]:
            shutil.copy(path, ixi / split)
    (atlas / "splits").mkdir(parents=True)
    for split, n in (("val", 3), ("test", 4)):
        names = (SHARED_ATLAS / "splits" / f"{split}.txt").read_text().split()
        with_lesion = [m for m in names if np.asarray(Image.open(SHARED_ATLAS / "lesions" / m)).any()]
        chosen = with_lesion[: n - 1] + [m for m in names if m not in with_lesion][:1]
        (atlas / "splits" / f"{split}.txt").write_text("\n".join(chosen) + "\n")
        for folder in mab.ATLAS_FOLDERS:
            (atlas / folder).mkdir(exist_ok=True)
            for name in chosen:
                shutil.copy(SHARED_ATLAS / folder / name, atlas / folder)
    return ixi, atlas


@needs_shared
def test_atlas_slices_on_the_ixi_grid_with_one_mask_convention(few_slices, tmp_path):
    ixi, atlas = few_slices
    summary = mab.build_atlas_benchmark(ixi, atlas, tmp_path / "out")
    assert summary["counts"] == {
        "ixi_train": 6,
        "ixi_val": 3,
        "atlas_val": 3,
        "atlas_test": 4,
        "atlas_val_with_lesion": 2,
        "atlas_test_with_lesion": 3,
    }
    datalist = json.loads((tmp_path / "out" / "datalist_atlas.json").read_text())
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [6, 2 + 3, 4]  # lesion-free val left out
    case = datalist["test"][0]
    image, mask, seg = (nib.load(tmp_path / "out" / case[k]) for k in ("image", "mask", "seg"))
    assert image.shape == mask.shape == seg.shape == (*mab.GRID, 1) and np.allclose(image.affine, np.eye(4))
    assert set(np.unique(seg.get_fdata())) <= {0.0, 1.0} and seg.get_fdata().any()
    assert summary["derived_vs_atlas_brain_mask_dice_min_median"][1] > 0.7  # the derived masks cover the brain
    assert summary["lesion_fraction_inside_mask_min_median"][1] > 0.9


@needs_shared
def test_benchmark_ranks_the_mean_image_on_real_strokes(few_slices, tmp_path):
    ixi, atlas = few_slices
    args = ["--data", "atlas", "--ixi", str(ixi), "--atlas", str(atlas), "--methods", "mean_image", "intensity"]
    args += ["mean_image_erosion1"]
    assert benchmark.main([*args, "--budget", "1", "--curve-points", "1", "--out", str(tmp_path)]) == 0
    rows = {r["key"]: r for r in json.loads((tmp_path / "benchmark.json").read_text())["rows"]}
    mean = rows["mean_image"]
    assert mean["target"] == "ATLAS" and 0 < mean["pooled_auroc"] <= 1 and mean["pooled_auprc"] > mean["chance_auprc"]
    assert 0 < mean["val_best_dice"] <= 1 and 0 < mean["val_auprc"] <= 1  # the figures settings are chosen on
    eroded_once = rows["mean_image_erosion1"]  # the same template, a wider band of brain mapped
    assert eroded_once["val_auprc"] != mean["val_auprc"] and eroded_once["pooled_auprc"] > mean["chance_auprc"]
    assert mean["healthy_fp_px"] >= 0 and "FP px per lesion-free test case" in (tmp_path / "benchmark.md").read_text()


def _fake_atlas(root: Path) -> Path:
    for folder in (*mab.ATLAS_FOLDERS, "splits"):
        (root / folder).mkdir(parents=True)
    for name in ("a.png", "b.png"):
        for folder in mab.ATLAS_FOLDERS:
            Image.fromarray(np.zeros((128, 128), np.uint8)).save(root / folder / name)
    (root / "splits" / "val.txt").write_text("a.png\n")
    (root / "splits" / "test.txt").write_text("b.png\n")
    return root


def test_incomplete_atlas_folders_are_named_before_anything_is_written(tmp_path):
    ixi = tmp_path / "ixi"
    for split in ("train", "val"):
        (ixi / split).mkdir(parents=True)
        Image.fromarray(np.zeros((233, 197), np.uint8)).save(ixi / split / "x.png")
    atlas = _fake_atlas(tmp_path / "atlas")
    (atlas / "brain" / "a.png").unlink()
    with pytest.raises(InputError, match=r"brain/a\.png: not found \(listed in"):
        mab.build_atlas_benchmark(ixi, atlas, tmp_path / "out")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(atlas / "brain" / "a.png")
    with pytest.raises(InputError, match=r"brain/a\.png: size \(64, 64\) does not match its image"):
        mab.build_atlas_benchmark(ixi, atlas, tmp_path / "out")
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(atlas / "brain" / "a.png")
    (atlas / "splits" / "test.txt").write_text("b.png\nmissing.png\n")
    with pytest.raises(InputError, match=r"images/missing\.png: not found"):
        mab.build_atlas_benchmark(ixi, atlas, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert mab.main(["--ixi", str(ixi), "--atlas", str(atlas), "--out", str(tmp_path / "out")]) == 2


def test_pooled_dice_pools_voxels_over_cases():
    brain = np.ones((4, 4, 1), bool)
    seg = np.zeros((4, 4, 1), bool)
    seg[:2, :2] = True  # 4 lesion voxels in the first case, the second is healthy
    first, second = seg * 1.0, np.zeros((4, 4, 1))
    second[3, 3] = 1.0  # one false positive
    rows = [volume_metrics(m, g, brain, {"t": 0.5}, min_component_size=1) for m, g in ((first, seg), (second, None))]
    assert pooled_dice(rows, "t") == 2 * 4 / (5 + 4)
    assert np.isnan(pooled_dice(rows[1:], "t"))
