"""Tests of the synthetic demo cohort generator ``scripts/make_demo_data.py`` (size ``tiny``, built once per module)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import make_demo_data
import nibabel as nib
import numpy as np
import pytest
from lib import demo_cohort as mdd
from scipy import ndimage as ndi

SEED = 3
VOXEL_ML = 8.0 / 1000.0  # 2 mm isotropic


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "data"
    summary = mdd.build_cohort(root, seed=SEED, size="tiny", progress=False)
    return root, summary


@pytest.fixture(scope="module")
def anatomy() -> dict:
    return mdd.load_template_anatomy(2.0)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _lesion_cases(root: Path) -> list[tuple[str, dict]]:
    cases = []
    for set_name in mdd.LESION_SETS:
        for split in ("val", "test"):
            cases += [(set_name, row) for row in _read_csv(root / "splits" / f"{set_name}_{split}.csv")[1]]
    return cases


# --------------------------------------------------------------------------------------------------------------------
# Template anatomy
# --------------------------------------------------------------------------------------------------------------------


def test_template_anatomy(anatomy):
    shape = anatomy["shape"]
    assert anatomy["spacing"] == 2.0
    assert all(n % 16 == 0 for n in shape)
    assert np.allclose(np.diag(anatomy["affine"])[:3], 2.0)
    for key in ("gm", "wm", "csf", "brain", "mask", "texture", "support"):
        assert anatomy[key].shape == shape, key
    total = anatomy["gm"] + anatomy["wm"] + anatomy["csf"]
    assert np.all(total <= anatomy["brain"] + 1e-5)
    assert np.all((anatomy["csf"] >= 0) & (anatomy["csf"] <= 1))
    # MNI152 brain volume (mask of the skull-stripped template) is about 1.9 litres, with a margin around it.
    assert 1.6 < anatomy["mask"].sum() * VOXEL_ML / 1000.0 < 2.1
    idx = np.argwhere(anatomy["mask"])
    assert idx.min() >= 4 and np.all(idx.max(0) < np.array(shape) - 4)
    # The world position of the brain centre is close to the MNI origin (RAS, mm).
    centre = anatomy["affine"] @ np.append(idx.mean(0), 1.0)
    assert np.all(np.abs(centre[:3]) < 25.0)
    assert not anatomy["gm"].flags.writeable  # cached, shared: read-only


# --------------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_arrays_different_seed_different(anatomy):
    lesion = set_name = "Tumour"
    a = mdd.synthesize_subject(mdd.subject_rng(11, set_name, 0), anatomy, lesion)
    b = mdd.synthesize_subject(mdd.subject_rng(11, set_name, 0), anatomy, lesion)
    c = mdd.synthesize_subject(mdd.subject_rng(12, set_name, 0), anatomy, lesion)
    for key in ("t1", "t2", "mask", "seg"):
        assert a[key].tobytes() == b[key].tobytes(), key
    assert np.array_equal(a["affine"], b["affine"])
    assert a["t1"].tobytes() != c["t1"].tobytes()
    assert a["t2"].tobytes() != c["t2"].tobytes()
    assert not np.array_equal(a["mask"], c["mask"])
    # Another subject index of the same seed differs too.
    d = mdd.synthesize_subject(mdd.subject_rng(11, set_name, 1), anatomy, lesion)
    assert a["t2"].tobytes() != d["t2"].tobytes()


def test_cohort_files_equal_fresh_synthesis(cohort, anatomy):
    """Files depend only on (seed, set, index): re-synthesizing one subject gives the stored arrays exactly."""
    root, _ = cohort
    subject = mdd.synthesize_subject(mdd.subject_rng(SEED, "Stroke", 1), anatomy, "Stroke")
    for kind in ("t1", "t2", "mask", "seg"):
        stored, affine = _load(root / f"Test/Stroke/{kind}/stroke_0001_{kind}.nii.gz")
        assert np.array_equal(stored, subject[kind]), kind
        assert np.allclose(affine, subject["affine"])


def test_subject_rng_validation():
    with pytest.raises(ValueError):
        mdd.subject_rng(0, "Nope", 0)
    with pytest.raises(ValueError):
        mdd.synthesize_subject(mdd.subject_rng(0, "IXI", 0), mdd.load_template_anatomy(), "glioma-x")


# --------------------------------------------------------------------------------------------------------------------
# Images and ground truth
# --------------------------------------------------------------------------------------------------------------------


def test_healthy_images(cohort):
    root, _ = cohort
    for split in ("IXI_train_fold0", "IXI_val_fold0", "IXI_test"):
        for row in _read_csv(root / "splits" / f"{split}.csv")[1]:
            assert row["label"] == "0" and row["seg_path"] == ""
            name = row["img_name"]
            assert not (root / f"Train/ixi/seg/{name}_seg.nii.gz").exists()
            mask, _ = _load(root / row["mask_path"])
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
            for contrast in ("t1", "t2"):
                img = nib.load(root / f"Train/ixi/{contrast}/{name}_{contrast}.nii.gz")
                assert img.get_data_dtype() == np.int16
                data = np.asarray(img.dataobj)
                assert data.min() >= 0
                assert np.all(data[mask == 0] == 0)  # skull-stripped background
                assert data[mask > 0].mean() > 100
            # tissue contrast: T1 and T2 are anti-correlated inside the brain
            t1, _ = _load(root / f"Train/ixi/t1/{name}_t1.nii.gz")
            t2, _ = _load(root / f"Train/ixi/t2/{name}_t2.nii.gz")
            inside = mask > 0
            assert np.corrcoef(t1[inside].astype(float), t2[inside].astype(float))[0, 1] < -0.3


def test_lesion_ground_truth_and_contrast(cohort):
    root, _ = cohort
    cases = _lesion_cases(root)
    assert {s for s, _ in cases} == set(mdd.LESION_SETS)
    for set_name, row in cases:
        assert row["label"] == "1" and row["seg_path"]
        seg, _ = _load(root / row["seg_path"])
        mask, _ = _load(root / row["mask_path"])
        t2, _ = _load(root / row["img_path"])
        t1, _ = _load(root / row["img_path"].replace("/t2/", "/t1/").replace("_t2.nii.gz", "_t1.nii.gz"))
        lesion, brain = seg > 0, mask > 0
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}
        assert lesion.any(), f"{row['img_name']}: empty seg"
        assert not (lesion & ~brain).any(), f"{row['img_name']}: seg outside the brain mask"
        volume_ml = lesion.sum() * VOXEL_ML
        if set_name == "Tumour":
            assert 5.0 <= volume_ml <= 60.0, volume_ml
        elif set_name == "MS":
            assert 0.005 < volume_ml < 15.0, volume_ml
            n_lesions = ndi.label(lesion, structure=np.ones((3, 3, 3)))[1]
            assert 1 <= n_lesions <= 10
        ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion & brain
        assert ring.sum() > 0
        assert t2[lesion].mean() > 1.05 * t2[ring].mean(), f"{row['img_name']}: lesion not hyperintense in T2"
        if set_name in ("Tumour", "Stroke"):
            assert t1[lesion].mean() < 0.95 * t1[ring].mean(), f"{row['img_name']}: lesion not hypointense in T1"
        assert t1.min() >= 0 and t2.min() >= 0


def test_lesion_locations(anatomy):
    """MS plaques are centred in white matter, strokes reach the cortex (checked on the template tissue maps)."""
    ms = mdd.synthesize_subject(mdd.subject_rng(5, "MS", 0), anatomy, "MS")
    stroke = mdd.synthesize_subject(mdd.subject_rng(5, "Stroke", 0), anatomy, "Stroke")
    labels, n = ndi.label(ms["seg"] > 0, structure=np.ones((3, 3, 3)))
    assert 1 <= n <= 10
    # Lesions sit mostly in white matter (the subject is a deformation of the template, so use a tolerant check).
    wm_near = ndi.maximum_filter(anatomy["wm"], size=5)
    assert np.mean(wm_near[labels > 0] > 0.5) > 0.8
    lesion = stroke["seg"] > 0
    depth = ndi.distance_transform_edt(stroke["mask"])
    assert depth[lesion].min() <= 2.0  # touches the cortical surface
    assert 2.0 < stroke["lesion_ml"] < 60.0


# --------------------------------------------------------------------------------------------------------------------
# Layout: split CSVs, datalists, manifest, figure
# --------------------------------------------------------------------------------------------------------------------


def test_split_csvs(cohort):
    root, summary = cohort
    sizes = mdd.SIZES["tiny"]
    expected = {
        "IXI_train_fold0": sizes["train"],
        "IXI_val_fold0": sizes["val"],
        "IXI_test": sizes["test"],
        **{f"{s}_val": sizes["lesion_val"] for s in mdd.LESION_SETS},
        **{f"{s}_test": sizes["lesion_test"] for s in mdd.LESION_SETS},
    }
    assert sorted(p.stem for p in (root / "splits").glob("*.csv")) == sorted(expected)
    names = set()
    for split, count in expected.items():
        columns, rows = _read_csv(root / "splits" / f"{split}.csv")
        assert columns == ["img_name", "age", "label", "img_path", "mask_path", "seg_path"]
        assert len(rows) == count
        for row in rows:
            assert row["img_name"] not in names
            names.add(row["img_name"])
            assert 18 <= int(row["age"]) <= 95
            assert row["img_path"].endswith("_t2.nii.gz") and "/t2/" in row["img_path"]
            paths = [row["img_path"], row["mask_path"]] + ([row["seg_path"]] if row["seg_path"] else [])
            geometry = []
            for rel in paths:
                assert not Path(rel).is_absolute()
                assert (root / rel).is_file(), rel
                img = nib.load(root / rel)
                geometry.append((img.shape, img.affine))
            t1 = nib.load(root / row["img_path"].replace("/t2/", "/t1/").replace("_t2.", "_t1."))
            geometry.append((t1.shape, t1.affine))
            for shape, affine in geometry[1:]:
                assert shape == geometry[0][0]
                assert np.allclose(affine, geometry[0][1])
            assert geometry[0][0] == tuple(summary["shape"])
    assert summary["n_subjects"] == len(names)


def test_datalists(cohort):
    root, _ = cohort
    sizes = mdd.SIZES["tiny"]
    for set_name in ("IXI", *mdd.LESION_SETS):
        for contrast in ("t1", "t2"):
            path = root / "datalists" / f"{set_name}_{contrast}.json"
            text = path.read_text()
            content = json.loads(text)
            assert '\n    "training"' in text  # 4-space indent
            assert set(content) == {"training", "validation", "test"}
            assert len(content["training"]) == sizes["train"]
            if set_name == "IXI":
                assert len(content["validation"]) == sizes["val"]
                assert len(content["test"]) == sizes["test"]
            else:
                assert len(content["validation"]) == sizes["val"] + sizes["lesion_val"]
                assert len(content["test"]) == sizes["lesion_test"]
                assert sum("seg" in e for e in content["validation"]) == sizes["lesion_val"]
                assert all("seg" in e for e in content["test"])
            assert not any("seg" in e for e in content["training"])
            for section in content.values():
                for entry in section:
                    assert set(entry) <= {"image", "mask", "seg"} and {"image", "mask"} <= set(entry)
                    assert f"/{contrast}/" in entry["image"] and entry["image"].endswith(f"_{contrast}.nii.gz")
                    for value in entry.values():
                        assert value.startswith("../")
                        assert (path.parent / value).resolve().is_file(), value


def test_manifest_figure_and_no_temp_files(cohort):
    root, summary = cohort
    manifest = json.loads((root / mdd.MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["seed"] == SEED and manifest["size"] == "tiny"
    for rel in manifest["files"]:
        assert (root / rel).is_file(), rel
    png = root / "demo_cohort.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".")]
    assert not leftovers
    assert summary["bytes"] > 0 and summary["counts"]["IXI"]["train"] == mdd.SIZES["tiny"]["train"]


def test_refuses_foreign_non_empty_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        mdd.build_cohort(foreign, seed=0, size="tiny", progress=False)
    assert make_demo_data.main(["--out", str(foreign), "--size", "tiny", "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt"]


def test_previous_cohort_is_accepted(cohort):
    root, _ = cohort
    manifest = mdd._check_out_dir(root, overwrite=False)
    assert manifest is not None and manifest["generator"] == "make_demo_data"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        make_demo_data.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--size", "--overwrite", "tiny", "default", "large"):
        assert option in out
    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", "x", "--size", "huge"])
