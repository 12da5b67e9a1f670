"""The load benchmark on a small scale: one inference run over 8 tiny cases keeps its peak memory flat."""

from __future__ import annotations

import json

import benchmark_load
from conftest import TINY_GRID


def test_memory_stays_flat_over_many_cases(demo_cohort, tmp_path):
    overrides = json.dumps({**TINY_GRID, "cpu_backend": "torch"})
    argv = ["--cases", "8", "--marks", "3", "8", "--cohort", str(demo_cohort), "--work", str(tmp_path / "w")]
    result = benchmark_load.main([*argv, "--override", overrides, "--out", str(tmp_path / "report")])
    assert [m["cases"] for m in result["marks"]] == [3, 8]
    assert len(list((tmp_path / "w" / "maps").glob("*_anomaly_map.nii.gz"))) == 8
    assert abs(result["peak_growth"]) < 0.10 and abs(result["tree_peak_growth"]) < 0.10, result["marks"]
    assert result["cases_per_minute"] > 0 and (tmp_path / "report" / "load_cddpm.json").is_file()
