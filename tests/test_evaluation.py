"""Metrics, threshold calibration and the end-to-end evaluation of anomaly maps."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric
from sklearn.metrics import average_precision_score, roc_auc_score
from uad.calibration import best_dice_calibration, fpr_threshold
from uad.metrics import (
    average_precision,
    best_dice,
    dice,
    l1_ratio,
    reconstruction_metrics,
    remove_small_components,
    roc_auc,
    slice_detection_auroc,
    summarise,
    volume_metrics,
)
from uad.workflow import evaluate_cases, evaluate_sets, set_outputs

SHAPE = (24, 24, 8)


def _score_cases():
    """(scores, labels) pairs: continuous, heavily tied, and tied across classes."""
    rng = np.random.default_rng(0)
    cases = []
    for n, prevalence in [(200, 0.1), (1000, 0.3), (57, 0.5)]:
        labels = rng.random(n) < prevalence
        labels[:2] = [True, False]
        scores = rng.random(n) + 0.5 * labels
        cases += [(scores, labels), (np.round(scores, 1), labels), (np.floor(scores * 3), labels)]
    cases.append((np.array([0.5, 0.5, 0.5, 0.2]), np.array([1, 0, 1, 0])))
    return cases


@pytest.mark.parametrize("scores, labels", _score_cases())
def test_average_precision_and_auroc_match_sklearn(scores, labels):
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("scores, labels", _score_cases())
def test_best_dice_matches_brute_force(scores, labels):
    brute = max(dice(scores >= t, labels) for t in np.unique(scores))
    threshold, best = best_dice(scores, labels)
    assert best == pytest.approx(brute, abs=1e-12)
    assert dice(scores > threshold, labels) == pytest.approx(best, abs=1e-12)


def test_metrics_without_positives_are_nan():
    scores, labels = np.arange(5.0), np.zeros(5)
    assert math.isnan(average_precision(scores, labels))
    assert math.isnan(roc_auc(scores, labels))
    assert all(math.isnan(v) for v in best_dice(scores, labels))


def test_dice_hand_cases():
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert dice([1, 1, 0], [1, 1, 0]) == 1.0
    assert dice([0, 0], [1, 0]) == 0.0
    assert dice([0, 0], [0, 0]) == 1.0  # both empty: defined as perfect agreement
    assert dice(np.array([[2, 0], [0, 0]]), np.array([[True, False], [False, True]])) == pytest.approx(2 / 3)


def test_remove_small_components_sizes_and_26_connectivity():
    binary = np.zeros((20, 20, 20), dtype=bool)
    binary[1:3, 1:3, 1:3] = True  # 8 voxels: kept
    binary[10:12, 1:3, 1:3] = True
    binary[11, 2, 2] = False  # 7 voxels: removed
    for i in range(8):  # 8 voxels touching only at corners: one component under 26-connectivity
        binary[5 + i, 10 + i, 5 + i] = True
    out = remove_small_components(binary, min_size=8)
    assert out[1:3, 1:3, 1:3].all()
    assert not out[10:12, 1:3, 1:3].any()
    assert all(out[5 + i, 10 + i, 5 + i] for i in range(8))
    assert out.sum() == 16
    assert remove_small_components(binary, min_size=9).sum() == 0
    assert remove_small_components(binary, min_size=1).sum() == 23  # 1 keeps every component


def _brain(shape=SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid[0] ** 2 + grid[1] ** 2) < 0.8
    brain[..., 0] = False  # one slice without brain
    return brain


def test_fpr_threshold_reaches_requested_rate_on_healthy_data():
    rng = np.random.default_rng(1)
    masks = [_brain() for _ in range(3)]
    maps = [rng.random(SHAPE) * m + 100.0 * ~m for m in masks]  # outside-brain values must be ignored
    pooled = np.concatenate([a[m] for a, m in zip(maps, masks, strict=True)])
    for fpr in (0.01, 0.05, 0.10):
        threshold = fpr_threshold(maps, masks, fpr)
        assert fpr - 1.0 / pooled.size <= np.mean(pooled > threshold) <= fpr


def test_best_dice_calibration_separates_constructed_case():
    rng = np.random.default_rng(2)
    masks, segs, maps = [], [], []
    for _ in range(2):
        brain = _brain()
        seg = np.zeros(SHAPE, dtype=bool)
        seg[8:13, 8:13, 3:6] = True
        masks.append(brain)
        segs.append(seg)
        maps.append(np.where(seg, rng.uniform(0.6, 1.0, SHAPE), rng.uniform(0.0, 0.4, SHAPE)) * brain)
    best = best_dice_calibration(maps, segs, masks)
    assert best["dice"] == 1.0 and best["auprc"] == 1.0
    threshold = best["threshold"]
    healthy_max = max(a[m & ~s].max() for a, m, s in zip(maps, masks, segs, strict=True))
    assert healthy_max <= threshold < 0.6
    for a, m, s in zip(maps, masks, segs, strict=True):
        assert volume_metrics(a, s, m, {"t": threshold})["dice@t"] == 1.0


def test_volume_metrics_perfect_and_random_maps():
    rng = np.random.default_rng(3)
    shape = (40, 40, 20)
    brain = np.ones(shape, dtype=bool)
    seg = np.zeros(shape, dtype=bool)
    seg[5:15, 5:15, 5:10] = True
    perfect = volume_metrics(seg.astype(float), seg, brain, {"half": 0.5})
    assert perfect["dice@half"] == 1.0 and perfect["auprc"] == 1.0 and perfect["auroc"] == 1.0
    assert perfect["oracle_dice"] == 1.0 and perfect["fpr@half"] == 0.0

    seg = rng.random(shape) < 0.1
    noise = volume_metrics(rng.random(shape), seg, brain, {})
    assert noise["auprc"] == pytest.approx(seg.mean(), abs=0.01)
    assert noise["auroc"] == pytest.approx(0.5, abs=0.02)


def test_volume_metrics_healthy_volume_reports_false_positive_rate():
    brain = _brain()
    amap = np.zeros(SHAPE)
    amap[5:8, 5:8, 2:4] = 1.0  # 18-voxel false positive
    amap[15, 15, 5] = 1.0  # single voxel: removed as a small component
    row = volume_metrics(amap, None, brain, {"t": 0.5})
    assert all(math.isnan(row[k]) for k in ("dice@t", "auprc", "auroc", "oracle_dice"))
    assert row["fpr@t"] == pytest.approx(18 / brain.sum())
    assert row["n_lesion_voxels"] == 0


def test_slice_detection_auroc():
    brain = _brain()
    seg = np.zeros(SHAPE, dtype=bool)
    seg[10:14, 10:14, 3:5] = True
    amap = np.full(SHAPE, 0.1) * brain
    amap[..., 3:5] += 0.5 * brain[..., 3:5]
    amap[..., 0] = 5.0  # no brain in slice 0: skipped, so it cannot count as a false positive
    assert slice_detection_auroc([amap, amap * 0.5], [brain, brain], [seg, None]) == 1.0
    amap[..., 7] = 0.9 * brain[..., 7]  # a healthy slice above the lesion slices
    assert slice_detection_auroc([amap], [brain], [seg]) == pytest.approx(1 - 1 / 5)


def test_reconstruction_metrics():
    rng = np.random.default_rng(4)
    brain = _brain()
    image = rng.random(SHAPE) * brain
    perfect = reconstruction_metrics(image, image, brain)
    assert perfect["l1"] == 0.0 and perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == math.inf

    shifted = reconstruction_metrics(image, image + 0.1, brain)
    assert shifted["l1"] == pytest.approx(0.1) and shifted["psnr"] == pytest.approx(20.0)

    recon = np.clip(image + rng.normal(0, 0.1, SHAPE), 0, 1)

    def as_slices(volume):  # (H, W, D) -> (D - 1, 1, H, W), dropping slice 0 (no brain)
        return torch.from_numpy(volume * brain).permute(2, 0, 1)[1:, None].float()

    reference = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5)(
        as_slices(recon), as_slices(image)
    )
    assert reconstruction_metrics(image, recon, brain)["ssim"] == pytest.approx(reference.mean().item(), abs=1e-5)


def test_l1_ratio_and_summarise():
    brain = np.ones((4, 4, 2), dtype=bool)
    seg = np.zeros_like(brain)
    seg[0, 0, 0] = True
    residual = np.full(brain.shape, 0.1)
    residual[0, 0, 0] = 0.5
    assert l1_ratio(residual, seg, brain) == pytest.approx(5.0)
    assert math.isnan(l1_ratio(residual, np.zeros_like(seg), brain))

    summary = summarise([{"name": "a", "dice": 0.2}, {"name": "b", "dice": math.nan}, {"name": "c", "dice": 0.6}])
    assert "name" not in summary
    assert summary["dice"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.2), "n": 2}


def _case(name: str, rng: np.random.Generator, lesion: bool, seg_given: bool = True) -> dict:
    brain = _brain()
    seg = np.zeros(SHAPE, dtype=bool)
    if lesion:
        x, y = rng.integers(7, 14, size=2)
        seg[x : x + 4, y : y + 4, 3:6] = True
    image = 0.5 * brain + 0.4 * seg
    recon = np.clip(0.5 * brain + rng.normal(0, 0.02, SHAPE), 0, 1) * brain
    amap = (rng.random(SHAPE) * 0.3 + 0.5 * seg) * brain
    return {
        "name": name,
        "image": image,
        "reconstruction": recon,
        "anomaly_map": amap,
        "mask": brain,
        "seg": seg if seg_given else None,
    }


@pytest.fixture
def cohort():
    rng = np.random.default_rng(5)
    val = [_case(f"val_lesion{i}", rng, True) for i in range(2)]
    val += [_case(f"val_healthy{i}", rng, False, seg_given=i == 0) for i in range(2)]
    test = [_case(f"test{i}", rng, True) for i in range(3)] + [_case("test_healthy", rng, False, seg_given=False)]
    return val, test


def test_evaluate_cases_end_to_end(cohort, tmp_path):
    val, test = cohort
    metrics = evaluate_cases(val, test, tmp_path, n_overlays=2)
    for name in ("metrics.json", "per_volume.csv", "pr_curve.png", "thresholds.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]

    saved = json.loads((tmp_path / "metrics.json").read_text())
    thresholds = json.loads((tmp_path / "thresholds.json").read_text())
    assert set(saved["thresholds"]) == {"best_dice_val", "fpr_1", "fpr_5", "fpr_10"}
    assert thresholds["method"] == saved["threshold_method"] == "best_dice_val"
    assert thresholds["thresholds"] == saved["thresholds"] == pytest.approx(metrics["thresholds"])
    assert thresholds["threshold"] == saved["thresholds"]["best_dice_val"]
    assert saved["cases"]["best_dice_calibration"] == ["val_lesion0", "val_lesion1"]
    assert saved["cases"]["fpr_calibration"] == ["val_healthy0", "val_healthy1"]
    assert saved["counts"] == {"val_labelled": 2, "val_healthy": 2, "test": 4, "test_with_lesion": 3}
    assert saved["summary"]["dice@best_dice_val"]["n"] == 3
    assert saved["summary"]["fpr@fpr_5"]["n"] == 4
    assert saved["summary"]["auprc"]["mean"] > 0.9
    assert saved["slice_auroc"] > 0.9
    assert saved["reconstruction_healthy_val"]["ssim"]["n"] == 2

    lines = (tmp_path / "per_volume.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("name,dice@best_dice_val")


def test_evaluate_cases_never_uses_test_labels(cohort, tmp_path):
    val, test = cohort
    first = evaluate_cases(val, test, tmp_path / "a", n_overlays=0)
    flipped = [{**c, "seg": None if c["seg"] is None else ~c["seg"]} for c in test]
    second = evaluate_cases(val, flipped, tmp_path / "b", n_overlays=0)
    assert first["thresholds"] == second["thresholds"]
    assert first["summary"]["dice@best_dice_val"] != second["summary"]["dice@best_dice_val"]


def test_evaluate_cases_with_one_kind_of_validation_case(cohort, tmp_path, caplog):
    val, test = cohort
    with caplog.at_level(logging.WARNING):
        label_free = evaluate_cases(val[2:], test, tmp_path / "healthy_only", n_overlays=0)
    assert "best-Dice threshold NOT calibrated" in caplog.text
    saved = json.loads((tmp_path / "healthy_only" / "thresholds.json").read_text())
    assert saved["method"] == "fpr_5" and saved["threshold"] == label_free["thresholds"]["fpr_5"]
    assert "dice@best_dice_val" not in label_free["summary"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        labelled_only = evaluate_cases(val[:2], test, tmp_path / "labelled_only", n_overlays=0)
    assert "FPR thresholds NOT calibrated" in caplog.text
    assert set(labelled_only["thresholds"]) == {"best_dice_val"}

    stale = tmp_path / "labelled_only"
    none = evaluate_cases([], test, stale, n_overlays=0)
    assert none["thresholds"] == {} and not (stale / "thresholds.json").exists()
    assert none["summary"]["auprc"]["n"] == 3


def test_evaluate_sets_calibrates_each_set_and_infers_shared_healthy_volumes_once(tmp_path):
    def preprocessing(entry: dict) -> dict:
        image, mask = torch.full((1, *SHAPE), 0.5), torch.ones(1, *SHAPE)
        out = {"image": image, "mask": mask}
        if "seg" in entry:
            out["seg"] = torch.zeros(1, *SHAPE)
            out["seg"][:, 8:14, 8:14, 2:6] = 1
            out["image"] = image + entry["contrast"] * out["seg"]
        return out

    inferred = []

    def inferer(image, network, mask, return_reconstruction):
        inferred.append(image.sum().item())
        recon = torch.full_like(image, 0.45)  # not perfect: finite PSNR
        return (image - recon).abs() * mask, recon

    healthy = [{"image": f"h{i}", "name": f"h{i}"} for i in range(2)]

    def lesions(prefix: str, contrast: float) -> list[dict]:
        return [{"image": f"{prefix}{i}", "name": f"{prefix}{i}", "seg": "s", "contrast": contrast} for i in range(2)]

    sets = {
        "A": (lesions("va", 0.4) + healthy, lesions("ta", 0.4)),
        "B": (lesions("vb", 0.2) + healthy, lesions("tb", 0.2)),
    }
    options = {"fprs": (0.05,), "min_component_size": 1, "n_overlays": 0}
    results = evaluate_sets(
        torch.nn.Identity(), inferer, preprocessing, sets, tmp_path / "eval", tmp_path / "t.json", **options
    )
    assert len(inferred) == 10  # 2 healthy + 2 x (2 labelled val + 2 test): the healthy ones once, not twice
    for name, metrics in results.items():
        assert metrics["counts"] == {"val_labelled": 2, "val_healthy": 2, "test": 2, "test_with_lesion": 2}
        written = json.loads((tmp_path / "eval" / name / "metrics.json").read_text())
        assert written["thresholds"] == metrics["thresholds"]
        stored = json.loads((tmp_path / f"t_{name}.json").read_text())
        assert stored["threshold"] == metrics["thresholds"]["best_dice_val"]
        assert metrics["cases"]["best_dice_calibration"] == [f"v{name.lower()}0", f"v{name.lower()}1"]  # own split
    assert set_outputs(tmp_path, tmp_path / "t.json", "A", True) == (tmp_path / "A", str(tmp_path / "t_A.json"))
    assert set_outputs(tmp_path, "", "A", True) == (tmp_path / "A", None)
    assert set_outputs(tmp_path, tmp_path / "t.json", "A", False) == (tmp_path, str(tmp_path / "t.json"))
    one = evaluate_sets(
        torch.nn.Identity(), inferer, preprocessing, {"A": sets["A"]}, tmp_path / "one", None, **options
    )
    assert set(one) == {"A"} and (tmp_path / "one" / "metrics.json").is_file()  # one set: output_dir itself
