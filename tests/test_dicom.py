"""DICOM in and out: a DICOM series folder is accepted wherever a NIfTI file is, with clear errors for folders that are
not one series, and the anomaly mask is written as DICOM SEG referencing that series. The series are written by the
tests with pydicom; the SEG files are read back with pydicom and highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, run_bundle
from monai.transforms import LoadImage
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from uad.data import dicom_series_geometry, validate_entries
from uad.dicom import write_dicom_seg
from uad.io import write_thresholds


def write_series(folder: Path, volume: np.ndarray, spacing=(1.5, 1.25, 2.0), series_uid: str | None = None) -> str:
    """Write ``volume`` (rows, cols, slices) as one MR DICOM series of uint16 slices; returns its series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    pixels = np.round(volume / max(float(volume.max()), 1e-6) * 4000).astype(np.uint16)
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", "TEST", k + 1
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Test^Case", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber = "", 7
        ds.ImagePositionPatient = [0.0, 0.0, spacing[2] * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels[:, :, k].tobytes()
        ds.save_as(folder / f"{series_uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def test_series_geometry_is_what_load_image_reads_and_a_matching_mask_validates(tmp_path):
    series = tmp_path / "series"
    write_series(series, np.random.default_rng(0).random((20, 24, 5)))
    shape, affine = dicom_series_geometry(series)
    loaded = LoadImage(image_only=True)(str(series))
    assert shape == tuple(loaded.shape) == (24, 20, 5)
    np.testing.assert_allclose(affine, loaded.meta["affine"].numpy())
    assert np.allclose(np.abs(np.diag(affine)[:3]), [1.25, 1.5, 2.0])
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), mask)
    validate_entries([{"image": str(series), "mask": str(mask)}])
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine * np.diag([2, 1, 1, 1])), mask)
    with pytest.raises(ValueError, match="mask geometry"):
        validate_entries([{"image": str(series), "mask": str(mask)}])


def test_folders_that_are_not_one_series_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: a folder, but no DICOM series in it"):
        validate_entries([{"image": str(empty)}])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no DICOM series"):
        validate_entries([{"image": str(tmp_path / "mixed")}])
    two = tmp_path / "two"
    first = write_series(two, np.ones((8, 8, 3)))
    second = write_series(two, np.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="two: 2 DICOM series in one folder") as error:
        validate_entries([{"image": str(two)}])
    assert first in str(error.value) and second in str(error.value)


def test_bundle_inference_takes_a_dicom_series_folder(demo_cohort, tmp_path):
    nifti = nib.load(next((demo_cohort / "Test" / "Tumour" / "t2").glob("*.nii.gz")))
    series = tmp_path / "case_dicom"
    write_series(series, nifti.get_fdata(), spacing=tuple(float(z) for z in nifti.header.get_zooms()))
    out, threshold = tmp_path / "out", tmp_path / "thresholds.json"
    shipped = REPO / "cddpm_bundle" / "models" / "model.pt"
    write_thresholds(threshold, {"test": 0.02}, "test", shipped)  # low: some voxels are anomalous
    run_bundle(
        "cddpm_bundle",
        ["configs/inference.json"],
        {"input_file": str(series), "output_dir": str(out), "threshold_file": str(threshold)},
    )
    written = nib.load(out / "case_dicom_anomaly_map.nii.gz")
    shape, affine = dicom_series_geometry(series)
    assert written.shape == shape and np.allclose(written.affine, affine, atol=1e-4)
    assert np.isfinite(written.get_fdata()).all() and written.get_fdata().max() > 0
    mask = nib.load(out / "case_dicom_anomaly_mask.nii.gz").get_fdata()
    assert_seg_matches(out / "case_dicom_anomaly_seg.dcm", series, mask)


def assert_seg_matches(seg_file: Path, series: Path, mask: np.ndarray) -> None:
    """The SEG at ``seg_file`` references ``series`` and holds ``mask`` (column, row, slice, as MONAI reads the
    series): one frame per non-empty slice, each derived from and positioned at its source slice."""
    seg = hd.seg.segread(seg_file)
    sources = {ds.SOPInstanceUID: ds for ds in map(dcmread, series.glob("*.dcm"))}
    series_uid = next(iter(sources.values())).SeriesInstanceUID
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.get_segment_description(1).SegmentLabel == "anomaly"
    nonempty = [k for k in range(mask.shape[2]) if mask[:, :, k].any()]
    assert int(seg.NumberOfFrames) == len(nonempty) > 0
    frames = seg.pixel_array.reshape(len(nonempty), int(seg.Rows), int(seg.Columns))
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uid]
        k = int(source.InstanceNumber) - 1  # write_series numbers slice k as k + 1
        assert k in nonempty and np.array_equal(frame, mask[:, :, k].T > 0)
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(x) for x in position], [float(x) for x in source.ImagePositionPatient])


def test_anomaly_mask_as_dicom_seg_references_its_series(tmp_path):
    series = tmp_path / "series"
    write_series(series, np.random.default_rng(0).random((20, 24, 5)))
    loaded = LoadImage(image_only=True)(str(series))
    mask = np.zeros(loaded.shape, np.uint8)
    mask[3:9, 2:6, 1] = 1  # an asymmetric blob in two slices: rows and columns cannot be swapped unnoticed
    mask[10:12, 4:15, 3] = 1
    path = write_dicom_seg(mask, loaded.affine.numpy(), series, tmp_path / "out" / "seg.dcm", "test", "1.0")
    assert_seg_matches(path, series, mask)
    assert not list(path.parent.glob(".*tmp*"))
    empty = write_dicom_seg(np.zeros_like(mask), loaded.affine.numpy(), series, tmp_path / "empty.dcm", "t", "1")
    assert int(dcmread(empty).NumberOfFrames) == mask.shape[2]  # a SEG needs frames: an empty mask keeps them all
    shifted = loaded.affine.numpy().copy()
    shifted[0, 3] += 5.0  # a mask of another grid (e.g. another series of the study)
    with pytest.raises(ValueError, match="does not lie on the grid"):
        write_dicom_seg(mask, shifted, series, tmp_path / "bad.dcm", "t", "1")
    assert not (tmp_path / "bad.dcm").exists()
