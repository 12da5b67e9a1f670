"""MONAI Deploy's contract with a bundle: ``scripts/deploy_app.py`` run with the real SDK (``monai-deploy-app-sdk`` 4.0,
installed from ``requirements-deploy.txt``; skipped without it) on a DICOM series, its DICOM SEG read back; and, for the
lean install (``requirements.txt``, no SDK), a stand-in that applies the exported bundle as
``MonaiBundleInferenceOperator`` (``monai/deploy/operators/monai_bundle_inference_operator.py``) applies
``models/model.ts``.

The stand-in follows the operator's source: the configs read from ``<file stem>/extra/`` in the TorchScript archive
(read_meta, read_config, parse; no ``bundle_root`` set), LoadImage* and SaveImage* steps dropped from the top level of
pre- and post-processing, the series volume as ``DICOMSeriesToVolumeOperator`` makes it (slices, rows, columns) swapped
to (columns, rows, slices) without a channel, ``inferer(inputs=x[None], network=net, **other tensor inputs)``,
post-processing on ``{"pred": output, **inputs}``, and ``pred`` squeezed, swapped back and cast to uint8; then the SEG
as ``DICOMSegmentationWriterOperator`` writes it.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from conftest import REPO, bundle_parser, subprocess_env
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImage
from monai.utils import ensure_tuple
from pydicom import dcmread
from pydicom.sr.codedict import codes
from test_dicom import write_series
from uad.io import write_thresholds

sys.path.insert(0, str(REPO / "scripts"))
import deploy_app  # noqa: E402

DISALLOW_LOAD_SAVE = ["LoadImage", "SaveImage"]


def export(tmp_path: Path, threshold: float | None) -> Path:
    """``configs/export.json`` on the cDDPM bundle, with ``threshold`` calibrated (None: no threshold file)."""
    threshold_file = tmp_path / "thresholds.json"
    if threshold is not None:
        write_thresholds(threshold_file, {"test": threshold}, "test", REPO / "cddpm_bundle" / "models" / "model.pt")
    path = tmp_path / f"exported_{threshold is not None}" / "model.ts"
    parser = bundle_parser("cddpm_bundle", "inference.json", "export.json")
    parser.update({"export_path": str(path), "threshold_file": str(threshold_file), "device": "$torch.device('cpu')"})
    parser.get_parsed_content("run")
    return path


def deploy_parser(model_ts: Path, tmp_path: Path) -> ConfigParser:
    """``get_bundle_config``: the embedded metadata and inference.json, nothing overridden."""
    meta, config = deploy_app.embedded_config(model_ts)
    extracted = tmp_path / "extra" / "inference.json"
    extracted.parent.mkdir(exist_ok=True)
    extracted.write_text(json.dumps(config))
    parser = ConfigParser()
    parser.read_meta(f=meta)
    parser.read_config([extracted])
    parser.parse()
    return parser


def filter_compose(compose: Compose) -> Compose:
    compose.transforms = tuple(
        t for t in compose.transforms if not any(name in type(t).__name__ for name in DISALLOW_LOAD_SAVE)
    )
    return compose


def series_volume(series: Path) -> tuple[list, MetaTensor]:
    """The source datasets in volume order and the input MetaTensor the operator builds from the series' Image."""
    datasets = [dcmread(p) for p in series.glob("*.dcm")]
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    volume = np.stack([ds.pixel_array for ds in datasets])  # DICOMSeriesToVolumeOperator: (slices, rows, columns)
    affine = LoadImage(image_only=True)(str(series)).affine.numpy()  # the series' RAS ("nifti") affine
    converted = np.swapaxes(volume, 0, 2)  # _convert_from_image_dicom_source: DHW -> WHD, no channel
    spacing = [*map(float, datasets[0].PixelSpacing), float(datasets[0].SliceThickness)]
    meta = {
        "spacing": np.asarray(spacing),
        "original_affine": affine,
        "affine": affine.copy(),
        "spatial_shape": np.asarray(converted.shape),
        "original_channel_dim": "no_channel",
        "space": "RAS",
        "SeriesInstanceUID": datasets[0].SeriesInstanceUID,
    }
    return datasets, MetaTensor.ensure_torch_and_prune_meta(torch.as_tensor(converted), meta)


def own_mask(series: Path, model_ts: Path, tmp_path: Path) -> np.ndarray:
    """The mask of the bundle's own run on ``series`` (LoadImage, NIfTI out) with the threshold ``model_ts`` embeds,
    as (slices, rows, columns) in the order of ``series_volume``."""
    import nibabel as nib

    own = tmp_path / "own"
    inference = bundle_parser("cddpm_bundle", "inference.json")
    overrides = {"input_file": str(series), "output_dir": str(own), "device": "$torch.device('cpu')"}
    inference.update({**overrides, "threshold_file": str(model_ts.parent.parent / "thresholds.json")})
    inference.get_parsed_content("evaluator").run()
    return np.swapaxes(nib.load(own / "series_anomaly_mask.nii.gz").get_fdata(), 0, 2)  # WHD -> DHW


def demo_series(demo_cohort: Path, folder: Path) -> Path:
    """The first tumour case of the demo cohort written as one MR DICOM series."""
    import nibabel as nib

    case = nib.load(next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz")))
    write_series(folder, case.get_fdata(), spacing=tuple(float(z) for z in case.header.get_zooms()))
    return folder


def run_operator(parser: ConfigParser, network: torch.nn.Module, image: MetaTensor) -> np.ndarray:
    """``compute`` of the operator for one input named ``image`` and one output ``pred`` of type image."""
    meta = parser["_meta_"]["network_data_format"]
    first_input, first_output = next(iter(meta["inputs"])), next(iter(meta["outputs"]))
    assert meta["outputs"][first_output]["type"] == "image"  # -> squeezed, swapped to DHW, cast to uint8
    inferer = parser.get_parsed_content("inferer")
    pre = filter_compose(parser.get_parsed_content("preprocessing"))
    post = filter_compose(parser.get_parsed_content("postprocessing"))
    with torch.no_grad():
        inputs = pre({first_input: image})
        first_value = inputs[first_input]
        x = inputs.pop(first_input)[None]
        others = {k: v[None] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        outputs = inferer(inputs=x, network=network, **others)
        inputs[first_input] = first_value
        result = post({first_output: ensure_tuple(outputs)[0], **inputs})
    value = result[first_output]
    value = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
    return np.swapaxes(np.squeeze(value, 0), 0, 2).astype(np.uint8)


def test_app_refuses_a_model_without_embedded_threshold(tmp_path, bundle_imports):
    bundle_imports("cddpm_bundle")
    with pytest.raises(ValueError, match="no calibrated threshold embedded"):
        deploy_app.check_model(export(tmp_path, None))
    with pytest.raises(FileNotFoundError, match="export it with configs/export.json"):
        deploy_app.check_model(tmp_path / "missing" / "model.ts")
    renamed = tmp_path / "renamed.ts"
    (tmp_path / "exported_False" / "model.ts").rename(renamed)
    with pytest.raises(ValueError, match="renamed after export"):  # Deploy would silently run no config
        deploy_app.check_model(renamed)


def test_operator_runs_the_exported_bundle_on_a_dicom_series_and_the_seg_writer_takes_its_mask(
    tmp_path, bundle_imports, demo_cohort
):
    bundle_imports("cddpm_bundle")
    series = demo_series(demo_cohort, tmp_path / "series")
    model_ts = export(tmp_path, 0.02)
    meta = deploy_app.check_model(model_ts)

    parser = deploy_parser(model_ts, tmp_path)
    assert parser.get_parsed_content("threshold") == 0.02  # embedded values: no file beside the weights is read
    network = torch.jit.load(str(model_ts), map_location="cpu").eval()
    datasets, image = series_volume(series)
    mask = run_operator(parser, network, image)

    assert mask.dtype == np.uint8 and mask.shape == (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    assert set(np.unique(mask)) == {0, 1}  # the binary anomaly mask, unharmed by the uint8 cast
    expected = own_mask(series, model_ts, tmp_path)
    assert expected.shape == mask.shape and (expected == mask).mean() > 0.999  # same voxels, same orientation

    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=meta["name"], family=codes.DCM.ArtificialIntelligence, version=meta["version"]
        ),
    )
    seg = hd.seg.Segmentation(  # as DICOMSegmentationWriterOperator calls it: frames matched to sources by index
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="The MONAI Consortium",
        manufacturer_model_name="MONAI Deploy App SDK",
        software_versions="4.0.0",
        device_serial_number="0000",
    )
    assert int(seg.NumberOfFrames) == int((mask.reshape(len(datasets), -1) > 0).any(axis=1).sum())


def raise_stack_limit() -> None:
    """Holoscan's recommended stack size (``ulimit -s 32768``), where the hard limit allows it."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = 32 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_STACK, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def test_deploy_app_with_the_real_sdk_writes_the_bundle_mask_as_a_seg_of_the_series(
    tmp_path, bundle_imports, demo_cohort
):
    pytest.importorskip(
        "monai.deploy.operators.monai_bundle_inference_operator",
        reason="MONAI Deploy App SDK 4.0 not installed (pip install --no-deps -r requirements-deploy.txt)",
    )
    bundle_imports("cddpm_bundle")
    series = demo_series(demo_cohort, tmp_path / "series")
    model_ts = export(tmp_path, 0.02)
    bundle = tmp_path / "bundle"  # what deploy_app needs of a bundle folder: models/model.ts and the scripts it imports
    (bundle / "models").mkdir(parents=True)
    shutil.copy(model_ts, bundle / "models" / "model.ts")
    (bundle / "scripts").symlink_to(REPO / "cddpm_bundle" / "scripts")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "deploy_app.py"), "--bundle", str(bundle), "-i", str(series)]
    result = subprocess.run(
        [*cmd, "-o", str(out)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=raise_stack_limit,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (seg_file,) = out.glob("*.dcm")

    seg = hd.seg.segread(seg_file)
    datasets, _ = series_volume(series)
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert seg.SegmentSequence[0].SegmentLabel == "anomaly" and seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    referenced = [
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    assert referenced and set(referenced) <= set(uids)  # every frame on a slice of the series
    mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]  # slices without a frame: zeros
    expected = own_mask(series, model_ts, tmp_path)
    assert set(np.unique(expected)) == {0, 1} and len(referenced) == int(expected.any(axis=(1, 2)).sum())
    assert expected.shape == mask.shape and (expected == mask).mean() > 0.999  # same voxels on the same slices
