"""Post-processing of residuals agrees with scipy references."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from uad.postprocessing import erode_mask_per_slice, gaussian_smooth, median_filter_3d, residual_anomaly_map

CROSS = ndimage.generate_binary_structure(2, 1)


def _scipy_erosion(mask: np.ndarray, iterations: int) -> np.ndarray:
    slices = [ndimage.binary_erosion(mask[..., z], CROSS, iterations, border_value=0) for z in range(mask.shape[-1])]
    return np.stack(slices, axis=-1)


@pytest.mark.parametrize("iterations", [1, 3])
def test_erosion_matches_scipy_per_slice(iterations):
    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((30, 26, 5)) > 0.3)  # blobs touching the image border
    eroded = erode_mask_per_slice(torch.from_numpy(mask), iterations)
    assert eroded.dtype == torch.bool
    np.testing.assert_array_equal(eroded.numpy(), _scipy_erosion(mask, iterations))


def test_erosion_batched_float_and_border():
    mask = np.ones((2, 1, 12, 10, 3), dtype=np.float32)  # full image: only the border erodes
    eroded = erode_mask_per_slice(torch.from_numpy(mask), 3)
    assert eroded.dtype == torch.float32 and eroded.shape == mask.shape
    expected = _scipy_erosion(mask[0, 0] > 0, 3)
    assert expected[3:-3, 3:-3].all() and expected.sum() == 6 * 4 * 3
    for b in range(2):
        np.testing.assert_array_equal(eroded[b, 0].numpy() > 0, expected)


def test_erosion_does_not_mix_slices():
    mask = np.zeros((9, 9, 3), dtype=bool)
    mask[2:7, 2:7, 1] = True  # only the middle slice; a 3D erosion would delete it
    eroded = erode_mask_per_slice(torch.from_numpy(mask), 1).numpy()
    assert eroded[..., 1].sum() == 9 and not eroded[..., [0, 2]].any()


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_median_filter_matches_scipy_constant_mode(kernel_size):
    rng = np.random.default_rng(1)
    volume = rng.random((14, 11, 9)).astype(np.float32)
    expected = ndimage.median_filter(volume, size=kernel_size, mode="constant", cval=0.0)
    np.testing.assert_array_equal(median_filter_3d(torch.from_numpy(volume), kernel_size).numpy(), expected)


def test_median_filter_batched_shape():
    rng = np.random.default_rng(2)
    volumes = rng.random((2, 1, 8, 7, 6)).astype(np.float32)
    out = median_filter_3d(torch.from_numpy(volumes), 5)
    assert out.shape == volumes.shape
    for b in range(2):
        expected = ndimage.median_filter(volumes[b, 0], size=5, mode="constant", cval=0.0)
        np.testing.assert_array_equal(out[b, 0].numpy(), expected)
    with pytest.raises(ValueError):
        median_filter_3d(torch.from_numpy(volumes), 4)


def _brain(shape=(24, 24, 8)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (grid[0] ** 2 + grid[1] ** 2) < 0.8


def test_residual_map_of_identical_inputs_is_zero():
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.random((24, 24, 8)))
    amap = residual_anomaly_map(image, image.clone(), torch.from_numpy(_brain()))
    assert amap.shape == image.shape and torch.count_nonzero(amap) == 0


def test_residual_map_order_of_operations():
    rng = np.random.default_rng(4)
    image, recon = rng.random((2, 24, 24, 8))
    brain = _brain()
    amap = residual_anomaly_map(torch.from_numpy(image), torch.from_numpy(recon), torch.from_numpy(brain)).numpy()
    eroded = _scipy_erosion(brain, 3)
    expected = ndimage.median_filter(np.abs(image - recon) * eroded, size=5, mode="constant", cval=0.0) * eroded
    np.testing.assert_allclose(amap, expected, rtol=0, atol=1e-12)
    assert not amap[~eroded].any()


def test_residual_map_weight_multiplies_the_residual_before_the_filter():
    rng = np.random.default_rng(5)
    image, recon, weight = rng.random((3, 24, 24, 8))
    brain = _brain()
    amap = residual_anomaly_map(*map(torch.from_numpy, (image, recon, brain)), weight=torch.from_numpy(weight))
    eroded = _scipy_erosion(brain, 3)
    residual = np.abs(image - recon) * weight * eroded
    expected = ndimage.median_filter(residual, size=5, mode="constant", cval=0.0) * eroded
    np.testing.assert_allclose(amap.numpy(), expected, rtol=0, atol=1e-12)


def test_median_filter_single_slice_is_in_plane():
    """2D data (D = 1): a cubic window would be mostly padding and zero the map; the filter works in-plane."""
    image = np.random.default_rng(1).random((20, 18, 1)).astype(np.float32)
    expected = ndimage.median_filter(image[..., 0], size=5, mode="constant", cval=0.0)
    out = median_filter_3d(torch.from_numpy(image), 5).numpy()[..., 0]
    np.testing.assert_array_equal(out, expected)
    assert out.max() > 0


@pytest.mark.parametrize("shape", [(20, 18, 7), (20, 18, 1)])
def test_gaussian_smooth_matches_scipy_constant_mode(shape):
    """Isotropic in voxels for volumes; in-plane for a single slice (2D data), like the median filter."""
    volume = np.random.default_rng(6).random(shape)
    expected = ndimage.gaussian_filter(volume if shape[2] > 1 else volume[..., 0], 1.5, mode="constant", cval=0.0)
    out = gaussian_smooth(torch.from_numpy(volume), 1.5).numpy()
    assert out.dtype == volume.dtype and out.shape == volume.shape
    np.testing.assert_allclose(out, expected.reshape(shape), rtol=0, atol=1e-6)
    batched = gaussian_smooth(torch.from_numpy(np.stack([volume, 2 * volume])[:, None]), 1.5).numpy()
    np.testing.assert_allclose(batched[1, 0], 2 * out, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_smooth(torch.from_numpy(volume), 0)


def test_residual_map_smoothing_spreads_only_the_eroded_brain_residual():
    """The smoothing follows the masked median filter and is masked again: smoothing a stored unsmoothed map inside
    the eroded mask gives the same map (what ``scripts/smoothing_sweep.py`` relies on)."""
    rng = np.random.default_rng(7)
    image, recon = rng.random((2, 24, 24, 8))
    brain = _brain()
    args = [torch.from_numpy(a) for a in (image, recon, brain)]
    plain = residual_anomaly_map(*args).numpy()
    smoothed = residual_anomaly_map(*args, smooth_sigma=2.0).numpy()
    eroded = _scipy_erosion(brain, 3)
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(plain, 2.0, mode="constant") * eroded, atol=1e-6)
    assert not smoothed[~eroded].any() and not np.allclose(smoothed, plain)
