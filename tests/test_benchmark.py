"""Baseline inferers and the benchmark scripts (tiny runs through the real bundle commands)."""

from __future__ import annotations

import json

import autoddpm_stages
import benchmark
import benchmark_speed
import numpy as np
import pytest
import smoothing_sweep
import torch
from lib.baselines import TemplateResidualInferer, mean_healthy_image
from monai.bundle import ConfigParser
from uad.errors import InputError
from uad.postprocessing import residual_anomaly_map
from uad.workflow import evaluate


def _volume(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((1, 1, 16, 16, 6)).astype(np.float32))
    mask = torch.zeros_like(image)
    mask[..., 3:13, 3:13, :] = 1
    return image * mask, mask


def test_intensity_baseline_is_the_masked_filtered_intensity():
    image, mask = _volume(0)
    anomaly, recon = TemplateResidualInferer()(image, None, mask=mask, return_reconstruction=True)
    assert not recon.any()
    torch.testing.assert_close(anomaly, residual_anomaly_map(image, torch.zeros_like(image), mask))


def test_mean_image_baseline_uses_the_mean_of_masked_healthy_images(tmp_path):
    volumes = [_volume(s) for s in range(3)]
    entries = [{"image": v[0][0], "mask": v[1][0]} for v in volumes]
    mean = mean_healthy_image(entries, lambda d: d)
    torch.testing.assert_close(mean, sum(v[0] for v in volumes) / 3)
    torch.save(mean, tmp_path / "mean.pt")
    image, mask = volumes[0]
    anomaly = TemplateResidualInferer(tmp_path / "mean.pt")(image, None, mask=mask)
    torch.testing.assert_close(anomaly, residual_anomaly_map(image, mean * mask, mask))
    smoothed = TemplateResidualInferer(tmp_path / "mean.pt", smooth_sigma=1.0)(image, None, mask=mask)  # mean_image_g3
    torch.testing.assert_close(smoothed, residual_anomaly_map(image, mean * mask, mask, smooth_sigma=1.0))
    assert not torch.allclose(smoothed, anomaly)
    with pytest.raises(ValueError, match="template shape"):
        TemplateResidualInferer(mean[..., :3])(image, None, mask=mask)
    with pytest.raises(ValueError, match="no healthy images"):
        mean_healthy_image([], lambda d: d)


def test_speed_benchmark_times_both_bundles(tmp_path):
    args = ["--demo", "--device", "cpu", "--train-batch", "2", "--slices", "1", "--iterations", "1"]
    args += ["--variants", "fp32", "--autoddpm-samplers", "ddim", "--out", str(tmp_path)]
    assert benchmark_speed.main(args) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["machine"]["cores"] >= 1 and report["command"].startswith("python ")
    rows = {r["bundle"]: r for r in report["rows"]}
    assert rows["cddpm"]["passes_per_slice"] == 3 and rows["autoddpm"]["passes_per_slice"] == 15
    assert all(r["train_s_per_iter"] > 0 and r["infer_s_per_slice"] > 0 for r in rows.values())
    assert "| cddpm |" in (tmp_path / "speed.md").read_text()


def test_speed_benchmark_on_the_mni152_brain_with_its_brain_boxes(tmp_path, capsys):
    volume, mask = benchmark_speed.mni152_volume(2.0, (96, 96, 3))  # the paper grid: the brain inside the slice
    assert volume.shape == mask.shape == (1, 1, 96, 96, 3) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(mask.mean()) < 0.8 and float(volume[mask > 0].min()) > 0 and float(volume.max()) <= 1
    args = ["--bundles", "cddpm", "--demo", "--device", "cpu", "--skip-training", "--slices", "2", "--volume"]
    args += ["mni152", "--brain-crop", "--cddpm-ensembles", "500", "--variants", "fp32", "--out", str(tmp_path)]
    assert benchmark_speed.main(args) == 0
    (row,) = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert row["setting"] == "ensemble 500" and row["passes_per_slice"] == 1 and row["infer_s_per_volume"] > 0
    assert row["brain_box"]
    overlay = [*args[: args.index("--brain-crop")], "--overlays", "paper_cpu", *args[args.index("--variants") :]]
    assert benchmark_speed.main(overlay) == 0  # the same setting, from the overlay the docs measure
    (row,) = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert row["setting"] == "configured noise levels" and row["passes_per_slice"] == 1 and row["brain_box"]
    assert "+ configs/paper_cpu.json" in (tmp_path / "speed.md").read_text()
    with pytest.raises(SystemExit) as error:
        benchmark_speed.main([*overlay[:-2], "--overlays", "no_such_overlay", "--out", str(tmp_path)])
    assert error.value.code == 2 and "no such overlay" in capsys.readouterr().err


def test_every_method_names_existing_bundle_configs():
    for key, method in benchmark.METHODS.items():
        for name in (*method.configs, *method.train_configs):
            assert (benchmark.BUNDLES[method.bundle] / "configs" / f"{name}.json").is_file(), key


def test_test_settings_reuse_the_training_and_change_existing_inference_keys():
    configs = {}
    for bundle, root in benchmark.BUNDLES.items():
        configs[bundle] = ConfigParser()
        configs[bundle].read_config([root / "configs" / f"{c}.json" for c in ("inference", "evaluate")])
    for key, method in benchmark.METHODS.items():
        for name in method.eval_overrides:  # a misspelt key would silently add an unused one
            assert name in configs[method.bundle], (key, name)
    for base, settings in (
        ("cddpm_efficient", benchmark.TEST_SETTINGS),
        ("autoddpm_efficient_fast", benchmark.AUTODDPM_TEST_SETTINGS),
        ("autoddpm_t800_m600", benchmark.AUTODDPM_T800_SETTINGS),
    ):
        for name, (_, keys) in settings.items():
            method, trained = benchmark.METHODS[f"{base}_{name}"], benchmark.METHODS[base]
            assert method.training == trained.training and method.overrides == trained.overrides and not method.curve
            assert method.eval_overrides == {**trained.eval_overrides, **keys}


def test_autoddpm_stages_score_each_stage_of_the_shipped_demo_model(demo_cohort, tmp_path):
    quick = {"ddim_mask_steps": 1, "ddim_resample_steps": 1, "resample_repeats": 1, "cpu_backend": "torch"}  # 2 passes
    args = ["--datalist", str(demo_cohort / "datalists" / "Tumour_t2.json"), "--max-cases", "1", "--out", str(tmp_path)]
    args += ["--ckpt", str(benchmark.BUNDLES["autoddpm"] / "models" / "model.pt"), "--overrides", json.dumps(quick)]
    assert autoddpm_stages.main([*args, "--settings", "{}", '{"mask_threshold": 10}']) == 0
    default, no_mask = json.loads((tmp_path / "autoddpm_stages.json").read_text())["rows"]
    assert 0 < default["mask_cover"] <= 1 and no_mask["mask_cover"] == 0  # no likelihood reaches 10: nothing masked
    for name in autoddpm_stages.STAGES:
        assert 0 < default[f"{name} AUPRC"] <= 1 and 0 <= default[f"{name} Dice"] <= 1, name
    for figure in ("Dice", "AUPRC"):  # the mask stage comes before the threshold; what follows it changes
        assert no_mask[f"stage 1 residual {figure}"] == default[f"stage 1 residual {figure}"]
    assert no_mask["final map AUPRC"] != default["final map AUPRC"]
    assert "stage 1 residual AUPRC" in (tmp_path / "autoddpm_stages.md").read_text()


def test_benchmark_trains_in_stages_and_reports(demo_cohort, tmp_path):
    """Baselines and a diffusion model at a budget of 1 iteration in 1 curve point, then a resumed rerun (the
    training-only overlays of other methods, e.g. cddpm_ema's ema.json, run in the bundle tests; stages resume as
    training does, tested there)."""
    args = ["--data", "demo", "--demo-data", str(demo_cohort), "--demo-sets", "Tumour", "--budget", "1"]
    args += ["--curve-points", "1", "--methods", "intensity", "mean_image", "ddpm", "--out", str(tmp_path)]
    assert benchmark.main(args) == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = report["rows"]
    assert sorted((r["key"], r["step"]) for r in rows) == [("ddpm", 1), ("intensity", 1), ("mean_image", 1)]
    assert all(0 <= r["auprc"] <= 1 and r["chance_auprc"] > 0 for r in rows)
    ddpm = rows[-1]
    assert ddpm["passes"] == 3 and ddpm["train_s_per_iter"] > 0 and ddpm["method"] == "DDPM (unconditioned)"
    assert (tmp_path / "demo_t2" / "ddpm" / "models" / "step_1.pt").is_file()
    assert "--amp auto" in (tmp_path / "demo_t2" / "ddpm" / "evaluate.log").read_text()  # bf16 only where native
    assert (tmp_path / "learning_curve_demo_t2.png").stat().st_size > 0
    assert (tmp_path / "example_maps_demo_t2_Tumour.png").stat().st_size > 0
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "## demo_t2 / Tumour" in markdown and "| mean healthy image |" in markdown
    # an interrupted run continues: everything is on file, so the rerun trains and evaluates nothing
    (tmp_path / "benchmark.md").unlink()
    assert benchmark.main(args) == 0
    assert json.loads((tmp_path / "benchmark.json").read_text())["rows"] == rows


def test_smoothing_sweep_scores_stored_maps_as_inference_would_smooth_them(tmp_path):
    """A sweep over an unsmoothed evaluation's cached maps gives, for each sigma, the figures of an evaluation whose
    inferer smoothed with that sigma (with the erosion and smallest component the evaluation recorded, not the
    defaults); smoothed maps, a broken cache, stale or mixed cases are clear errors."""
    shape, rng = (24, 24, 1), np.random.default_rng(8)
    brain = np.zeros(shape, dtype=np.float32)
    brain[3:21, 3:21] = 1
    volumes = {}
    for i in range(10):
        seg = np.zeros(shape, dtype=np.float32)
        if i % 5:  # 2 healthy cases, the rest with a lesion, some at the edge of the eroded brain
            x, y = rng.integers(5, 13, size=2)
            seg[x : x + 4, y : y + 4] = 1
        volumes[f"c{i}"] = ((0.5 + 0.3 * seg + rng.normal(0, 0.15, shape)) * brain, seg)

    def preprocessing(entry: dict) -> dict:
        image, seg = (torch.from_numpy(a.astype(np.float32))[None] for a in volumes[entry["name"]])
        return {"image": image, "mask": torch.from_numpy(brain)[None], **({"seg": seg} if seg.any() else {})}

    class Inferer:
        erosion_iterations, median_kernel = 2, 5  # not the default erosion: the sweep must read it

        def __init__(self, smooth_sigma: float) -> None:
            self.smooth_sigma = smooth_sigma

        def __call__(self, image, network, mask, return_reconstruction):
            recon = torch.full_like(image, 0.5) * mask
            return residual_anomaly_map(image, recon, mask, 2, 5, smooth_sigma=self.smooth_sigma), recon

    for name in volumes:  # the case cache names each case's files
        (tmp_path / name).write_text(name)

    def entries(names: tuple[str, ...]) -> list[dict]:
        files = {n: str(tmp_path / n) for n in names}
        return [{"image": files[n], "name": n, **({"seg": files[n]} if volumes[n][1].any() else {})} for n in names]

    val, test = entries(("c0", "c1", "c2", "c3")), entries(("c4", "c5", "c6", "c7", "c8", "c9"))
    expected = {}
    for sigma in (0.0, 1.5):
        out = tmp_path / f"eval_{sigma}"
        options = {"cache_key": "k", "n_overlays": 0, "min_component_size": 3}
        metrics = evaluate(torch.nn.Identity(), Inferer(sigma), preprocessing, val, test, out, **options)
        assert metrics["extra"]["postprocessing"] == {
            "erosion_iterations": 2,
            "median_kernel": 5,
            "smooth_sigma": sigma,
        }
        expected[sigma] = (metrics["validation_labelled"]["best_dice"], metrics["pooled_test"]["auprc"])
        expected[sigma] += (metrics["pooled_test"]["dice@best_dice_val"],)
    assert expected[0.0] != expected[1.5]
    cases = tmp_path / "eval_0.0" / "cases"
    args = [str(tmp_path / "eval_0.0"), "--sigmas", "0", "1.5", "--out", str(tmp_path / "sweep")]
    assert smoothing_sweep.main(args) == 0
    rows = json.loads((tmp_path / "sweep" / "smoothing_sweep.json").read_text())["rows"]
    for row, sigma in zip(rows, (0.0, 1.5), strict=True):
        assert (row["val_best_dice"], row["pooled_auprc"], row["pooled_dice"]) == pytest.approx(
            expected[sigma], abs=1e-6
        )
    assert sum(row.get("chosen") == "val best" for row in rows) == 1 and all(r["healthy_fp_px"] >= 0 for r in rows)
    with pytest.raises(InputError, match="smoothed already"):
        smoothing_sweep.main([str(tmp_path / "eval_1.5"), "--out", str(tmp_path / "sweep")])
    with pytest.raises(InputError, match="metrics.json"):
        smoothing_sweep.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "sweep")])
    first = next(cases.glob("c5-*.npz"))
    stale = first.with_name("c5-00000000.npz")
    stale.write_bytes(first.read_bytes())
    with pytest.raises(InputError, match="two cached cases named 'c5'"):
        smoothing_sweep.main(args)
    with np.load(first) as f:
        np.savez(stale, **{**dict(f), "cache_key": np.array("another run")})
    first.unlink()
    with pytest.raises(InputError, match="several runs"):
        smoothing_sweep.main(args)
    stale.unlink()
    with pytest.raises(InputError, match="not cached"):
        smoothing_sweep.main(args)
