"""DICOM out: the anomaly mask as a DICOM Segmentation (SEG) object that references its source series (highdicom)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .files import atomic_output

__all__ = ["SaveDicomSegd", "source_frames", "write_dicom_seg"]

logger = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def source_frames(series_dir: str | os.PathLike, mask: np.ndarray, affine: np.ndarray) -> tuple[list, np.ndarray]:
    """The datasets of the DICOM series in ``series_dir`` and, for each, its frame of ``mask``.

    Args:
        series_dir: the folder of one DICOM series (as ``LoadImage`` read it).
        mask: (I, J, K) volume on the series' grid as MONAI's ITK reader indexes it (column, row, slice).
        affine: the RAS affine of that grid.

    Returns:
        the pydicom datasets (sorted along the slice axis) and the frames (N, rows, columns), one per dataset.

    Raises:
        ValueError: a file of the folder does not lie on the grid of ``affine``, or the sizes differ.
    """
    import pydicom

    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    datasets = []
    for path in sorted(p for p in Path(series_dir).iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" not in ds or "PixelData" not in ds:  # e.g. a DICOMDIR, a report, an earlier SEG
            continue
        position = _LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        i, j, k = (to_voxel @ np.append(position, 1.0))[:3]
        slice_index = int(round(k))
        if abs(i) > 1e-2 or abs(j) > 1e-2 or abs(k - slice_index) > 1e-2 or not 0 <= slice_index < mask.shape[2]:
            raise ValueError(f"{path}: the slice does not lie on the grid of the anomaly mask (voxel {i, j, k})")
        if (int(ds.Rows), int(ds.Columns)) != mask.shape[1::-1]:
            raise ValueError(f"{path}: {ds.Rows}x{ds.Columns} pixels, the mask has {mask.shape[1]}x{mask.shape[0]}")
        datasets.append((slice_index, ds))
    if not datasets:
        raise ValueError(f"{series_dir}: no DICOM files to reference")
    datasets.sort(key=lambda item: item[0])
    frames = np.stack([mask[:, :, k].T for k, _ in datasets])
    return [ds for _, ds in datasets], frames


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    series_dir: str | os.PathLike,
    path: str | os.PathLike,
    algorithm_name: str,
    algorithm_version: str,
    segment_label: str = "anomaly",
) -> Path:
    """Write ``mask`` (binary, on the grid of the series in ``series_dir``) as a binary DICOM SEG at ``path``.

    The SEG has one segment (``segment_label``, a morphologically abnormal structure found by an AI algorithm), its
    frames reference the source slices they were derived from, and empty slices are left out; it is written to a
    temporary file and renamed. Returns the path.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets, frames = source_frames(series_dir, mask, affine)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
        ),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=(frames > 0).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MONAI bundle",
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            device_serial_number="0",
            omit_empty_frames=bool(frames.any()),  # an all-empty mask keeps its frames: a SEG needs at least one
        )
    except (AttributeError, TypeError, ValueError) as e:  # e.g. source files without the patient/study attributes
        raise ValueError(f"{series_dir}: cannot write a DICOM SEG referencing this series: {e}") from e
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


class SaveDicomSegd(MapTransform):
    """Write the anomaly mask as DICOM SEG (``<output_dir>/<series folder>_anomaly_seg.dcm``) when the image was
    read from a DICOM series folder; other inputs are left to the NIfTI writers.

    Args:
        keys: the binary mask (1, I, J, K) on the input's grid (after ``Invertd``).
        output_dir: where the SEG files go.
        image_key: the loaded image, whose ``filename_or_obj`` names the series folder.
        metadata_file: the bundle's ``metadata.json``; its ``name`` and ``version`` identify the algorithm in the SEG.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred_mask",
        output_dir: str | os.PathLike = "eval",
        image_key: str = "image",
        metadata_file: str | os.PathLike = "configs/metadata.json",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.metadata_file = Path(metadata_file)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d.get(self.image_key)
        source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        if not source or not Path(str(source)).is_dir():
            return d
        meta = json.loads(self.metadata_file.read_text())
        for key in self.key_iterator(d):
            mask = d[key]
            if not isinstance(mask, MetaTensor):
                raise ValueError(f"{key}: expected a MetaTensor on the grid of {source}")
            path = self.output_dir / f"{Path(str(source)).name}_anomaly_seg.dcm"
            volume = np.asarray(mask.detach().cpu())[0]
            write_dicom_seg(volume, mask.affine.numpy(), source, path, meta["name"], meta["version"])
            logger.info("anomaly mask of %s written as DICOM SEG to %s", source, path)
        return d
