"""Interrupted work resumes and leaves nothing half-written: real bundle runs killed with SIGKILL, then run again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CDDPM_NETS, TINY_GRID, TINY_RUN, subprocess_env
from lib.commands import bundle_command
from uad.files import atomic_output, atomic_path, remove_stale_temporaries


def run_until(cmd: list[str], cwd: Path, stop: Callable[[str], bool] | None = None, timeout: float = 300):
    """Run ``cmd``; SIGKILL it as soon as ``stop(output so far)`` is true (polled). Returns (exit code, output)."""
    env = {**subprocess_env(), "PYTHONUNBUFFERED": "1"}  # its log lines as they are written
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True)
    reader.start()
    start = time.monotonic()
    while proc.poll() is None:
        if stop is not None and stop("".join(chunks)):
            proc.send_signal(signal.SIGKILL)
            break
        if time.monotonic() - start > timeout:
            proc.kill()
            raise TimeoutError("".join(chunks)[-3000:])
        time.sleep(0.02)
    code = proc.wait()
    reader.join()
    return code, "".join(chunks)


def logged_iterations(log: str, per_epoch: int = 4) -> list[int]:
    """The iterations whose loss a run logged (``Epoch: e/E, Iter: i/I -- train_loss``), counted over epochs."""
    return [
        (int(e) - 1) * per_epoch + int(i)
        for e, i in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss", log)
    ]


def loss_steps(log_dir: Path) -> list[list[int]]:
    """The iterations at which each TensorBoard event file in ``log_dir`` (a run each, oldest first) logged the loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for path in sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if "train_loss" in events.Tags()["scalars"]:  # the trainer's writer (the validator has its own)
            runs.append([e.step for e in events.Scalars("train_loss")])
    return runs


def test_training_killed_mid_epoch_resumes_to_the_same_iteration_count(demo_cohort, tmp_path):
    """Killed in the middle of epoch 2 (SIGKILL: no handler runs), the same command continues from the epoch-1
    checkpoint: the loss curve goes on from the first iteration of epoch 2 and ends at epochs x iterations."""
    models, logs = tmp_path / "models", tmp_path / "logs"
    overrides = {**TINY_RUN, **TINY_CDDPM_NETS, "epochs": 3, "batch_size": 1, "val_interval": 1}  # 4 steps an epoch
    overrides.update({"dataset_dir": str(demo_cohort), "ckpt_dir": str(models), "output_dir": str(logs)})
    cmd = bundle_command(["configs/train.json", "configs/demo.json"], overrides)
    code, first = run_until(cmd, REPO / "cddpm_bundle", stop=re.compile(r"Epoch: 2/3, Iter: 1/4").search)
    assert code == -signal.SIGKILL, first[-3000:]
    assert (models / "checkpoint_checkpoint_epoch=1.pt").is_file()
    assert not (models / "checkpoint_checkpoint_epoch=2.pt").exists()
    code, second = run_until(cmd, REPO / "cddpm_bundle")
    assert code == 0, second[-3000:]
    assert "resuming training from" in second and "Epoch: 1/3" not in second
    state = torch.load(models / "checkpoint_checkpoint_epoch=3.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 * 4 and state["trainer"]["epoch_length"] == 4
    killed, resumed = logged_iterations(first), logged_iterations(second)
    assert killed[:5] == [1, 2, 3, 4, 5] and resumed == list(range(5, 13))  # epoch 2 again, from its first iteration
    assert loss_steps(logs)[-1] == resumed  # the resumed run's TensorBoard curve too
    assert not list(models.glob(".*tmp*"))  # ignite's atomic saves left nothing behind after the kill


@pytest.fixture(scope="module")
def many_cases(demo_cohort, tmp_path_factory) -> Path:
    """A datalist of 5 test cases (the demo test volumes, each listed under several names)."""
    folder = tmp_path_factory.mktemp("many")
    sources = sorted((demo_cohort / "Test").glob("*/t2/*.nii.gz"))
    assert sources
    entries = []
    for i in range(5):
        src = sources[i % len(sources)]
        image = folder / f"case{i}_t2.nii.gz"
        os.symlink(src, image)
        entries.append({"image": str(image)})
    (folder / "datalist.json").write_text(json.dumps({"test": entries}))
    return folder / "datalist.json"


def test_inference_killed_leaves_no_partial_file_and_resumes(many_cases, tmp_path):
    """SIGKILL as soon as the first map is written; every file under a final name is complete, and the same command
    infers only the cases left (the written ones keep their bytes), removing the killed run's temporary files."""
    out = tmp_path / "out"
    overrides = {**TINY_GRID, "datalist": str(many_cases), "output_dir": str(out), "num_workers": 0}
    cmd = bundle_command(["configs/inference.json", "configs/demo.json"], {**overrides, "cpu_backend": "torch"})
    code, first = run_until(cmd, REPO / "cddpm_bundle", stop=lambda _: any(out.glob("*_anomaly_mask.nii.gz")))
    assert code == -signal.SIGKILL, first[-3000:]
    written = {p.name: p.read_bytes() for p in out.glob("*_anomaly_*.nii.gz")}
    assert 0 < len(written) < 10
    for name in written:
        array = np.asarray(nib.load(out / name).dataobj)  # a partial gzip stream would fail here
        assert array.ndim == 3 and np.isfinite(array).all()
    stale = out / f".case4_t2_anomaly_map.tmp{2**22 + 1}.nii.gz"  # as a killed writer leaves it
    stale.write_bytes(b"partial")
    code, second = run_until(cmd, REPO / "cddpm_bundle")
    assert code == 0, second[-3000:]
    finished = {n.split("_anomaly_")[0] for n in written if n.endswith("_anomaly_mask.nii.gz")}
    assert f"{len(finished)} of 5 case(s) already have their outputs" in second
    assert sorted(p.name for p in out.glob("*_anomaly_map.nii.gz")) == [
        f"case{i}_t2_anomaly_map.nii.gz" for i in range(5)
    ]
    assert len(list(out.glob("*_anomaly_mask.nii.gz"))) == 5 and not stale.exists()
    assert all((out / n).read_bytes() == data for n, data in written.items() if n.split("_anomaly_")[0] in finished)


def test_atomic_output_under_the_final_name_and_the_leftovers_of_killed_writers(tmp_path):
    """``keep_name`` stages the file under its own name (TorchScript records it); a failed write keeps the old file;
    only temporaries of processes that no longer run are removed, files and folders."""
    target = tmp_path / "model.ts"
    with atomic_output(target, keep_name=True) as staged:
        assert staged.name == "model.ts" and staged.parent.parent == tmp_path
        staged.write_text("archive")
    assert target.read_text() == "archive" and [p.name for p in tmp_path.iterdir()] == ["model.ts"]
    with pytest.raises(RuntimeError), atomic_output(target, keep_name=True) as staged:
        staged.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "archive" and [p.name for p in tmp_path.iterdir()] == ["model.ts"]
    dead = 2**22 + 1  # above the kernel's largest pid
    folder, file = tmp_path / f".model.tmp{dead}.ts", tmp_path / f".model.tmp{dead}.pt"
    folder.mkdir()
    (folder / "model.ts").write_text("half")
    file.write_text("half")
    running = atomic_path(tmp_path / "model.pt")
    running.write_text("being written")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([folder, file])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.ts", running.name])


def test_pending_cases_skips_done_cases_of_the_same_run_key_unless_overwrite(tmp_path):
    from uad.data import pending_cases

    out = tmp_path / "out"
    entries = []
    for i in range(3):
        (tmp_path / f"c{i}.nii.gz").write_bytes(b"input")
        entries.append({"image": str(tmp_path / f"c{i}.nii.gz")})
    assert pending_cases(entries, out, key="w1") == entries  # nothing written yet; the run key is stored
    for name in ("c0_anomaly_map", "c1_anomaly_map", "c1_anomaly_mask"):
        (out / f"{name}.nii.gz").write_bytes(b"output")
    assert pending_cases(entries, out, key="w1") == [entries[2]]
    assert pending_cases(entries, out, threshold=0.1, key="w1") == [entries[0], entries[2]]  # c0 lacks its mask
    assert pending_cases(entries, out, threshold=0.1, overwrite=True, key="w1") == entries
    later = time.time() + 60
    os.utime(entries[1]["image"], (later, later))  # an input written again after its outputs
    assert pending_cases(entries, out, key="w1") == [entries[1], entries[2]]
    assert pending_cases(entries, out, key="w2") == entries  # other weights or settings: all again


def test_evaluation_cases_are_cached_per_weights_and_settings(tmp_path):
    """``collect_cases`` infers a case once per cache key; another key (other weights or settings) or ``recompute``
    infers again."""
    from uad.workflow import collect_cases

    calls = []

    def inferer(image, network, mask, return_reconstruction):
        calls.append(1)
        return image * mask + 0.1 * mask, image

    def preprocessing(entry):
        image = torch.zeros(1, 8, 8, 4)
        image[:, 2:6, 2:6] = float(entry["name"][-1]) + 1
        return {"image": image, "mask": (image > 0).float()}

    entries = []
    for i in range(3):
        (tmp_path / f"c{i}.nii.gz").write_bytes(b"input")  # the cache names a case by its files' paths and stats
        entries.append({"image": str(tmp_path / f"c{i}.nii.gz"), "name": f"c{i}"})
    cache = tmp_path / "cases"
    net = torch.nn.Identity()
    first = collect_cases(entries, preprocessing, inferer, net, "cpu", cache_dir=cache, cache_key="w1")
    again = collect_cases(entries, preprocessing, inferer, net, "cpu", cache_dir=cache, cache_key="w1")
    assert len(calls) == 3 and len(list(cache.glob("*.npz"))) == 3
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in ("image", "anomaly_map"))
    collect_cases(entries, preprocessing, inferer, net, "cpu", cache_dir=cache, cache_key="w2")
    collect_cases(entries, preprocessing, inferer, net, "cpu", cache_dir=cache, cache_key="w2", recompute=True)
    assert len(calls) == 9
