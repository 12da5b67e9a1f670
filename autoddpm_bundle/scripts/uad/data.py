"""Data layer shared by both bundles: seed-layout split CSVs, MONAI datalists, plain folders, and their validation.

A data set entry is a dict ``{"image": path, "mask": path (optional), "seg": path (optional)}``: ``mask`` is the brain
mask, ``seg`` the lesion ground truth. Three sources give such entries:

- the cDDPM seed layout ``<root>/Train/ixi/{t1,t2,mask}``, ``<root>/Test/<Set>/{t1|t2,mask,seg}`` with split CSVs
  ``<root>/splits/<Set>_{train_foldK,val,test}.csv`` (columns ``img_name, age, label, img_path, mask_path, seg_path``,
  paths relative to the root);
- a MONAI (Decathlon-style) datalist JSON with sections ``training``, ``validation``, ``test``, paths absolute or
  relative to the JSON file;
- a plain folder of images (NIfTI or PNG), without masks.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import PILReader
from monai.utils import MetaKeys
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import InputError, MissingInputError
from .files import atomic_write_text, remove_stale_temporaries

logger = logging.getLogger(__name__)

__all__ = [
    "CONTRASTS",
    "ENTRY_KEYS",
    "FieldOfViewPNGReader",
    "IMAGE_SUFFIXES",
    "SPLIT_COLUMNS",
    "case_name",
    "check_cases",
    "dataset_entries",
    "dicom_series_geometry",
    "evaluation_entries",
    "evaluation_sets",
    "evaluation_splits",
    "image_array",
    "image_geometry",
    "inference_entries",
    "list_image_folder",
    "load_datalist",
    "load_split_csv",
    "pending_cases",
    "split_csv_path",
    "training_reference",
    "validate_entries",
]

CONTRASTS = ("t1", "t2")
SPLIT_COLUMNS = ("img_name", "age", "label", "img_path", "mask_path", "seg_path")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png")
ENTRY_KEYS = ("image", "mask", "seg")


def case_name(path: str | os.PathLike) -> str:
    """File name without directory and image extension (``sub1_t2.nii.gz`` -> ``sub1_t2``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _swap_contrast(path: Path, contrast: str) -> Path:
    """Path of the same case in another contrast: sibling ``<contrast>`` folder, contrast token in the name swapped.

    The seed layout stores each contrast in its own folder (``.../t2/IXI002_t2.nii.gz``); the folder decides, and a
    trailing ``_t1``/``_t2`` token in the file name follows it when present.
    """
    folder = path.parent
    if folder.name.lower() not in CONTRASTS:
        raise InputError(f"{path}: cannot choose contrast {contrast!r}: the image is not in a t1/t2 folder")
    name = path.name
    stem = case_name(name)
    for other in CONTRASTS:
        if stem.lower().endswith(f"_{other}"):
            name = stem[: -len(other)] + contrast + name[len(stem) :]
            break
    return folder.parent / contrast / name


def split_csv_path(data_dir: str | os.PathLike, set_name: str, split: str) -> Path:
    """``<data_dir>/splits/<set_name>_<split>.csv``; ``split`` such as ``train_fold0``, ``val``, ``test``."""
    return Path(data_dir) / "splits" / f"{set_name}_{split}.csv"


def _resolve(base: Path, value: str) -> str:
    """A path from a CSV or datalist: absolute, or relative to ``base`` (a leading '/' in seed CSVs is relative)."""
    path = Path(value)
    if path.is_absolute() and not path.exists() and (base / value.lstrip("/")).exists():
        path = base / value.lstrip("/")
    elif not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _outside(root: Path, value: str) -> bool:
    """Whether a split CSV path lies outside ``root`` (as written: symbolic links inside it are fine)."""
    return not Path(os.path.abspath(_resolve(root, value))).is_relative_to(os.path.abspath(root))


def load_split_csv(csv_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, contrast: str | None = None):
    """Entries of a seed-layout split CSV.

    Args:
        csv_path: the split CSV (columns ``img_name, age, label, img_path, mask_path, seg_path``).
        data_dir: root the CSV paths are relative to (default: the parent of the ``splits`` folder).
        contrast: ``"t1"`` or ``"t2"`` to read that contrast of each case; ``None`` keeps ``img_path`` as it is.

    Returns:
        list of entries with ``image``, ``mask`` and, for rows with a segmentation, ``seg`` (absolute paths), plus
        ``name``, ``label`` and ``age``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MissingInputError(f"split CSV not found: {csv_path}")
    if contrast is not None and contrast not in CONTRASTS:
        raise InputError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    root = Path(data_dir) if data_dir is not None else csv_path.parent.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("img_path", "mask_path") if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {missing}; expected {list(SPLIT_COLUMNS)}")
        rows = list(reader)
    entries, lines = [], {}
    for i, row in enumerate(rows, start=2):
        if not row["img_path"]:
            raise InputError(f"{csv_path}, line {i}: empty img_path")
        if row["img_path"] in lines:
            first = lines[row["img_path"]]
            raise InputError(f"{csv_path}, line {i}: duplicate row, {row['img_path']} is on line {first} too")
        lines[row["img_path"]] = i
        for column in ("img_path", "mask_path", "seg_path"):
            if row.get(column) and row[column].lower() not in ("nan", "none") and _outside(root, row[column]):
                raise InputError(
                    f"{csv_path}, line {i}: {column} {row[column]} lies outside the data folder {root} "
                    "(split CSV paths are relative to it)"
                )
        image = Path(_resolve(root, row["img_path"]))
        if contrast is not None and image.parent.name.lower() != contrast:
            image = _swap_contrast(image, contrast)
        entry = {"image": str(image), "name": row.get("img_name") or case_name(image)}
        if row.get("mask_path"):
            entry["mask"] = _resolve(root, row["mask_path"])
        if row.get("seg_path") and row["seg_path"].lower() not in ("nan", "none"):
            entry["seg"] = _resolve(root, row["seg_path"])
        for key in ("label", "age"):
            if row.get(key) not in (None, ""):
                entry[key] = float(row[key])
        entries.append(entry)
    return entries


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """Entries of one section of a MONAI datalist JSON, with paths made absolute (relative ones to the JSON file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(content, dict) or key not in content:
        present = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path}: no section {key!r}; sections present: {present}")
    entries = []
    for i, item in enumerate(content[key]):
        item = {"image": item} if isinstance(item, str) else dict(item)
        if "image" not in item:
            raise InputError(f"{path}: entry {i} of {key!r} has no 'image'")
        for k in ENTRY_KEYS:
            if item.get(k):
                item[k] = _resolve(path.parent, item[k])
            else:
                item.pop(k, None)
        item.setdefault("name", case_name(item["image"]))
        entries.append(item)
    return entries


def list_image_folder(folder: str | os.PathLike) -> list[dict]:
    """Entries for every image (NIfTI or PNG) directly inside ``folder``, sorted by name, without masks."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise MissingInputError(f"no NIfTI or PNG images in {folder}")
    return [{"image": str(p), "name": case_name(p)} for p in files]


def dataset_entries(
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    key: str = "training",
    contrast: str | None = "t2",
    set_name: str = "IXI",
    split: str = "train_fold0",
    validate: bool = True,
    healthy_only: bool = False,
) -> list[dict]:
    """The entries a bundle runs on, from whichever source the user configured.

    Args:
        dataset_dir: a seed-layout root (has ``splits/``) or a plain folder of images.
        datalist: a datalist JSON; when given it overrides the split CSVs and ``key`` selects its section.
        key: datalist section (``training``, ``validation``, ``test``).
        contrast: contrast to read from the seed layout (``t1``/``t2``).
        set_name, split: the split CSV ``splits/<set_name>_<split>.csv`` to read from the seed layout.
        validate: check files and geometries (see :func:`validate_entries`).
        healthy_only: keep only entries without a lesion segmentation (e.g. for validation losses on healthy data).
    """
    if datalist:
        entries = load_datalist(datalist, key)
    elif dataset_dir is None:
        raise InputError("set dataset_dir (seed layout or image folder) or datalist")
    elif not Path(dataset_dir).is_dir():
        raise MissingInputError(f"dataset_dir not found: {dataset_dir}")
    elif (Path(dataset_dir) / "splits").is_dir():
        entries = load_split_csv(split_csv_path(dataset_dir, set_name, split), dataset_dir, contrast)
    else:
        entries = list_image_folder(dataset_dir)
    if healthy_only:
        entries = [e for e in entries if not e.get("seg")]
    if not entries:
        source = f"datalist {datalist}, section {key!r}" if datalist else f"dataset_dir {dataset_dir}"
        if not datalist and (Path(dataset_dir) / "splits").is_dir():
            source = str(split_csv_path(dataset_dir, set_name, split))
        raise InputError(f"{source}: no cases{' without a segmentation' if healthy_only else ''} (empty data set)")
    if validate:
        validate_entries(entries)
    return entries


def evaluation_entries(
    dataset_dir: str | os.PathLike | None,
    datalist: str | os.PathLike | None,
    contrast: str | None = "t2",
    test_set: str = "Brats21",
    healthy_set: str = "IXI",
    healthy_split: str = "val_fold0",
) -> tuple[list[dict], list[dict]]:
    """Validation and test entries of a labelled data set.

    From a datalist: its ``validation`` (labelled and healthy cases together; healthy ones have no ``seg``) and
    ``test`` sections. From the seed layout: ``<test_set>_val.csv`` plus the healthy ``<healthy_set>_<healthy_split>``
    CSV as validation, ``<test_set>_test.csv`` as test.
    """
    if datalist:
        return dataset_entries(None, datalist, "validation"), dataset_entries(None, datalist, "test")
    val = dataset_entries(dataset_dir, None, contrast=contrast, set_name=test_set, split="val")
    val += dataset_entries(dataset_dir, None, contrast=contrast, set_name=healthy_set, split=healthy_split)
    return val, dataset_entries(dataset_dir, None, contrast=contrast, set_name=test_set, split="test")


def evaluation_sets(
    dataset_dir: str | os.PathLike | None,
    datalist: str | os.PathLike | None,
    contrast: str | None = "t2",
    test_sets: str | Sequence[str] = "Brats21",
    healthy_set: str = "IXI",
    healthy_split: str = "val_fold0",
) -> dict[str, tuple[list[dict], list[dict]]]:
    """:func:`evaluation_entries` of each test set, ``{name: (val, test)}``; a datalist is one set, named after it."""
    if datalist:
        return {Path(datalist).stem: evaluation_entries(None, datalist)}
    names = [test_sets] if isinstance(test_sets, str) else list(test_sets)
    if not names or len(set(names)) != len(names):
        raise InputError(f"test_sets must name distinct test sets, got {names}")
    return {s: evaluation_entries(dataset_dir, None, contrast, s, healthy_set, healthy_split) for s in names}


def inference_entries(
    input_file: str | os.PathLike | None,
    input_mask: str | os.PathLike | None,
    dataset_dir: str | os.PathLike | None,
    datalist: str | os.PathLike | None,
    key: str = "test",
    contrast: str | None = "t2",
    set_name: str = "IXI",
    split: str = "test",
) -> list[dict]:
    """Entries to run inference on: one file (``input_file``, optional ``input_mask``) if given, else the data set."""
    if input_file:
        entry = {"image": str(input_file), "name": case_name(input_file)}
        if input_mask:
            entry["mask"] = str(input_mask)
        validate_entries([entry])
        return [entry]
    return dataset_entries(dataset_dir, datalist, key, contrast, set_name, split)


INFERENCE_KEY_FILE = ".inference_key.json"


def pending_cases(
    entries: Sequence[dict],
    output_dir: str | os.PathLike,
    threshold: float | None = None,
    overwrite: bool = False,
    key: str = "",
) -> list[dict]:
    """The entries whose inference outputs are not all in ``output_dir`` yet, so that a run started again after an
    interruption goes on where it stopped; temporary files of the interrupted run are removed first.

    A case is done when its anomaly map exists and, with a calibrated ``threshold``, its mask (and, for a DICOM series
    folder, its DICOM SEG), each newer than the case's input files: they are written atomically, in that order. The
    outputs count only when ``key`` (the weights, threshold and settings of this run) is the one stored in
    ``output_dir`` (``.inference_key.json``, written when the key changes) and they are newer than it; ``overwrite``
    recomputes every case.
    """
    out = Path(output_dir)
    remove_stale_temporaries(out)
    key_file = out / INFERENCE_KEY_FILE
    stored = json.loads(key_file.read_text()).get("key") if key_file.is_file() else None
    if stored != key:  # stored once per key: outputs older than the file belong to another run
        if any(out.glob("*_anomaly_map.nii.gz")) and not overwrite:
            logger.warning("%s holds outputs of other weights or settings: every case is inferred again", out)
        atomic_write_text(key_file, json.dumps({"key": key}) + "\n")
        return list(entries)
    if overwrite:
        return list(entries)
    since = os.path.getmtime(key_file)

    def done(entry: dict) -> bool:
        name = case_name(entry["image"])
        outputs = [out / f"{name}_anomaly_map.nii.gz"]
        if threshold is not None:
            outputs.append(out / f"{name}_anomaly_mask.nii.gz")
            if Path(entry["image"]).is_dir():
                outputs.append(out / f"{Path(entry['image']).name}_anomaly_seg.dcm")
        if not all(o.is_file() for o in outputs):
            return False
        inputs = [entry[k] for k in ENTRY_KEYS if entry.get(k)]
        return min(map(os.path.getmtime, outputs)) >= max(since, *map(os.path.getmtime, inputs))

    pending = [e for e in entries if not done(e)]
    if len(pending) < len(entries):
        logger.warning(
            "%d of %d case(s) already have their outputs in %s: skipped (set overwrite true to recompute them)",
            len(entries) - len(pending),
            len(entries),
            out,
        )
    return pending


def dicom_series_geometry(folder: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine of the one DICOM series in ``folder``, as ``LoadImage`` (ITK) will read it.

    Raises:
        ValueError: the folder holds no DICOM series, or more than one (each is named by its series UID).
    """
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetDirectory(str(folder))
    series = list(names.GetSeriesUIDs())
    if not series:
        raise InputError(f"{folder}: a folder, but no DICOM series in it (expected the files of one DICOM series)")
    if len(series) > 1:
        raise InputError(
            f"{folder}: {len(series)} DICOM series in one folder ({', '.join(series)}); give a folder with one series"
        )
    data, meta = _read_dicom_series(folder)
    return tuple(int(n) for n in data.shape), np.asarray(meta["affine"])


def _read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Voxels and metadata of the DICOM series in ``folder``, read as ``LoadImage`` (ITK) reads it."""
    from monai.data import ITKReader

    reader = ITKReader()
    try:
        return reader.get_data(reader.read(str(folder)))
    except RuntimeError as e:
        raise InputError(f"{folder}: not a readable DICOM series ({e})") from e


class FieldOfViewPNGReader(PILReader):
    """PNG slices that cover a known field of view, read on the physical grid it gives them.

    A PNG stores no spacing. For slices of one registered space stored at any resolution (e.g. MNI152 axial slices,
    233 mm anterior -> posterior in rows, 197 mm left -> right in columns), the spacing of each axis is the field of
    view over its pixel count, so a 128 x 128 and a 233 x 197 slice of that space resample to one grid. The array keeps
    the file's (rows, columns) order (MONAI's ``PILReader`` swaps them by default), as the slices' NIfTI copies store
    it; the affine is that diagonal spacing. Other formats fall through to MONAI's default readers.

    Args:
        field_of_view: millimetres covered by the rows and by the columns.
    """

    def __init__(self, field_of_view: Sequence[float], **kwargs) -> None:
        super().__init__(reverse_indexing=False, **kwargs)
        self.field_of_view = tuple(float(f) for f in field_of_view)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """(rows, columns) array and its metadata, the affine spacing = field of view / pixels."""
        array, meta = super().get_data(img)
        shape = array.shape[:2]  # a colour channel, if any, is last
        affine = np.diag([fov / n for fov, n in zip(self.field_of_view, shape, strict=True)] + [1.0])
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(shape)
        meta[MetaKeys.AFFINE] = meta[MetaKeys.ORIGINAL_AFFINE] = affine
        return array, meta


def image_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Spatial shape and affine of an image file, reading only its header (PNG: shape, no affine), or of the DICOM
    series in a folder (see ``dicom_series_geometry``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable NIfTI or PNG image, or the folder not one DICOM series.
    """
    path = Path(path)
    if path.is_dir():
        return dicom_series_geometry(path)
    if not path.is_file():
        raise MissingInputError(f"image file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".png"):
            with Image.open(path) as im:
                return (im.height, im.width), None
        if name.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            return tuple(int(s) for s in img.shape), img.affine
    except (OSError, UnidentifiedImageError, nib.filebasedimages.ImageFileError, EOFError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from e
    raise InputError(f"{path}: unsupported image format (expected one of {IMAGE_SUFFIXES})")


def image_array(path: str | os.PathLike) -> np.ndarray:
    """The voxels of an image file (NIfTI, PNG) or of the DICOM series in a folder, as stored (no reorientation)."""
    path = Path(path)
    if path.is_dir():
        return np.asarray(_read_dicom_series(path)[0])
    if path.name.lower().endswith(".png"):
        with Image.open(path) as im:
            return np.asarray(im)
    return np.asanyarray(nib.load(path).dataobj)


def _check_contents(entry: dict) -> None:
    """Voxel checks of one entry: a finite, non-constant image; a finite, binary, non-empty brain mask; a finite
    segmentation (labels other than 0/1 are logged: any label > 0 is lesion)."""
    for key in ("image", "mask", "seg"):
        if not entry.get(key):
            continue
        array = image_array(entry[key])
        if not np.issubdtype(array.dtype, np.number):
            raise InputError(f"{entry[key]}: {key} voxels of type {array.dtype} are not numbers")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise InputError(f"{entry[key]}: {key} contains NaN or infinite values ({bad} voxels)")
        if key == "image" and array.min() == array.max():
            raise InputError(f"{entry[key]}: constant image (every voxel is {array.flat[0]}): nothing to reconstruct")
        if key == "mask":
            inside = array[array != 0]
            if inside.size == 0:
                raise InputError(f"{entry[key]}: brain mask is empty (no voxel > 0)")
            if inside.min() != inside.max() or inside.min() < 0:
                raise InputError(
                    f"{entry[key]}: brain mask is not binary (values from {array.min():g} to {array.max():g}; a "
                    "probability map?): give a 0/1 mask, e.g. thresholded at 0.5"
                )
        if key == "seg":
            labels = np.unique(array[array != 0])
            if labels.size and not np.array_equal(labels, [1]):
                logger.warning(
                    "%s: segmentation labels %s binarised: every label > 0 counts as lesion",
                    entry[key],
                    [f"{v:g}" for v in labels[:8]],
                )


def check_cases(
    splits: dict[str, Sequence[dict]],
    reference: dict[str, Sequence[dict]] | None = None,
    optional: Sequence[str] = (),
    unique_names: bool = False,
) -> int:
    """The start-up pass over every case of a run, before any long work: files and geometries
    (:func:`validate_entries`) and voxels (finite, non-constant images; binary, non-empty brain masks; segmentation
    labels), with a progress bar; one warning for the cases without a brain mask (how many, the first few names),
    then one for each pair of splits that share cases.

    Args:
        splits: the entries of each split the run uses, ``{"training": [...], "validation": [...]}``.
        reference: splits only compared with, not read (e.g. the training split at evaluation).
        optional: splits that may be empty (a warning; e.g. validation, which training then skips).
        unique_names: refuse two cases of one name (inference writes ``<name>_anomaly_map.nii.gz``).

    Returns:
        the number of cases checked.

    Raises:
        InputError: naming the file and the problem.
    """
    for name, split in splits.items():
        if not split and name not in optional:
            raise InputError(f"the {name} split has no cases (empty data set)")
        if not split:
            logger.warning("the %s split has no cases: it is skipped", name)
    entries = list({id(e): e for split in splits.values() for e in split}.values())
    if unique_names:
        seen: dict[str, str] = {}
        for e in entries:
            name = case_name(e["image"])
            if seen.setdefault(name, e["image"]) != e["image"]:
                raise InputError(
                    f"{e['image']}: same case name {name!r} as {seen[name]}; the outputs would overwrite each other "
                    "(give the files distinct names)"
                )
    validate_entries(entries)
    unmasked = [case_name(e["image"]) for e in entries if not e.get("mask")]
    if unmasked:
        logger.warning(
            "%d of %d case(s) have no brain mask given (%s%s): a foreground mask is derived from each image",
            len(unmasked),
            len(entries),
            ", ".join(unmasked[:3]),
            " ..." if len(unmasked) > 3 else "",
        )
    for entry in tqdm(entries, desc="checking data", unit="case", disable=len(entries) < 10):
        _check_contents(entry)
    named = {**splits, **(reference or {})}
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = _shared_cases(named[a], named[b])
            if shared:
                logger.warning(
                    "%d case(s) are in both the %s and the %s split (%s%s): results on them are not held out (the "
                    "reference splits of the cDDPM data have such overlaps)",
                    len(shared),
                    a,
                    b,
                    ", ".join(shared[:5]),
                    " ..." if len(shared) > 5 else "",
                )
    logger.info("checked %d case(s): %s", len(entries), ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return len(entries)


def evaluation_splits(sets: dict[str, tuple[Sequence[dict], Sequence[dict]]]) -> dict[str, list[dict]]:
    """``{"validation": [...], "test": [...]}`` of :func:`evaluation_sets`' sets, each case once (sets share their
    healthy validation cases), for :func:`check_cases`."""
    splits: dict[str, dict[tuple, dict]] = {"validation": {}, "test": {}}
    for pair in sets.values():
        for split, cases in zip(splits, pair, strict=True):
            splits[split].update({(e["image"], e.get("mask"), e.get("seg")): e for e in cases})
    return {split: list(cases.values()) for split, cases in splits.items()}


def _shared_cases(a: Sequence[dict], b: Sequence[dict]) -> list[str]:
    """Names of the cases of ``b`` that are in ``a`` too: the same image file, or the same case name."""
    files = {os.path.realpath(e["image"]) for e in a}
    names = {e.get("name", case_name(e["image"])) for e in a}
    return sorted(
        e.get("name", case_name(e["image"]))
        for e in b
        if os.path.realpath(e["image"]) in files or e.get("name", case_name(e["image"])) in names
    )


def training_reference(
    dataset_dir: str | os.PathLike | None,
    datalist: str | os.PathLike | None,
    contrast: str | None = "t2",
    healthy_set: str = "IXI",
    healthy_split: str = "val_fold0",
) -> dict[str, list[dict]]:
    """``{"training": entries}`` of the training split next to an evaluation's data (the datalist's ``training``
    section, or the seed layout's ``<healthy_set>_train_foldK.csv`` of the fold of ``healthy_split``), to warn about
    test cases trained on; ``{}`` when the data have none."""
    split = healthy_split.replace("val", "train", 1)
    if datalist:
        content = json.loads(Path(datalist).read_text())
        return {"training": load_datalist(datalist, "training")} if "training" in content else {}
    if dataset_dir and split_csv_path(dataset_dir, healthy_set, split).is_file():
        return {"training": load_split_csv(split_csv_path(dataset_dir, healthy_set, split), dataset_dir, contrast)}
    return {}


def validate_entries(entries: Sequence[dict], atol: float = 1e-3) -> None:
    """Check that every listed file exists, is a 2D/3D image, and that image, mask and seg share one geometry.

    Raises:
        FileNotFoundError or ValueError naming the offending file and the problem.
    """
    for entry in entries:
        shape, affine = image_geometry(entry["image"])
        spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
        if len(spatial) not in (2, 3):
            raise InputError(f"{entry['image']}: expected a 2D or 3D image, got shape {shape} (a 4D series?)")
        for key in ("mask", "seg"):
            if not entry.get(key):
                continue
            other_shape, other_affine = image_geometry(entry[key])
            if other_shape != shape:
                raise InputError(
                    f"{entry[key]}: {key} shape {other_shape} does not match image {entry['image']} {shape}"
                )
            if affine is not None and other_affine is not None and not np.allclose(affine, other_affine, atol=atol):
                raise InputError(
                    f"{entry[key]}: {key} geometry (affine) does not match image {entry['image']}:\n"
                    f"{np.round(other_affine, 3)}\nvs\n{np.round(affine, 3)}"
                )
