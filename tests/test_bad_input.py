"""The bad-input matrix: each row is a kind of input a user may give, run through every bundle command it applies to.

Errors come from the start-up pass over the data (``uad.data.check_cases``, the first step of each config's
``initialize``) or, for what only shows once a case is loaded, from the pipeline; either way the project's own message
ends the traceback (``uad.errors``) and nothing is written. ``MATRIX`` is also the table in ``docs/reliability.md``
(``test_reliability_table_is_the_matrix`` keeps the two equal).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_GRID, subprocess_env
from lib.commands import bundle_command, command_configs
from PIL import Image

BUNDLES = ("cddpm_bundle", "autoddpm_bundle")
COMMANDS = ("train", "inference", "evaluate")
SHAPE = (24, 24, 8)
AFFINE = np.diag([4.0, 4.0, 8.0, 1.0])  # 96 x 96 x 64 mm: a brain of 16 x 16 x 10 voxels on the tests' 6 mm grid


@dataclass(frozen=True)
class Row:
    """One row of the matrix: what the user gives, what they see, and where it is checked."""

    id: str
    given: str
    seen: str
    commands: tuple[str, ...]
    expect: str = ""  # regex of the project's message (an error), or of the warning when ``warns``
    warns: bool = False
    test: str = "test_bad_input_in_every_command"


MATRIX = [
    Row(
        "missing_file",
        "an image, mask or segmentation path that does not exist",
        "error naming the file: `image file not found: <path>`",
        COMMANDS,
        r"image file not found: .*lost_t2\.nii\.gz",
    ),
    Row(
        "not_an_image",
        "a file that is not an image (text named `.nii.gz`)",
        "error: `<file>: not a readable image`",
        COMMANDS,
        r"notes\.nii\.gz: not a readable image",
    ),
    Row(
        "other_format",
        "a file of another format (`.txt`)",
        "error: `<file>: unsupported image format (expected one of .nii.gz, .nii, .png)`",
        COMMANDS,
        r"scan\.txt: unsupported image format",
    ),
    Row(
        "volume_4d",
        "a 4D volume (a series)",
        "error: `<file>: expected a 2D or 3D image, got shape (…) (a 4D series?)`",
        COMMANDS,
        r"series_t2\.nii\.gz: expected a 2D or 3D image, got shape \(24, 24, 8, 3\)",
    ),
    Row(
        "shape_mismatch",
        "image and mask of different shapes",
        "error: `<mask>: mask shape (…) does not match image <image> (…)`",
        COMMANDS,
        r"short_mask\.nii\.gz: mask shape \(24, 24, 7\) does not match",
    ),
    Row(
        "affine_mismatch",
        "image and mask of different geometry (affine)",
        "error: `<mask>: mask geometry (affine) does not match image <image>`",
        COMMANDS,
        r"moved_mask\.nii\.gz: mask geometry \(affine\) does not match",
    ),
    Row(
        "constant_image",
        "an all-zero or constant image",
        "error: `<file>: constant image (every voxel is 0.0): nothing to reconstruct`",
        COMMANDS,
        r"blank_t2\.nii\.gz: constant image",
    ),
    Row(
        "nan_voxels",
        "NaN or Inf voxels",
        "error: `<file>: image contains NaN or infinite values (N voxels)`",
        COMMANDS,
        r"nan_t2\.nii\.gz: image contains NaN or infinite values \(2 voxels\)",
    ),
    Row(
        "empty_mask",
        "an empty brain mask",
        "error: `<mask>: brain mask is empty (no voxel > 0)`",
        COMMANDS,
        r"empty_mask\.nii\.gz: brain mask is empty",
    ),
    Row(
        "soft_mask",
        "a brain mask that is not binary (a probability map)",
        "error: `<mask>: brain mask is not binary (values from 0 to 0.9; …)`",
        COMMANDS,
        r"soft_mask\.nii\.gz: brain mask is not binary",
    ),
    Row(
        "seg_labels",
        "a segmentation with labels other than 0/1 (e.g. BraTS 1, 2, 4)",
        "warning naming the file and labels; binarised (every label > 0 is lesion)",
        ("evaluate",),
        r"labels_seg\.nii\.gz: segmentation labels \['1', '2', '4'\] binarised",
        warns=True,
    ),
    Row(
        "csv_missing_columns",
        "a split CSV without the `mask_path` column",
        "error: `<csv>: missing column(s) ['mask_path']; expected [...]`",
        COMMANDS,
        r"\.csv: missing column\(s\) \['mask_path'\]",
    ),
    Row(
        "csv_duplicate_rows",
        "a split CSV that lists a case twice",
        "error: `<csv>, line N: duplicate row, <path> is on line M too`",
        COMMANDS,
        r"\.csv, line 3: duplicate row",
    ),
    Row(
        "csv_outside_path",
        "a split CSV path outside the data folder (`../`)",
        "error: `<csv>, line N: img_path <path> lies outside the data folder <root>`",
        COMMANDS,
        r"\.csv, line 2: img_path \.\./elsewhere/x_t2\.nii\.gz lies outside the data folder",
    ),
    Row(
        "shared_subject",
        "the same subject in training and validation, or test and training",
        "warning: `N case(s) are in both the <split> and the <split> split (…): results on them are not held out`",
        ("train", "evaluate"),
        r"1 case\(s\) are in both the .* split \(case0_t2\)",
        warns=True,
    ),
    Row(
        "empty_split",
        "an empty data set or split (a CSV with its header only)",
        "error: `<csv>: no cases (empty data set)`",
        COMMANDS,
        r"\.csv: no cases \(empty data set\)",
    ),
    Row(
        "missing_section",
        "a datalist without the section a command reads",
        "error: `<datalist>: no section '<name>'; sections present: [...]`",
        COMMANDS,
        r"datalist\.json: no section '(training|validation|test)'",
    ),
    Row(
        "same_name",
        "two inputs of one case name in different folders (outputs would overwrite each other)",
        "error: `<file>: same case name '<name>' as <other file>; the outputs would overwrite each other`",
        ("inference",),
        r"other/lesion1_t2\.nii\.gz: same case name 'lesion1_t2' as .*data/lesion1_t2\.nii\.gz",
    ),
    Row(
        "empty_validation",
        "an empty validation list (MONAI Label's train task with `val_split` 0)",
        "warning: `the validation split has no cases: it is skipped`; training keeps its final weights as `model.pt`",
        ("train",),
        test="test_an_empty_validation_list_is_skipped_with_a_warning",
    ),
    Row(
        "missing_dataset_dir",
        "a `dataset_dir` that does not exist",
        "error: `dataset_dir not found: <path>`",
        COMMANDS,
        r"dataset_dir not found: .*nowhere",
    ),
    Row(
        "volume_on_2d_grid",
        "a 3D volume with the 2D protocol (`image_size` depth 1)",
        "error: `<file>: a volume of N slices on a one-slice grid (…)`",
        ("inference",),
        r"lesion1_t2\.nii\.gz: a volume of \d+ slices on a one-slice grid",
        test="test_volume_on_one_slice_grid_is_refused_on_the_last_line",
    ),
    Row(
        "png_slices",
        "2D PNG slices with the 3D configs (`inference.json` + `demo.json`)",
        "works: a one-slice input keeps the 2D protocol (depth 1); the map is non-zero in the brain",
        ("inference",),
        test="test_png_slice_gets_the_2d_protocol",
    ),
    Row(
        "zero_map",
        "an anomaly map that is zero everywhere in the brain (a grid that does not fit)",
        "cDDPM: error, nothing written: `<file>: the anomaly map is zero everywhere inside the brain mask (…)`; "
        "AutoDDPM, whose map is zero when stage 1 flags nothing: a warning",
        ("inference", "evaluate"),
        test="test_zero_or_non_finite_maps_are_refused",
    ),
    Row(
        "z_scored",
        "z-scored intensities (negative values, as many public sets ship)",
        "works: the same map as the unscaled image (scaling uses brain percentiles)",
        ("inference",),
        test="test_z_scored_intensities_give_the_same_map",
    ),
    Row(
        "device_string",
        "`--device cpu` as a plain string (as users type it and MONAI Label passes it)",
        "works, also in `multi_gpu_train.json` under torchrun",
        ("train", "inference"),
        test="test_device_as_plain_string",
    ),
    Row(
        "other_bundle_weights",
        "weights of the other bundle, with their recorded sizes",
        "error: `<ckpt> was trained with other sizes (<ckpt dir>/model_config.json) than the config files set "
        "(network_def#channels: […] there, unset here; …)`",
        ("inference",),
        test="test_wrong_checkpoints_are_named_on_the_last_line",
    ),
    Row(
        "other_size_weights",
        "a config overlay that sets sizes the weights do not have (`paper.json` over the shipped model)",
        "error naming both files: `<ckpt> was trained with other sizes (<ckpt dir>/model_config.json) than the config "
        "files set (unet#channels: [32, 64, 64] there, [128, 256, 256] here; …)`",
        ("inference",),
        test="test_wrong_checkpoints_are_named_on_the_last_line",
    ),
    Row(
        "no_recorded_sizes",
        "weights without the `model_config.json` training writes beside them (a second model folder)",
        "error naming both files: `<ckpt>: no model_config.json beside the weights (<ckpt dir>/model_config.json), so "
        "the sizes they were trained with are unknown`",
        ("inference",),
        test="test_wrong_checkpoints_are_named_on_the_last_line",
    ),
    Row(
        "sizes_that_lie",
        "weights whose `model_config.json` is not theirs (AutoDDPM weights, cDDPM sizes)",
        "error: `<ckpt>: weights do not match …: the file holds a bare diffusion UNet (AutoDDPM), …`",
        ("inference",),
        test="test_wrong_checkpoints_are_named_on_the_last_line",
    ),
    Row(
        "train_over_other_sizes",
        "a training run into a folder whose `model.pt` has other sizes, or none recorded",
        "error naming both: `<ckpt dir>/model.pt was trained with other sizes (<ckpt dir>/model_config.json) than the "
        "config files of this run set (…): train into an empty ckpt_dir, …`",
        ("train",),
        test="test_training_over_weights_of_other_sizes_stops_naming_both",
    ),
    Row(
        "threshold_of_other_weights",
        "a `thresholds.json` calibrated on other weights, or marked stale by a training run",
        "warning: `<thresholds> does not apply to <ckpt> (calibrated on other weights; …): writing anomaly maps "
        "without a mask`; the map is written, no mask",
        ("inference",),
        test="test_a_threshold_of_other_weights_gives_maps_without_a_mask",
    ),
    Row(
        "truncated_weights",
        "a truncated checkpoint",
        "error: `<ckpt>: not a readable PyTorch checkpoint (corrupt or incomplete file?)`",
        ("inference",),
        test="test_wrong_checkpoints_are_named_on_the_last_line",
    ),
    Row(
        "nan_loss",
        "a training loss that becomes NaN or Inf",
        "error: `training stopped: the loss is nan (not finite), before the optimizer step; run again to resume …`",
        ("train",),
        test="test_nan_loss_stops_training_keeping_the_last_good_checkpoint",
    ),
]


def matrix_table() -> str:
    """The ``docs/reliability.md`` table of ``MATRIX``."""
    lines = ["| input | commands | what the user sees |", "|---|---|---|"]
    lines += [f"| {r.given} | {', '.join(r.commands)} | {r.seen} |" for r in MATRIX]
    return "\n".join(lines)


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, AFFINE if affine is None else affine), str(path))
    return str(path)


def brain() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    return ((grid[0] ** 2 + grid[1] ** 2) < 0.6).astype(np.uint8)


def good_case(folder: Path, name: str, seg: bool = False, seed: int = 0) -> dict:
    mask = brain()
    image = (mask * (0.5 + 0.2 * np.random.default_rng(seed).random(SHAPE))).astype(np.float32)
    entry = {"image": save(folder / f"{name}_t2.nii.gz", image), "mask": save(folder / f"{name}_mask.nii.gz", mask)}
    if seg:
        lesion = np.zeros(SHAPE, np.uint8)
        lesion[10:13, 10:13, 3:5] = 1
        entry["seg"] = save(folder / f"{name}_seg.nii.gz", lesion)
    return entry


def bad_case(row: str, folder: Path) -> dict:
    """The entry of a data row (built in ``folder``)."""
    case = good_case(folder, "bad", seed=7)
    mask = brain()
    if row == "missing_file":
        case["image"] = str(folder / "lost_t2.nii.gz")
    elif row == "not_an_image":
        (folder / "notes.nii.gz").write_text("not an image")
        case["image"] = str(folder / "notes.nii.gz")
    elif row == "other_format":
        (folder / "scan.txt").write_text("1 2 3")
        case["image"] = str(folder / "scan.txt")
    elif row == "volume_4d":
        case = {"image": save(folder / "series_t2.nii.gz", np.random.rand(*SHAPE, 3).astype(np.float32))}
    elif row == "shape_mismatch":
        case["mask"] = save(folder / "short_mask.nii.gz", mask[..., :7])
    elif row == "affine_mismatch":
        case["mask"] = save(folder / "moved_mask.nii.gz", mask, np.diag([1.0, 1.0, 3.0, 1.0]))
    elif row == "constant_image":
        case["image"] = save(folder / "blank_t2.nii.gz", np.zeros(SHAPE, np.float32))
    elif row == "nan_voxels":
        image = np.asarray(nib.load(case["image"]).dataobj).copy()
        image[5, 5, 2], image[6, 6, 3] = np.nan, np.inf
        case["image"] = save(folder / "nan_t2.nii.gz", image)
    elif row == "empty_mask":
        case["mask"] = save(folder / "empty_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    elif row == "soft_mask":
        case["mask"] = save(
            folder / "soft_mask.nii.gz", (mask * 0.9 * np.linspace(0.1, 1, SHAPE[2])).astype(np.float32)
        )
    elif row == "same_name":
        (folder / "other").mkdir()
        case = good_case(folder / "other", "lesion1", seed=11)
    elif row == "seg_labels":
        labels = np.zeros(SHAPE, np.uint8)
        labels[10:12, 10:12, 2:6] = [1, 2, 4, 1]
        case["seg"] = save(folder / "labels_seg.nii.gz", labels)
    else:
        raise KeyError(row)
    return case


def datalist_folder(root: Path, row: str) -> Path:
    """Three good cases in every section of ``datalist.json``, and the row's bad case in each section."""
    folder = root / "data"
    folder.mkdir()
    good = [good_case(folder, f"case{i}", seed=i) for i in range(3)]
    labelled = [good_case(folder, f"lesion{i}", seg=True, seed=10 + i) for i in range(2)]
    sections = {"training": good[:2], "validation": [good[2], labelled[0]], "test": [labelled[1]]}
    if row == "shared_subject":
        sections["validation"].append(good[0])
        sections["test"].append({**good[0], "seg": labelled[0]["seg"]})
    elif row == "missing_section":
        del sections["validation"], sections["test"]
        sections["training"] = good  # train reads 'validation', inference and evaluate 'test'
    elif row:
        bad = bad_case(row, folder)
        for section in sections.values():
            section.append(bad)
    path = folder / "datalist.json"
    path.write_text(json.dumps(sections, indent=1))
    return path


def seed_layout(root: Path, demo_cohort: Path, row: str) -> Path:
    """A copy of the demo cohort's seed layout whose split CSVs all have the row's defect."""
    data = root / "cohort"
    shutil.copytree(demo_cohort, data, symlinks=True)
    for csv_path in (data / "splits").glob("*.csv"):
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0])
        if row == "csv_missing_columns":
            columns.remove("mask_path")
        elif row == "csv_duplicate_rows":
            rows.insert(1, rows[0])
        elif row == "csv_outside_path":
            rows[0]["img_path"] = "../elsewhere/x_t2.nii.gz"
        elif row == "empty_split":
            rows = []
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return data


def command_overrides(command: str, data: dict, out: Path) -> dict:
    """Overrides of a command on the data ``{"datalist": ...}`` or ``{"dataset_dir": ...}``, writing under ``out``."""
    overrides = {"datalist": "", **data, "output_dir": str(out / "eval"), **TINY_GRID, "num_workers": 0}
    if command == "train":
        overrides["ckpt_dir"] = str(out / "models")
    if command == "evaluate" and "dataset_dir" in data:
        overrides["test_set"] = "Tumour"
    return overrides


def workflow(bundle: str, command: str, overrides: dict, overlays: tuple[str, ...] = ("demo",)):
    """The bundle command as ``monai.bundle run`` builds it (``ConfigWorkflow``), in this process, with ``overlays``
    (default ``demo.json``)."""
    from monai.bundle import ConfigWorkflow

    configs = [str(REPO / bundle / c) for c in command_configs(command, *overlays)]
    return ConfigWorkflow(
        config_file=configs,
        meta_file=str(REPO / bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer" if command == "inference" else command.replace("evaluate", "infer"),
        bundle_root=str(REPO / bundle),
        **overrides,
    )


def project_message(error: BaseException) -> str:
    from uad.errors import input_error_message

    message = input_error_message(error)
    assert message is not None, f"not the project's error: {error!r}"
    return message


DATA_ROWS = [r for r in MATRIX if r.test == "test_bad_input_in_every_command"]


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("row", DATA_ROWS, ids=[r.id for r in DATA_ROWS])
def test_bad_input_in_every_command(row, bundle, demo_cohort, tmp_path, bundle_imports, caplog):
    """Each command of the row fails at start-up with the project's message and leaves no output (or, for a warning
    row, its start-up pass logs the warning)."""
    bundle_imports(bundle)
    for command in row.commands:
        out = tmp_path / command
        if row.id.startswith(("csv_", "empty_split")):
            data = {"dataset_dir": str(seed_layout(out, demo_cohort, row.id))}
        elif row.id == "missing_dataset_dir":
            data = {"dataset_dir": str(tmp_path / "nowhere")}
        else:
            out.mkdir()
            data = {"datalist": str(datalist_folder(out, row.id))}
        caplog.clear()
        flow = workflow(bundle, command, command_overrides(command, data, out))
        if row.warns:
            with caplog.at_level(logging.WARNING):
                flow.initialize()  # the start-up pass; the run itself is tested elsewhere
            assert re.search(row.expect, caplog.text), f"{command}: {caplog.text}"
            continue
        with pytest.raises(Exception) as error:  # noqa: B017 - MONAI wraps it; the project's error is inside
            flow.initialize()
            flow.run()
        assert re.search(row.expect, project_message(error.value)), f"{command}: {project_message(error.value)}"
        assert not (out / "eval").exists() and not (out / "models").exists(), f"{command} left output behind"


def cli(bundle: str, configs: list[str], overrides: dict) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` as a user types it; returns the finished process (it may fail)."""
    cmd = bundle_command(configs, overrides)
    return subprocess.run(cmd, cwd=REPO / bundle, capture_output=True, text=True, timeout=300, env=subprocess_env())


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_start_up_error_is_the_last_line_of_the_cli(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    datalist = datalist_folder(out, "nan_voxels")
    result = cli("cddpm_bundle", ["configs/inference.json"], {"datalist": str(datalist), "output_dir": str(out / "e")})
    assert result.returncode != 0
    assert re.fullmatch(
        r"InputError: .*nan_t2\.nii\.gz: image contains NaN or infinite values \(2 voxels\)", last_line(result)
    )
    assert not (out / "e").exists()


def test_volume_on_one_slice_grid_is_refused_on_the_last_line(tmp_path):
    """Raised inside a DataLoader worker (default ``num_workers``), after MONAI's transform wrapper: still last."""
    out = tmp_path / "run"
    out.mkdir()
    datalist = datalist_folder(out, "")
    overrides = {"datalist": str(datalist), "output_dir": str(out / "e"), "image_size": [64, 64, 1]}
    result = cli("cddpm_bundle", ["configs/inference.json"], {**overrides, "cpu_backend": "torch"})
    assert result.returncode != 0
    assert re.fullmatch(
        r"InputError: .*lesion1_t2\.nii\.gz: a volume of \d+ slices on a one-slice grid.*", last_line(result)
    )
    assert not list((out / "e").glob("*.nii.gz")) if (out / "e").exists() else True


def run_inference(bundle: str, overrides: dict, overlays: tuple[str, ...] = ("demo",)) -> None:
    flow = workflow(bundle, "inference", {"num_workers": 0, "cpu_backend": "torch", **overrides}, overlays)
    flow.initialize()
    flow.run()
    flow.finalize()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_png_slice_gets_the_2d_protocol(bundle, tmp_path, bundle_imports):
    """The shipped model on a PNG slice through ``inference.json`` + ``demo.json`` (a 32-deep grid)."""
    bundle_imports(bundle)
    mask = brain()[..., 4].repeat(3, 0).repeat(3, 1)
    image = (mask * (120 + 60 * np.random.default_rng(0).random(mask.shape))).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "slice.png")
    run_inference(bundle, {"input_file": str(tmp_path / "slice.png"), "output_dir": str(tmp_path / "out")})
    written = nib.load(tmp_path / "out" / "slice_anomaly_map.nii.gz")
    amap = np.squeeze(np.asarray(written.dataobj))
    assert amap.shape == image.shape[::-1] and (amap[mask.T > 0] > 0).mean() > 0.5  # PIL reads (W, H)


def test_zero_or_non_finite_maps_are_refused():
    from uad.errors import InputError
    from uad.transforms import CheckAnomalyMapd

    brain_mask = torch.zeros(1, 8, 8, 4)
    brain_mask[:, 2:6, 2:6] = 1
    check = CheckAnomalyMapd()
    ok = torch.zeros(1, 8, 8, 4)
    ok[0, 3, 3, 1] = 0.2
    check({"pred": ok, "mask": brain_mask})
    outside = torch.zeros(1, 8, 8, 4)
    outside[0, 0, 0, 0] = 1.0  # non-zero only outside the brain
    with pytest.raises(InputError, match="zero everywhere inside the brain mask"):
        check({"pred": outside, "mask": brain_mask})
    with pytest.raises(InputError, match="NaN or infinite"):
        check({"pred": ok * float("nan"), "mask": brain_mask})
    CheckAnomalyMapd(may_be_zero=True)({"pred": outside, "mask": brain_mask})  # AutoDDPM: logged, not refused
    with pytest.raises(InputError, match="NaN or infinite"):
        CheckAnomalyMapd(may_be_zero=True)({"pred": ok * float("nan"), "mask": brain_mask})


@pytest.mark.parametrize("bundle", BUNDLES)
def test_z_scored_intensities_give_the_same_map(bundle, tmp_path, bundle_imports):
    bundle_imports(bundle)
    case = good_case(tmp_path, "plain", seed=3)
    image = np.asarray(nib.load(case["image"]).dataobj)
    z = ((image - image.mean()) / image.std()).astype(np.float32)
    assert z.min() < -0.5
    zcase = {"image": save(tmp_path / "z_t2.nii.gz", z), "mask": case["mask"]}
    maps = {}
    for name, entry in (("plain", case), ("z", zcase)):
        overrides = {"input_file": entry["image"], "input_mask": entry["mask"], "output_dir": str(tmp_path / name)}
        run_inference(bundle, {**overrides, **TINY_GRID})
        maps[name] = np.asarray(
            nib.load(tmp_path / name / f"{Path(entry['image']).name[:-7]}_anomaly_map.nii.gz").dataobj
        )
    # the normalised inputs agree to float rounding, which the network amplifies (6.5e-4 seen on an AVX-512 host)
    assert maps["z"].max() > 0 and np.allclose(maps["z"], maps["plain"], atol=2e-3)


def test_device_as_plain_string(tmp_path, bundle_imports, monkeypatch):
    """``multi_gpu_train.json`` builds its DDP network from ``--device cpu`` (one gloo rank here; the torchrun test of
    the cDDPM bundle passes the string too), and inference runs with it."""
    import ignite.distributed as idist
    from monai.bundle import ConfigParser

    bundle_imports("autoddpm_bundle")
    parser = ConfigParser()
    parser.read_config(
        [str(REPO / "autoddpm_bundle" / "configs" / c) for c in ("train.json", "demo.json", "multi_gpu_train.json")]
    )
    parser.update({"bundle_root": str(REPO / "autoddpm_bundle"), "device": "cpu", "ckpt_dir": str(tmp_path / "m")})
    monkeypatch.setenv("LOCAL_RANK", "0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        network = parser.get_parsed_content("network")
    finally:
        idist.finalize()
        torch.distributed.destroy_process_group()
    assert type(network).__name__ == "DistributedDataParallel" and next(network.parameters()).device.type == "cpu"
    case = good_case(tmp_path, "dev")
    run_inference(
        "autoddpm_bundle",
        {"input_file": case["image"], "output_dir": str(tmp_path / "o"), "device": "cpu", **TINY_GRID},
    )
    assert (tmp_path / "o" / "dev_t2_anomaly_map.nii.gz").is_file()


@pytest.mark.parametrize(
    "ckpt, sizes, overlays, message",
    [
        (
            "autoddpm_bundle",
            "autoddpm_bundle",
            (),
            r"was trained with other sizes .*network_def#channels: \[32, 64, 64\] "
            r"there, unset here",
        ),
        (
            "cddpm_bundle",
            "cddpm_bundle",
            ("paper",),
            r"was trained with other sizes .*unet#channels: \[32, 64, 64\] "
            r"there, \[128, 256, 256\] here",
        ),
        ("cddpm_bundle", None, (), r"no model_config\.json beside the weights"),
        (
            "autoddpm_bundle",
            "cddpm_bundle",
            (),
            r"the file holds a bare diffusion UNet \(AutoDDPM\), the config builds",
        ),
        ("truncated", "cddpm_bundle", (), r"not a readable PyTorch checkpoint"),
    ],
    ids=["other_bundle_weights", "other_size_weights", "no_recorded_sizes", "sizes_that_lie", "truncated_weights"],
)
def test_wrong_checkpoints_are_named_on_the_last_line(ckpt, sizes, overlays, message, tmp_path, bundle_imports):
    bundle_imports("cddpm_bundle")
    weights = tmp_path / "model.pt"
    shipped = (REPO / ("cddpm_bundle" if ckpt == "truncated" else ckpt) / "models" / "model.pt").read_bytes()
    weights.write_bytes(shipped[:100_000] if ckpt == "truncated" else shipped)
    if sizes is not None:  # the record of the sizes beside the weights, as training writes it
        (tmp_path / "model_config.json").write_bytes((REPO / sizes / "models" / "model_config.json").read_bytes())
    case = good_case(tmp_path, "w")
    overrides = {"input_file": case["image"], "output_dir": str(tmp_path / "o"), "ckpt_path": str(weights)}
    with pytest.raises(Exception) as error:  # noqa: B017
        run_inference("cddpm_bundle", overrides, overlays)
    assert re.search(rf"model\.pt:? .*{message}", project_message(error.value))
    assert not (tmp_path / "o").exists()


def shipped_models(bundle: str, folder: Path) -> Path:
    """A copy of ``<bundle>/models`` (weights, recorded sizes, calibrated threshold) in ``folder``."""
    shutil.copytree(REPO / bundle / "models", folder)
    return folder


def test_training_over_weights_of_other_sizes_stops_naming_both(demo_cohort, tmp_path, bundle_imports):
    bundle_imports("cddpm_bundle")
    models = shipped_models("cddpm_bundle", tmp_path / "models")
    shipped = (models / "model.pt").read_bytes()
    overrides = {"dataset_dir": str(demo_cohort), "ckpt_dir": str(models), "num_workers": 0}
    with pytest.raises(Exception) as error:  # noqa: B017
        workflow("cddpm_bundle", "train", overrides, ("demo", "paper")).initialize()
    assert re.search(
        rf"{models / 'model.pt'} was trained with other sizes \({models / 'model_config.json'}\) than the config files "
        r"of this run set \(.*unet#channels: \[32, 64, 64\] there, \[128, 256, 256\] here",
        project_message(error.value),
    )
    (models / "model_config.json").unlink()  # weights whose sizes nobody recorded: never overwritten either
    with pytest.raises(Exception) as error:  # noqa: B017
        workflow("cddpm_bundle", "train", overrides).initialize()
    assert "model.pt has no model_config.json beside it" in project_message(error.value)
    assert (models / "model.pt").read_bytes() == shipped and not (models / "model_config.json").exists()


def test_a_threshold_of_other_weights_gives_maps_without_a_mask(tmp_path, bundle_imports, caplog):
    bundle_imports("cddpm_bundle")
    models = shipped_models("cddpm_bundle", tmp_path / "models")
    state = torch.load(models / "model.pt", weights_only=True)
    torch.save({k: v * 0.999 if v.is_floating_point() else v for k, v in state.items()}, models / "model.pt")
    case = good_case(tmp_path, "t")
    overrides = {"input_file": case["image"], "output_dir": str(tmp_path / "o"), "ckpt_dir": str(models), **TINY_GRID}
    with caplog.at_level(logging.WARNING):
        run_inference("cddpm_bundle", overrides)
    assert f"{models / 'thresholds.json'} does not apply to {models / 'model.pt'} (calibrated on other weights" in (
        caplog.text
    )
    assert (tmp_path / "o" / "t_t2_anomaly_map.nii.gz").is_file()
    assert not list((tmp_path / "o").glob("*_anomaly_mask.nii.gz"))  # a map, no mask binarised at a stale threshold


def test_nan_loss_stops_training_keeping_the_last_good_checkpoint(demo_cohort, tmp_path, bundle_imports):
    """A loss that turns NaN in the second epoch: the run stops with the project's message before the optimizer
    steps with it; the first epoch's checkpoint, the best model and the final weights are all finite."""
    bundle_imports("cddpm_bundle")

    class NanInSecondEpoch(torch.nn.L1Loss):
        calls = 0

        def forward(self, a, b):
            NanInSecondEpoch.calls += 1
            return super().forward(a, b) * (float("nan") if NanInSecondEpoch.calls > 1 else 1.0)

    models = tmp_path / "models"
    overrides = {**TINY_GRID, "epochs": 3, "val_interval": 1, "batch_size": 64, "slices_per_volume": 2}  # 1 step/epoch
    overrides.update({"dataset_dir": str(demo_cohort), "ckpt_dir": str(models), "output_dir": str(tmp_path / "out")})
    overrides.update(
        {
            "num_workers": 0,
            "loss": NanInSecondEpoch(),
            "unet#channels": [8, 16, 16],
            "unet#num_head_channels": 8,
            "unet#norm_num_groups": 8,
        }
    )
    overrides.update({"encoder#block_inplanes": [8, 8, 16, 16], "latent_dim": 16})
    flow = workflow("cddpm_bundle", "train", overrides)
    flow.initialize()
    with pytest.raises(Exception) as error:  # noqa: B017 - MONAI wraps it
        flow.run()
    message = project_message(error.value)
    assert re.match(
        r"NonFiniteLossError: training stopped: the loss is nan .*resume from .*checkpoint_epoch=1\.pt", message
    )
    for name in ("checkpoint_checkpoint_epoch=1.pt", "model.pt", "model_final.pt"):
        state = torch.load(models / name, weights_only=True)
        state = state.get("network", state)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
    assert not (models / "checkpoint_checkpoint_epoch=2.pt").exists()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_an_empty_validation_list_is_skipped_with_a_warning(bundle, tmp_path, bundle_imports, caplog):
    bundle_imports(bundle)
    datalist = datalist_folder(tmp_path, "")
    overrides = command_overrides("train", {"datalist": str(datalist)}, tmp_path)
    flow = workflow(bundle, "train", {**overrides, "validate#dataset#data": []})  # as MONAI Label overrides it
    with caplog.at_level(logging.WARNING):
        flow.initialize()
    assert "the validation split has no cases: it is skipped" in caplog.text


def test_reliability_table_is_the_matrix():
    readme = (REPO / "docs" / "reliability.md").read_text()
    assert matrix_table() in readme, f"update the bad-input table in docs/reliability.md to:\n{matrix_table()}"
    tests = {name for name in globals() if name.startswith("test_")}
    assert {r.test for r in MATRIX} <= tests
