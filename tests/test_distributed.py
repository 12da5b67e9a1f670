"""Many processes: inference and evaluation over ``torchrun`` ranks (gloo, 2 CPU processes) and over job-array shards
(``--shard "[i, n]"``, then a merge), each against the single-process run of the same cases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, TINY_GRID, bundle_parser, free_port, run_bundle, subprocess_env
from lib.benchmarking import process_tree
from lib.commands import bundle_command, command_configs
from uad.errors import InputError, input_error_message
from uad.sharding import shard_cases, shard_of

FIVE = 5  # cases: not divisible by the 2 ranks
COMMON = {**TINY_GRID, "num_workers": 0, "cpu_backend": "torch"}  # the shipped cDDPM on the tests' coarse grid


@pytest.fixture(scope="module")
def five_cases(demo_cohort, tmp_path_factory) -> Path:
    """A datalist whose test section has five healthy demo volumes with their brain masks."""
    images = sorted((demo_cohort / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:FIVE]
    test = [{"image": str(i), "mask": str(i).replace("/t2/", "/mask/").replace("_t2.", "_mask.")} for i in images]
    path = tmp_path_factory.mktemp("five") / "datalist.json"
    path.write_text(json.dumps({"test": test}))
    return path


def maps(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("[!.]*_anomaly_*.nii.gz"))}


def test_shards_deal_every_case_once():
    cases = [{"image": f"c{i}"} for i in range(7)]
    dealt = [shard_cases(cases, [i, 3]) for i in range(3)]
    assert [len(d) for d in dealt] == [3, 2, 2]
    assert sorted(c["image"] for d in dealt for c in d) == sorted(c["image"] for c in cases)  # none twice or missing
    assert dealt[1] == [cases[1], cases[4]] and shard_cases(cases, None) == cases == shard_cases(cases, [0, 1])
    for bad in ([2, 2], [-1, 2], [0, 0], [1], "0,2", [0.0, 2], [True, 2]):
        with pytest.raises(InputError, match="shard"):
            shard_of(bad)
    with pytest.raises(InputError, match=r"8 shards \(processes or tasks\) for 7 case\(s\): every shard needs a case"):
        shard_cases(cases, [0, 8])


def test_inference_over_two_ranks_equals_one_process(five_cases, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_bundle(
        "cddpm_bundle", command_configs("inference"), {**COMMON, "datalist": str(five_cases), "output_dir": str(one)}
    )
    configs = command_configs("inference", "multi_gpu_inference")
    run_bundle("cddpm_bundle", configs, {**COMMON, "datalist": str(five_cases), "output_dir": str(two)}, nproc=2)
    single, ranks = maps(one), maps(two)
    assert len(single) == 2 * FIVE and single.keys() == ranks.keys()  # a map and a mask per case, none twice
    for name, array in single.items():
        assert np.array_equal(array, ranks[name]), name  # to the bit


def evaluation(demo_cohort: Path, out: Path, **overrides) -> dict:
    """The Tumour set's evaluation into ``out``, its threshold beside it (not into the bundle's models/)."""
    threshold_file = str(out.with_name(f"{out.name}_thresholds.json"))
    common = {**COMMON, "dataset_dir": str(demo_cohort), "test_set": "Tumour", "threshold_file": threshold_file}
    return {**common, "output_dir": str(out), **overrides}


def test_evaluation_shards_merged_and_ranks_give_the_single_process_metrics(demo_cohort, tmp_path):
    configs = command_configs("evaluate")
    keep = ("thresholds", "summary", "pooled_test", "counts", "cases")
    run_bundle("cddpm_bundle", configs, evaluation(demo_cohort, tmp_path / "one"))
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())

    arrays = evaluation(demo_cohort, tmp_path / "shards")
    for i in range(2):
        run_bundle("cddpm_bundle", configs, {**arrays, "shard": [i, 2]})
        assert not (tmp_path / "shards" / "metrics.json").exists()  # a shard computes no metrics
    assert len(list((tmp_path / "shards" / "cases").glob("*.npz"))) == 6  # 2 + 2 validation, 2 test: each once
    run_bundle("cddpm_bundle", configs, {**arrays, "merge": True})
    merged = json.loads((tmp_path / "shards" / "metrics.json").read_text())
    assert {k: merged[k] for k in keep} == {k: single[k] for k in keep}

    ranks = evaluation(demo_cohort, tmp_path / "ranks")
    run_bundle("cddpm_bundle", command_configs("evaluate", "multi_gpu_evaluate"), ranks, nproc=2)
    gathered = json.loads((tmp_path / "ranks" / "metrics.json").read_text())
    assert {k: gathered[k] for k in keep} == {k: single[k] for k in keep}


def test_bad_shards_and_a_merge_of_other_runs_are_refused(demo_cohort, five_cases, tmp_path):
    configs = command_configs("evaluate")
    out = tmp_path / "eval"
    with pytest.raises(AssertionError) as error:
        run_bundle("cddpm_bundle", configs, evaluation(demo_cohort, out, shard=[2, 2]))
    assert "shard [2, 2]: the task index must be in [0, 2)" in input_error_message(error.value)
    with pytest.raises(AssertionError) as error:
        bad = {**COMMON, "datalist": str(five_cases), "output_dir": str(tmp_path / "maps"), "shard": [0, 9]}
        run_bundle("cddpm_bundle", command_configs("inference"), bad)
    assert "9 shards (processes or tasks) for 5 case(s)" in input_error_message(error.value)

    run_bundle("cddpm_bundle", configs, evaluation(demo_cohort, out, shard=[0, 2]))
    run_bundle("cddpm_bundle", configs, evaluation(demo_cohort, out, shard=[1, 2], seed=1))  # another run's settings
    with pytest.raises(AssertionError) as error:
        run_bundle("cddpm_bundle", configs, evaluation(demo_cohort, out, merge=True))
    assert re.search(r"case\(s\) not in .*cases with these weights and settings", input_error_message(error.value))
    assert not (out / "metrics.json").exists()  # nothing written


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
def test_distributed_overlays_shard_by_the_process_group(bundle, bundle_imports):
    """Outside a process group the overlays' shard is the whole run; the evaluation takes the same key."""
    bundle_imports(bundle)
    for command, overlay in (("inference", "multi_gpu_inference"), ("evaluate", "multi_gpu_evaluate")):
        parser = bundle_parser(bundle, *(c.removeprefix("configs/") for c in command_configs(command, overlay)))
        assert parser.get_parsed_content("shard") == [0, 1]
        assert parser.get_parsed_content("backend") == "gloo"
        assert "init_process_group(backend=@backend)" in parser["initialize"][0]
    evaluate = bundle_parser(bundle, "inference.json", "evaluate.json")
    assert evaluate["evaluation"]["shard"] == "@shard" and evaluate["evaluation"]["merge"] == "@merge"


def worker_ranks(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the live worker processes under a ``torchrun`` launcher (their ``RANK`` variable)."""
    ranks = {}
    for pid in process_tree(launcher)[1:]:
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            ranks.setdefault(int(env["RANK"]), pid)
    return ranks


def test_a_killed_rank_is_finished_by_the_rerun(demo_cohort, tmp_path):
    """SIGKILL one live rank once the first mask is written; torchrun stops the job; the same command then infers
    only the cases without outputs, and every case ends with its map and mask."""
    images = sorted((demo_cohort / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:7]
    test = [{"image": str(i), "mask": str(i).replace("/t2/", "/mask/").replace("_t2.", "_mask.")} for i in images]
    (tmp_path / "seven.json").write_text(json.dumps({"test": test}))
    out = tmp_path / "out"
    configs = command_configs("inference", "multi_gpu_inference")
    overrides = {**COMMON, "datalist": str(tmp_path / "seven.json"), "output_dir": str(out)}
    python, *command = bundle_command(configs, overrides)
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *command]
    env = {**subprocess_env(), "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        cmd, cwd=REPO / "cddpm_bundle", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline, killed = time.monotonic() + 300, None
    while launcher.poll() is None and time.monotonic() < deadline:
        ranks = worker_ranks(launcher.pid)
        if killed is None and list(out.glob("*_anomaly_mask.nii.gz")) and ranks:
            killed = ranks.get(1, next(iter(ranks.values())))
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    assert launcher.wait(timeout=60) != 0 and killed is not None, "no rank was killed mid-run"
    # finished cases only: a temporary the killed rank left (".<name>.tmp<pid>.nii.gz") is for the rerun to remove, and
    # a case is finished with its mask (written after its map: a map without a mask is inferred again)
    finished = [p.name.removesuffix("_anomaly_mask.nii.gz") for p in out.glob("[!.]*_anomaly_mask.nii.gz")]
    outputs = [out / f"{case}_anomaly_{kind}.nii.gz" for case in finished for kind in ("map", "mask")]
    done = {p.name: p.stat().st_mtime_ns for p in outputs}
    assert 0 < len(done) < 2 * 7  # some cases finished, not all
    rerun = subprocess.run(
        cmd[:4] + [f"--master_port={free_port()}"] + cmd[5:],
        cwd=REPO / "cddpm_bundle",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(maps(out)) == 2 * 7 and not list(out.glob(".*tmp*"))
    assert all(out.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in done.items())  # not inferred again
