"""Data layer: split CSVs, datalists, contrast choice, validation errors, and the protocol transforms."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_IXI
from lib.datalists import seed_layout_to_datalist, write_datalist
from monai.transforms import LoadImaged
from PIL import Image
from uad.data import (
    case_name,
    dataset_entries,
    evaluation_entries,
    evaluation_sets,
    load_datalist,
    load_split_csv,
    validate_entries,
)
from uad.transforms import CheckImaged, DeriveBrainMaskd, RandGhostingd, ScaleIntensityInMaskd

KEYS = ["image", "mask", "seg"]


def load(entry: dict):
    keys = [k for k in KEYS if k in entry]
    return CheckImaged(keys)(LoadImaged(keys, image_only=True, ensure_channel_first=True)(entry))


def save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


def test_case_name():
    assert case_name("/a/b/sub1_t2.nii.gz") == "sub1_t2" and case_name("x.png") == "x" and case_name("y.nii") == "y"


def test_split_csv_contrast_choice_and_datalist_round_trip(demo_cohort, tmp_path):
    t2 = load_split_csv(demo_cohort / "splits" / "Tumour_test.csv")
    t1 = load_split_csv(demo_cohort / "splits" / "Tumour_test.csv", contrast="t1")
    assert all("/t2/" in e["image"] and e["image"].endswith("_t2.nii.gz") for e in t2)
    assert [e["image"] for e in t1] == [e["image"].replace("/t2/", "/t1/").replace("_t2.", "_t1.") for e in t2]
    assert all("seg" in e and e["label"] == 1 for e in t2)
    healthy = load_split_csv(demo_cohort / "splits" / "IXI_val_fold0.csv", contrast="t1")
    assert all("seg" not in e and "mask" in e for e in healthy)

    out = seed_layout_to_datalist(
        demo_cohort,
        tmp_path / "dl" / "datalist.json",
        "t1",
        ["IXI_train_fold0"],
        ["IXI_val_fold0", "Tumour_val"],
        ["Tumour_test"],
    )
    raw = json.loads(out.read_text())
    assert set(raw) == {"training", "validation", "test"}
    assert all(not item["image"].startswith("/") for item in raw["test"])  # stored relative to the JSON
    back = load_datalist(out, "test")
    assert [(e["image"], e["mask"], e["seg"]) for e in back] == [(e["image"], e["mask"], e["seg"]) for e in t1]
    val, test = evaluation_entries(None, out)
    assert sum("seg" in e for e in val) == 2 and len(test) == 2
    # the seed layout and the datalist give the same evaluation entries
    val_csv, test_csv = evaluation_entries(demo_cohort, None, "t1", "Tumour")
    assert sorted(e["image"] for e in val_csv) == sorted(e["image"] for e in val)
    # several test sets: each its own entries, sharing the healthy validation ones; a datalist is one set
    sets = evaluation_sets(demo_cohort, None, "t1", ["Tumour", "MS"])
    assert list(sets) == ["Tumour", "MS"] and sets["Tumour"] == (val_csv, test_csv)
    healthy = [[e["image"] for e in val if "seg" not in e] for val, _ in sets.values()]
    assert healthy[0] == healthy[1] and not {e["image"] for e in sets["MS"][1]} & {e["image"] for e in test_csv}
    assert list(evaluation_sets(None, out, test_sets=["ignored"])) == [out.stem]
    with pytest.raises(ValueError, match="distinct"):
        evaluation_sets(demo_cohort, None, "t1", ["Tumour", "Tumour"])


def test_convert_datalist_cli(demo_cohort, tmp_path):
    out = tmp_path / "d.json"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "convert_datalist.py"),
        "--data-dir",
        str(demo_cohort),
        "--contrast",
        "t2",
        "--out",
        str(out),
        "--test",
        "MS_test",
    ]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert len(load_datalist(out, "test")) == 2
    bad = subprocess.run(cmd[:-1] + ["Nope_test"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Nope_test.csv" in bad.stderr


def test_dataset_entries_sources(demo_cohort, tmp_path):
    assert len(dataset_entries(demo_cohort, contrast="t1")) == 4  # IXI_train_fold0
    dl = demo_cohort / "datalists" / "Tumour_t2.json"
    assert len(dataset_entries(None, dl, "validation", healthy_only=True)) == 2
    folder = tmp_path / "plain"
    folder.mkdir()
    for e in load_split_csv(demo_cohort / "splits" / "MS_test.csv"):
        shutil.copy(e["image"], folder)
    plain = dataset_entries(folder)
    assert len(plain) == 2 and all(set(e) == {"image", "name"} for e in plain)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI or PNG"):
        dataset_entries(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset_dir not found"):
        dataset_entries(tmp_path / "absent")


def test_missing_wrong_geometry_and_non_image_files_give_clear_errors(tmp_path):
    image = save(tmp_path / "img.nii.gz", np.random.rand(8, 9, 5).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="nope_mask.nii.gz"):
        validate_entries([{"image": image, "mask": str(tmp_path / "nope_mask.nii.gz")}])
    small = save(tmp_path / "small_mask.nii.gz", np.ones((8, 9, 4), np.uint8))
    with pytest.raises(ValueError, match="small_mask.nii.gz.*shape"):
        validate_entries([{"image": image, "mask": small}])
    shifted = save(tmp_path / "shift_seg.nii.gz", np.zeros((8, 9, 5), np.uint8), np.diag([2.0, 2, 2, 1]))
    with pytest.raises(ValueError, match="shift_seg.nii.gz.*affine"):
        validate_entries([{"image": image, "seg": shifted}])
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.nii.gz: not a readable image"):
        validate_entries([{"image": str(text)}])
    csv_file = tmp_path / "table.csv"
    csv_file.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported image format"):
        validate_entries([{"image": str(csv_file)}])
    bad_csv = tmp_path / "splits" / "X_test.csv"
    bad_csv.parent.mkdir()
    bad_csv.write_text("img_name,img_path\nx,a.nii.gz\n")
    with pytest.raises(ValueError, match="missing column"):
        load_split_csv(bad_csv)
    with pytest.raises(ValueError, match="no section 'test'"):
        load_datalist(write_datalist(tmp_path / "d.json", {"training": [{"image": image}]}), "test")


def test_loaded_image_checks_name_the_file(tmp_path):
    good = np.random.rand(8, 8, 4).astype(np.float32)
    nan = good.copy()
    nan[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="nan_img.nii.gz: contains NaN"):
        load({"image": save(tmp_path / "nan_img.nii.gz", nan)})
    with pytest.raises(ValueError, match="vol4d.nii.gz: expected a single-channel image, got 3 channels"):
        load({"image": save(tmp_path / "vol4d.nii.gz", np.random.rand(8, 8, 4, 3).astype(np.float32))})
    with pytest.raises(ValueError, match="empty_mask.nii.gz: brain mask is empty"):
        load(
            {
                "image": save(tmp_path / "a.nii.gz", good),
                "mask": save(tmp_path / "empty_mask.nii.gz", np.zeros((8, 8, 4))),
            }
        )
    with pytest.raises(ValueError, match="moved_mask.nii.gz: mask geometry"):
        load(
            {
                "image": save(tmp_path / "b.nii.gz", good),
                "mask": save(tmp_path / "moved_mask.nii.gz", np.ones((8, 8, 4)), np.diag([1.0, 1, 3, 1])),
            }
        )
    with pytest.raises(ValueError, match="tiny_mask.nii.gz: mask shape"):
        load(
            {
                "image": save(tmp_path / "c.nii.gz", good),
                "mask": save(tmp_path / "tiny_mask.nii.gz", np.ones((8, 8, 3))),
            }
        )


def test_png_slice_becomes_one_slice_volume(tmp_path):
    array = np.zeros((40, 30), np.uint8)
    array[10:30, 5:25] = 200
    Image.fromarray(array).save(tmp_path / "slice.png")
    d = load({"image": str(tmp_path / "slice.png")})
    assert d["image"].shape == (1, 30, 40, 1) and d["image"].affine.shape == (4, 4)  # PIL reader: (W, H)
    d = DeriveBrainMaskd()(d)
    assert d["mask"].sum() == 20 * 20 and d["mask"].meta["mask_derived"]


@pytest.mark.skipif(not SHARED_IXI.is_dir(), reason="shared IXI slices not present (../shared/data/ixi_t1_axial)")
def test_real_ixi_slices_load_as_volumes():
    entries = dataset_entries(SHARED_IXI / "val")
    assert len(entries) == 58
    d = DeriveBrainMaskd()(load(entries[0]))
    assert d["image"].ndim == 4 and d["image"].shape[-1] == 1 and 0.2 < float(d["mask"].float().mean()) < 0.9


def test_scale_intensity_in_mask_uses_brain_percentiles():
    image = torch.zeros(1, 10, 10, 2)
    image[:, 2:8, 2:8] = torch.linspace(100, 200, 72).reshape(1, 6, 6, 2)
    image[:, 0, 0] = 5000  # outside the brain: must not influence the scaling
    mask = torch.zeros_like(image)
    mask[:, 2:8, 2:8] = 1
    out = ScaleIntensityInMaskd()({"image": image, "mask": mask})["image"]
    brain = out[mask > 0]
    assert out[mask == 0].abs().max() == 0 and brain.min() == 0 and brain.max() == 1
    assert 0.45 < float(brain.median()) < 0.55


def test_ghosting_adds_replicas_along_one_axis():
    image = torch.zeros(1, 32, 32, 1)
    image[:, 12:20, 12:20] = 1.0
    t = RandGhostingd(prob=1.0, num_ghosts=(4, 4), intensity=(0.8, 0.8))
    t.set_random_state(0)
    out = t({"image": image})["image"]
    assert out.shape == image.shape and out[:, :10].abs().sum() + out[:, :, :10].abs().sum() > 1.0
    assert torch.allclose(RandGhostingd(prob=0.0)({"image": image})["image"], image)
