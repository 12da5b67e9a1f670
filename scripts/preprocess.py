"""Bring a brain MRI into the protocol of the bundles (ITK): RAS, 1 mm, N4, affine to MNI152, cropped to the brain.

Steps, one small function each:

1. read the image (float32) with its brain mask and optional lesion segmentation (uint8) and validate them
   (file exists, 3D, one geometry, no NaN/Inf, mask not empty);
2. reorient to RAS (nibabel/MONAI convention; ``LPI`` in ITK's naming);
3. resample to 1 mm isotropic (linear for the image, nearest neighbour for mask and seg);
4. N4 bias-field correction inside the brain mask (fitted on a shrunk copy, applied at full resolution);
5. affine registration of the skull-stripped image to a template (default: the MNI152 2009a T1 shipped with
   nilearn, its brain mask = template > 0) with ITK's registration v4 (Mattes mutual information, 3 levels);
6. resampling onto the template grid (image linear, mask and seg nearest neighbour);
7. cropping to the bounding box of the brain mask plus a margin;
8. atomic writing of ``<case>_image.nii.gz``, ``<case>_mask.nii.gz``, ``<case>_seg.nii.gz`` and the affine transform
   ``<case>_affine.tfm``: it maps template points to input points (ITK physical LPS coordinates; steps 2-3 keep those
   unchanged), so results on the template grid go back onto the input grid by resampling through this transform.

Skull stripping is NOT done here: supply a brain mask per image (e.g. from HD-BET, SynthStrip or FSL BET).

Examples::

    python scripts/preprocess.py --image sub1_T1.nii.gz --mask sub1_mask.nii.gz --seg sub1_seg.nii.gz --out-dir out
    python scripts/preprocess.py --datalist datalist.json --out-dir out  # writes out/datalist.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from lib.datalists import write_datalist
from lib.mni152 import mni152_path
from tqdm import tqdm
from uad.data import case_name, load_datalist
from uad.files import atomic_output

__all__ = [
    "DEFAULT_TEMPLATE",
    "apply_transform",
    "crop_to_mask",
    "load_template",
    "main",
    "n4_bias_correction",
    "preprocess_case",
    "preprocess_datalist",
    "read_case",
    "register_affine",
    "reorient_ras",
    "resample_isotropic",
    "write_image",
]

ImageF = itk.Image[itk.F, 3]
ImageUC = itk.Image[itk.UC, 3]
SECTIONS = ("training", "validation", "test")


DEFAULT_TEMPLATE = mni152_path("t1")  # MNI152 2009a symmetric T1, skull-stripped, 1 mm (in the nilearn wheel)


# ----------------------------------------------------------------------------------------------------------- reading
def _check_file(path: str | os.PathLike, what: str) -> str:
    """The path as a string; ``FileNotFoundError`` naming it when it is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    return str(path)


def _read_3d(path: str | os.PathLike, pixel_type, what: str) -> itk.Image:
    """Read a 3D image (trailing singleton dimensions allowed) as ``pixel_type``; ``ValueError`` if it is not 3D."""
    path = _check_file(path, what)
    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError(f"{path}: {what} is not an image format ITK can read")
    io.SetFileName(path)
    io.ReadImageInformation()
    shape = tuple(io.GetDimensions(d) for d in range(io.GetNumberOfDimensions()))
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise ValueError(f"{path}: {what} must be a 3D image, got {len(shape)}D with size {shape}")
    reader = itk.ImageFileReader[itk.Image[pixel_type, 3]].New(FileName=path)
    reader.Update()
    return reader.GetOutput()


def _same_geometry(ref: itk.Image, other: itk.Image, atol: float = 1e-3) -> str | None:
    """``None`` if both images share size, spacing, origin and direction (within ``atol``), else what differs."""
    checks = {
        "size": (tuple(ref.GetLargestPossibleRegion().GetSize()), tuple(other.GetLargestPossibleRegion().GetSize())),
        "spacing": (tuple(ref.GetSpacing()), tuple(other.GetSpacing())),
        "origin": (tuple(ref.GetOrigin()), tuple(other.GetOrigin())),
        "direction": (itk.array_from_matrix(ref.GetDirection()), itk.array_from_matrix(other.GetDirection())),
    }
    for name, (a, b) in checks.items():
        if np.shape(a) != np.shape(b) or not np.allclose(a, b, atol=atol):
            return f"{name} {np.round(b, 4).tolist()} != {np.round(a, 4).tolist()}"
    return None


def read_case(
    image_path: str | os.PathLike, mask_path: str | os.PathLike, seg_path: str | os.PathLike | None = None
) -> dict[str, itk.Image]:
    """Read and validate one case: ``{"image": float32, "mask": uint8 in {0, 1}, "seg": uint8 (if given)}``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: not 3D, mask/seg geometry differs from the image, NaN/Inf in the image, or empty mask.
    """
    case = {"image": _read_3d(image_path, itk.F, "image"), "mask": _read_3d(mask_path, itk.UC, "mask")}
    if seg_path is not None:
        case["seg"] = _read_3d(seg_path, itk.UC, "seg")
    paths = {"image": image_path, "mask": mask_path, "seg": seg_path}
    for key in ("mask", "seg"):
        if key in case and (diff := _same_geometry(case["image"], case[key])):
            raise ValueError(f"{paths[key]}: {key} geometry does not match image {image_path}: {diff}")
    if not _all_finite(image_path, case["image"]):
        raise ValueError(f"{image_path}: image contains NaN or infinite values")
    mask = itk.array_view_from_image(case["mask"])
    if not mask.any():
        raise ValueError(f"{mask_path}: brain mask is empty (no voxel > 0)")
    case["mask"] = _like((mask > 0).astype(np.uint8), case["mask"])
    return case


def _all_finite(path: str | os.PathLike, image: itk.Image) -> bool:
    """Whether every voxel is finite. ITK 5 silently reads NaN/Inf in NIfTI files as 0, so those are checked on disk."""
    if str(path).lower().endswith((".nii", ".nii.gz")):
        nifti = nib.load(path)
        if not np.issubdtype(nifti.get_data_dtype(), np.floating):
            return True
        return bool(np.isfinite(np.asanyarray(nifti.dataobj)).all())
    return bool(np.isfinite(itk.array_view_from_image(image)).all())


@functools.lru_cache(maxsize=2)
def load_template(template_path: str | None = None, template_mask_path: str | None = None) -> tuple[itk.Image, ...]:
    """Template image (float32) and brain mask (uint8; ``template > 0`` unless a mask file is given), RAS."""
    template = reorient_ras(_read_3d(template_path or DEFAULT_TEMPLATE, itk.F, "template"))
    if template_mask_path is None:
        mask = _like((itk.array_view_from_image(template) > 0).astype(np.uint8), template)
    else:
        mask = reorient_ras(_read_3d(template_mask_path, itk.UC, "template mask"))
        if diff := _same_geometry(template, mask):
            raise ValueError(f"{template_mask_path}: template mask geometry does not match the template: {diff}")
        mask = _like((itk.array_view_from_image(mask) > 0).astype(np.uint8), mask)
    return template, mask


def _like(array: np.ndarray, ref: itk.Image) -> itk.Image:
    """An ITK image of ``array`` with the geometry of ``ref``."""
    image = itk.image_from_array(np.ascontiguousarray(array))
    image.CopyInformation(ref)
    return image


# ---------------------------------------------------------------------------------------------------------- geometry
def reorient_ras(image: itk.Image) -> itk.Image:
    """Permute/flip the axes so that the voxel axes point to Right, Anterior, Superior (nibabel's ``RAS``).

    ITK names an orientation by where the axes come *from*, so nibabel's RAS is ITK's ``LPI``.
    """
    orient = itk.OrientImageFilter[type(image), type(image)].New(Input=image, UseImageDirection=True)
    orient.SetDesiredCoordinateOrientation(
        itk.SpatialOrientationEnums.ValidCoordinateOrientations_ITK_COORDINATE_ORIENTATION_LPI
    )
    orient.Update()
    return orient.GetOutput()


def _resample(
    image: itk.Image,
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: itk.Matrix,
    transform: itk.Transform | None = None,
    nearest: bool = False,
) -> itk.Image:
    """Resample ``image`` onto a grid, through ``transform`` (output to input points), linear or nearest."""
    interp = itk.NearestNeighborInterpolateImageFunction if nearest else itk.LinearInterpolateImageFunction
    resampler = itk.ResampleImageFilter[type(image), type(image)].New(
        Input=image,
        Interpolator=interp[type(image), itk.D].New(),
        Size=[int(s) for s in size],
        OutputSpacing=[float(s) for s in spacing],
        OutputOrigin=[float(o) for o in origin],
        OutputDirection=direction,
        DefaultPixelValue=0,
    )
    if transform is not None:
        resampler.SetTransform(transform)
    resampler.Update()
    return resampler.GetOutput()


def resample_isotropic(image: itk.Image, spacing: float = 1.0, nearest: bool = False) -> itk.Image:
    """Resample to ``spacing`` mm isotropic over the same field of view (linear, or nearest for label maps)."""
    old_spacing = np.asarray(image.GetSpacing(), float)
    old_size = np.asarray(image.GetLargestPossibleRegion().GetSize(), float)
    size = np.maximum(np.round(old_size * old_spacing / spacing), 1).astype(int)
    direction = itk.array_from_matrix(image.GetDirection())
    # keep the outer edge of the field of view: shift the first voxel centre by half the change of spacing
    origin = np.asarray(image.GetOrigin(), float) + direction @ ((spacing - old_spacing) / 2)
    return _resample(image, size, [spacing] * 3, origin, image.GetDirection(), nearest=nearest)


def apply_transform(
    image: itk.Image, reference: itk.Image, transform: itk.Transform | None = None, nearest: bool = False
) -> itk.Image:
    """Resample ``image`` onto the grid of ``reference`` through ``transform`` (reference to image points)."""
    return _resample(
        image,
        reference.GetLargestPossibleRegion().GetSize(),
        reference.GetSpacing(),
        reference.GetOrigin(),
        reference.GetDirection(),
        transform,
        nearest,
    )


def crop_to_mask(images: dict[str, itk.Image], mask: itk.Image, margin: int = 2) -> dict[str, itk.Image]:
    """Crop every image (same grid as ``mask``) to the bounding box of ``mask > 0`` plus ``margin`` voxels."""
    nonzero = np.nonzero(itk.array_view_from_image(mask))
    if not nonzero[0].size:
        raise ValueError("brain mask is empty after resampling: the registration probably failed")
    size_zyx = np.asarray(itk.array_view_from_image(mask).shape)
    lower = np.maximum(np.array([ax.min() for ax in nonzero]) - margin, 0)
    upper = np.minimum(np.array([ax.max() for ax in nonzero]) + margin + 1, size_zyx)
    region = itk.ImageRegion[3]()
    region.SetIndex([int(i) for i in lower[::-1]])  # numpy is (z, y, x), ITK (x, y, z)
    region.SetSize([int(s) for s in (upper - lower)[::-1]])
    out = {}
    for key, image in images.items():
        roi = itk.RegionOfInterestImageFilter[type(image), type(image)].New(Input=image, RegionOfInterest=region)
        roi.Update()
        out[key] = roi.GetOutput()
    return out


# ------------------------------------------------------------------------------------------------------- intensities
def n4_bias_correction(
    image: itk.Image, mask: itk.Image, shrink: int = 4, iterations: Sequence[int] = (20, 20, 20)
) -> itk.Image:
    """N4 bias-field correction inside ``mask``: fitted on a copy shrunk by ``shrink``, applied at full resolution."""
    array = np.clip(itk.array_from_image(image), 0, None)  # N4 works on log intensities
    image = _like(array, image)
    n4 = itk.N4BiasFieldCorrectionImageFilter[ImageF, ImageUC, ImageF].New(
        Input=itk.shrink_image_filter(image, shrink_factors=[shrink] * 3),
        MaskImage=itk.shrink_image_filter(mask, shrink_factors=[shrink] * 3),
        MaskLabel=1,
        NumberOfFittingLevels=len(iterations),
        MaximumNumberOfIterations=[int(i) for i in iterations],
    )
    n4.Update()
    n4.SetInput(image)  # the B-spline field is then evaluated on the full-resolution grid
    log_field = itk.array_view_from_image(n4.ReconstructBiasField(n4.GetLogBiasFieldControlPointLattice()))
    return _like((array / np.exp(log_field)).astype(np.float32), image)


# ------------------------------------------------------------------------------------------------------ registration
def _centroid(mask: itk.Image) -> np.ndarray:
    """Physical centre of mass of ``mask > 0``."""
    index = np.mean(np.nonzero(itk.array_view_from_image(mask)), axis=1)[::-1]
    spacing, origin = np.asarray(mask.GetSpacing()), np.asarray(mask.GetOrigin())
    return origin + itk.array_from_matrix(mask.GetDirection()) @ (index * spacing)


def _skull_stripped(image: itk.Image, mask: itk.Image, spacing: float) -> itk.Image:
    """``image * mask``, smoothed and resampled to ``spacing`` mm for the optimisation."""
    masked = _like(itk.array_view_from_image(image) * itk.array_view_from_image(mask), image)
    smoothed = itk.smoothing_recursive_gaussian_image_filter(masked, sigma=0.5 * spacing)
    return resample_isotropic(smoothed, spacing)


def _optimise(
    fixed: itk.Image, moving: itk.Image, transform: itk.Transform, shrink: Sequence[int], iterations: int
) -> None:
    """Optimise ``transform`` in place: Mattes MI, regular-step gradient descent, one level per shrink factor."""
    metric = itk.MattesMutualInformationImageToImageMetricv4[ImageF, ImageF].New(NumberOfHistogramBins=32)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New(Metric=metric)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0,
        MinimumStepLength=1e-3,
        RelaxationFactor=0.5,
        NumberOfIterations=iterations,
        ScalesEstimator=scales,
        DoEstimateLearningRateOnce=True,
    )
    registration = itk.ImageRegistrationMethodv4[ImageF, ImageF].New(
        FixedImage=fixed, MovingImage=moving, Metric=metric, Optimizer=optimizer, InitialTransform=transform
    )
    registration.SetInPlace(True)
    registration.SetNumberOfLevels(len(shrink))
    registration.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    registration.SetSmoothingSigmasPerLevel([0.5 * s if s > 1 else 0.0 for s in shrink])  # in voxels
    registration.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    registration.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    registration.SetMetricSamplingPercentage(0.1)
    registration.MetricSamplingReinitializeSeed(2024)
    registration.Update()


def register_affine(
    moving: itk.Image,
    moving_mask: itk.Image,
    fixed: itk.Image,
    fixed_mask: itk.Image,
    spacing: float = 2.0,
    iterations: int = 200,
) -> itk.AffineTransform:
    """Affine transform mapping ``fixed`` (template) points to ``moving`` points, from the skull-stripped images.

    Started from the translation that aligns the brain-mask centroids, a rigid stage (shrink 4/2 of a ``spacing`` mm
    working grid) then an affine stage (shrink 4/2/1); Mattes mutual information, regular-step gradient descent
    with parameter scales from physical shifts, 10 % random sampling.
    """
    fixed_s = _skull_stripped(fixed, fixed_mask, spacing)
    moving_s = _skull_stripped(moving, moving_mask, spacing)
    fixed_centre = _centroid(fixed_mask)
    rigid = itk.Euler3DTransform[itk.D].New()
    rigid.SetCenter([float(c) for c in fixed_centre])
    rigid.SetTranslation([float(t) for t in _centroid(moving_mask) - fixed_centre])
    _optimise(fixed_s, moving_s, rigid, (4, 2), iterations)
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    _optimise(fixed_s, moving_s, affine, (4, 2, 1), iterations)
    return affine


# ----------------------------------------------------------------------------------------------------------- writing
def write_image(image: itk.Image, path: str | os.PathLike) -> str:
    """Write ``image`` atomically (``uad.files.atomic_output``)."""
    return _atomic(path, lambda tmp: itk.imwrite(image, tmp, compression=True))


def _atomic(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (same suffix), moved onto ``path`` when it succeeds."""
    with atomic_output(path) as tmp:
        write(str(tmp))
    return str(path)


# -------------------------------------------------------------------------------------------------------- pipeline
def preprocess_case(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    seg_path: str | os.PathLike | None = None,
    template_path: str | os.PathLike | None = None,
    template_mask_path: str | os.PathLike | None = None,
    n4: bool = True,
    register: bool = True,
    margin: int = 2,
    case: str | None = None,
) -> dict[str, str]:
    """Preprocess one case and write it to ``out_dir`` (see the module docstring for the steps).

    Args:
        image_path, mask_path, seg_path: the image, its brain mask and optionally a lesion segmentation (NIfTI).
        out_dir: output folder (created if needed).
        template_path, template_mask_path: registration target and its brain mask (default: nilearn's MNI152
            2009a T1 and ``template > 0``).
        n4: run the N4 bias-field correction.
        register: register affinely to the template and resample onto its grid; otherwise stay on the RAS 1 mm grid.
        margin: voxels kept around the brain-mask bounding box.
        case: output name prefix (default: the image file name without ``.nii``/``.nii.gz``).

    Returns:
        ``{"image", "mask", "seg" (if given), "transform" (if registered)}``: paths of the written files.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 voxels, got {margin}")
    images = read_case(image_path, mask_path, seg_path)
    images = {key: reorient_ras(image) for key, image in images.items()}
    images = {key: resample_isotropic(image, 1.0, nearest=key != "image") for key, image in images.items()}
    if n4:
        images["image"] = n4_bias_correction(images["image"], images["mask"])
    transform = None
    if register:
        template, template_mask = load_template(
            None if template_path is None else str(template_path),
            None if template_mask_path is None else str(template_mask_path),
        )
        transform = register_affine(images["image"], images["mask"], template, template_mask)
        images = {key: apply_transform(img, template, transform, nearest=key != "image") for key, img in images.items()}
    images = crop_to_mask(images, images["mask"], margin)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    case = case or case_name(image_path)
    outputs = {key: write_image(img, out_dir / f"{case}_{key}.nii.gz") for key, img in images.items()}
    if transform is not None:
        outputs["transform"] = _atomic(out_dir / f"{case}_affine.tfm", lambda tmp: itk.transformwrite([transform], tmp))
    return outputs


def preprocess_datalist(datalist: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Preprocess every entry of a datalist JSON (sections training/validation/test, entries image/mask/seg).

    Writes the outputs and ``out_dir/datalist.json`` (same sections, paths relative to ``out_dir``). Case names
    that repeat (``sub1/T1.nii.gz``, ``sub2/T1.nii.gz``) are prefixed with the parent folder, then numbered.
    ``kwargs`` go to :func:`preprocess_case`.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    sections = {key: load_datalist(path, key) for key in SECTIONS if key in json.loads(path.read_text())}
    if not sections:
        raise ValueError(f"{path}: no section among {SECTIONS}")
    entries = [(key, entry) for key in sections for entry in sections[key]]
    for key, entry in entries:
        if not entry.get("mask"):
            raise ValueError(f"{path}: entry {entry['image']} of {key!r} has no 'mask' (a brain mask is required)")
    names, used = [], set()
    stems = [case_name(e["image"]) for _, e in entries]
    for (_, entry), stem in zip(entries, stems, strict=True):
        name = f"{Path(entry['image']).parent.name}_{stem}" if stems.count(stem) > 1 else stem
        base, i = name, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        names.append(name)
    out = {key: [] for key in sections}
    for (key, entry), name in tqdm(list(zip(entries, names, strict=True)), desc="preprocess", unit="case"):
        result = preprocess_case(entry["image"], entry["mask"], out_dir, seg_path=entry.get("seg"), case=name, **kwargs)
        out[key].append({k: result[k] for k in ("image", "mask", "seg") if k in result})
    return write_datalist(Path(out_dir) / "datalist.json", out)


# --------------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    description = """\
Bring a brain MRI into the protocol of the bundles: read and validate, reorient to RAS, resample to 1 mm,
N4 bias-field correction in the brain mask, affine registration to a template (default: the MNI152 2009a T1
shipped with nilearn), resampling onto the template grid, cropping to the brain mask.

Skull stripping is NOT done here: supply a brain mask per image (e.g. from HD-BET, SynthStrip or FSL BET)."""
    epilog = """\
outputs: DIR/<case>_image.nii.gz, <case>_mask.nii.gz, <case>_seg.nii.gz (case = input name without .nii/.nii.gz)
and <case>_affine.tfm (ITK transform: template points -> input points); batch mode also writes DIR/datalist.json.

examples:
  python scripts/preprocess.py --image sub1_T1.nii.gz --mask sub1_mask.nii.gz --seg sub1_seg.nii.gz --out-dir out
  python scripts/preprocess.py --datalist datalist.json --out-dir out"""
    parser = argparse.ArgumentParser(
        prog="preprocess.py",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input image (NIfTI), e.g. a T1 or T2 MRI")
    source.add_argument(
        "--datalist", help="batch mode: MONAI datalist JSON (training/validation/test, entries image/mask/seg)"
    )
    parser.add_argument("--mask", help="brain mask of --image (same grid; required with --image)")
    parser.add_argument("--seg", help="optional lesion segmentation of --image (same grid)")
    parser.add_argument("--template", help="registration target (default: nilearn's MNI152 2009a T1, 1 mm)")
    parser.add_argument("--template-mask", help="brain mask of --template (default: template > 0)")
    parser.add_argument("--out-dir", required=True, help="output folder")
    parser.add_argument("--no-n4", action="store_true", help="skip the N4 bias-field correction")
    parser.add_argument("--no-register", action="store_true", help="skip the registration (stay in RAS 1 mm space)")
    parser.add_argument("--margin", type=int, default=2, help="voxels kept around the brain mask (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = _parser()
    args = parser.parse_args(argv)
    options = {
        "template_path": args.template,
        "template_mask_path": args.template_mask,
        "n4": not args.no_n4,
        "register": not args.no_register,
        "margin": args.margin,
    }
    if args.datalist and (args.mask or args.seg):
        parser.error("--mask/--seg go with --image; in batch mode the datalist entries name them")
    if args.image and not args.mask:
        parser.error("--mask is required with --image (skull stripping is not done here)")
    try:
        if args.datalist:
            print(preprocess_datalist(args.datalist, args.out_dir, **options))
        else:
            outputs = preprocess_case(args.image, args.mask, args.out_dir, seg_path=args.seg, **options)
            print(json.dumps(outputs, indent=2))
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
