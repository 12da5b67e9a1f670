"""Tests of the fractal simplex noise in ``cddpm_bundle/scripts/simplex.py``."""

from __future__ import annotations

import math

import pytest
import torch

from cddpm_bundle.scripts.simplex import (
    _SCALE,
    GaussianNoise,
    SimplexNoise,
    random_permutation_table,
    simplex_2d,
    simplex_noise,
)

F2 = 0.5 * (math.sqrt(3.0) - 1.0)
G2 = (3.0 - math.sqrt(3.0)) / 6.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_simplex(x: float, y: float, perm: list[int]) -> float:
    """Scalar simplex noise summing the kernels of *all* nearby lattice vertices (independent of the 3-corner logic)."""
    s = (x + y) * F2
    i0, j0 = math.floor(x + s), math.floor(y + s)
    total = 0.0
    for i in range(i0 - 2, i0 + 4):
        for j in range(j0 - 2, j0 + 4):
            dx = x - (i - (i + j) * G2)
            dy = y - (j - (i + j) * G2)
            r2 = dx * dx + dy * dy
            if r2 < 0.5:
                h = perm[(i & 255) + perm[j & 255]]
                angle = 2.0 * math.pi * h / 256
                total += (0.5 - r2) ** 4 * (math.cos(angle) * dx + math.sin(angle) * dy)
    return total * _SCALE


def _lag1(x: torch.Tensor) -> float:
    """Mean lag-1 autocorrelation along both spatial axes of standardised (..., H, W) fields."""
    return 0.5 * ((x[..., 1:, :] * x[..., :-1, :]).mean() + (x[..., :, 1:] * x[..., :, :-1]).mean()).item()


def _power_fraction(x: torch.Tensor, cutoff: float, low: bool = True) -> float:
    """Fraction of the (non-DC) power at radial frequency <= cutoff (``low``) or > cutoff, in cycles per image."""
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x.double()).abs() ** 2
    fy = torch.fft.fftfreq(h, dtype=torch.float64) * h
    fx = torch.fft.fftfreq(w, dtype=torch.float64) * w
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    nondc = radius > 0
    band = (radius <= cutoff) if low else (radius > cutoff)
    return (power[..., band & nondc].sum() / power[..., nondc].sum()).item()


# ------------------------------------------------------------------ fractal noise: basic properties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_shape_dtype_device_finite(dtype):
    noise = simplex_noise((3, 2, 40, 56), generator=_gen(), dtype=dtype)
    assert noise.shape == (3, 2, 40, 56)
    assert noise.dtype == dtype
    assert noise.device.type == "cpu"
    assert torch.isfinite(noise).all()


def test_default_arguments_and_no_generator():
    noise = simplex_noise([2, 1, 32, 32])
    assert noise.shape == (2, 1, 32, 32) and noise.dtype == torch.float32
    assert torch.isfinite(noise).all()
    assert noise.std() > 0.5


def test_standardised_per_sample_and_channel():
    noise = simplex_noise((4, 3, 64, 48), generator=_gen(1)).double()
    mean = noise.mean(dim=(2, 3))
    std = noise.std(dim=(2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)


def test_marginal_is_bell_shaped():
    z = simplex_noise((16, 2, 96, 96), generator=_gen(2)).double().flatten(0, 1).flatten(1)
    skew = (z**3).mean(dim=1)
    assert skew.abs().mean() < 0.2
    assert abs(skew.mean().item()) < 0.1
    kurtosis = (z**4).mean().item()
    assert 2.0 < kurtosis < 4.0  # Gaussian: 3, uniform: 1.8
    central = (z.abs() < 1.0).double().mean().item()
    assert 0.6 < central < 0.8  # Gaussian: 0.683
    tails = (z.abs() > 3.0).double().mean().item()
    assert tails < 0.01


def test_spatially_smooth_versus_white_noise():
    simplex = simplex_noise((8, 1, 96, 96), generator=_gen(3))
    gauss = torch.randn(8, 1, 96, 96, generator=_gen(3))
    assert _lag1(simplex) > 0.5
    assert abs(_lag1(gauss)) < 0.05
    # most power below 12 cycles per image (white noise: ~5%)
    assert _power_fraction(simplex, 12.0) > 0.6
    assert _power_fraction(gauss, 12.0) < 0.1


def test_batch_and_channel_independence():
    noise = simplex_noise((32, 2, 96, 96), generator=_gen(4)).flatten(0, 1).flatten(1)
    corr = torch.corrcoef(noise.double())
    off = corr[~torch.eye(corr.shape[0], dtype=torch.bool)]
    assert off.abs().mean() < 0.2
    assert abs(off.mean().item()) < 0.03
    # finer noise has many more independent blobs, so every single pair is nearly uncorrelated
    fine = simplex_noise((16, 2, 96, 96), frequency=8.0, octaves=3, generator=_gen(5)).flatten(0, 1).flatten(1)
    corr = torch.corrcoef(fine.double())
    assert corr[~torch.eye(corr.shape[0], dtype=torch.bool)].abs().max() < 0.2


def test_first_sample_does_not_depend_on_batch_position():
    """No two slices (nor two octaves) share their random tables/offsets."""
    noise = simplex_noise((6, 1, 32, 32), generator=_gen(6))
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.allclose(noise[a], noise[b], atol=1e-3)


def test_determinism():
    a = simplex_noise((4, 1, 48, 48), generator=_gen(7))
    b = simplex_noise((4, 1, 48, 48), generator=_gen(7))
    c = simplex_noise((4, 1, 48, 48), generator=_gen(8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.5
    # the generator state advances: two consecutive draws differ
    gen = _gen(7)
    first, second = simplex_noise((2, 1, 16, 16), generator=gen), simplex_noise((2, 1, 16, 16), generator=gen)
    assert not torch.allclose(first, second)


def test_octaves_add_high_frequencies():
    roughness = []
    for octaves in (1, 2, 4, 6):
        noise = simplex_noise((8, 1, 96, 96), octaves=octaves, generator=_gen(9))
        roughness.append(1.0 - _lag1(noise))
    assert all(b > a for a, b in zip(roughness[:-1], roughness[1:], strict=True)), roughness
    one = simplex_noise((8, 1, 96, 96), octaves=1, generator=_gen(9))
    six = simplex_noise((8, 1, 96, 96), octaves=6, generator=_gen(9))
    assert _power_fraction(six, 24.0, low=False) > 5 * _power_fraction(one, 24.0, low=False)


def test_persistence_and_frequency_change_the_spectrum():
    high = [
        _power_fraction(simplex_noise((8, 1, 96, 96), persistence=p, generator=_gen(10)), 24.0, low=False)
        for p in (0.3, 0.8, 1.0)
    ]
    assert high[0] < high[1] < high[2], high
    coarse = simplex_noise((8, 1, 96, 96), frequency=64.0, generator=_gen(11))
    fine = simplex_noise((8, 1, 96, 96), frequency=8.0, generator=_gen(11))
    assert _lag1(fine) < _lag1(coarse)


def test_single_octave_period_follows_frequency():
    """With one octave, the correlation length scales with ``frequency`` (pixels per lattice unit)."""
    a = simplex_noise((16, 1, 128, 128), octaves=1, frequency=4.0, generator=_gen(12))
    b = simplex_noise((16, 1, 128, 128), octaves=1, frequency=8.0, generator=_gen(12))
    # lag-k correlation of b at twice the lag of a is about the same
    ca = (a[..., :, 2:] * a[..., :, :-2]).mean().item()
    cb = (b[..., :, 4:] * b[..., :, :-4]).mean().item()
    assert abs(ca - cb) < 0.1
    assert (b[..., :, 2:] * b[..., :, :-2]).mean().item() > ca + 0.1


def test_degenerate_and_invalid_shapes():
    assert simplex_noise((0, 1, 8, 8)).shape == (0, 1, 8, 8)
    single = simplex_noise((2, 1, 1, 1), generator=_gen())
    assert torch.equal(single, torch.zeros_like(single))
    with pytest.raises(ValueError):
        simplex_noise((8, 8))
    with pytest.raises(ValueError):
        simplex_noise((1, 1, 8, 8), octaves=0)
    with pytest.raises(ValueError):
        simplex_noise((1, 1, 8, 8), frequency=0.0)
    with pytest.raises(ValueError):
        simplex_noise((1, 1, 8, 8), dtype=torch.int64)


def test_chunked_evaluation_matches(monkeypatch):
    import cddpm_bundle.scripts.simplex as simplex_module

    full = simplex_noise((5, 1, 24, 24), generator=_gen(13))
    monkeypatch.setattr(simplex_module, "_CHUNK_ELEMENTS", 24 * 24 * 2)  # chunks of 2 slices (last one smaller)
    chunked = simplex_noise((5, 1, 24, 24), generator=_gen(13))
    assert torch.equal(full, chunked)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_cpu_generator():
    cpu = simplex_noise((2, 1, 32, 32), generator=_gen(14))
    cuda = simplex_noise((2, 1, 32, 32), generator=_gen(14), device="cuda")
    assert cuda.device.type == "cuda"
    assert torch.allclose(cpu, cuda.cpu(), atol=1e-3)
    like = torch.zeros(2, 1, 32, 32, device="cuda", dtype=torch.float16)
    noise = SimplexNoise()(like, generator=torch.Generator(device="cuda").manual_seed(0))
    assert noise.device == like.device and noise.dtype == torch.float16 and torch.isfinite(noise).all()
    assert GaussianNoise()(like, generator=_gen(0)).device == like.device


# ------------------------------------------------------------------ raw single-octave simplex


def test_raw_simplex_matches_scalar_reference():
    perm = random_permutation_table(1, generator=_gen(20))
    pts = torch.rand(2, 300, generator=_gen(21), dtype=torch.float64) * 40.0 - 20.0  # includes negative coords
    values = simplex_2d(pts[0:1], pts[1:2], perm)[0]
    table = perm[0].tolist()
    expected = torch.tensor([_reference_simplex(x, y, table) for x, y in pts.T.tolist()], dtype=torch.float64)
    assert torch.allclose(values, expected, atol=1e-10)
    # float32 evaluation agrees to float32 accuracy
    values32 = simplex_2d(pts[0:1].float(), pts[1:2].float(), perm[0])[0]
    assert torch.allclose(values32.double(), expected, atol=1e-4)


def test_raw_simplex_bounded_and_not_degenerate():
    perm = random_permutation_table(4, generator=_gen(22))
    pts = torch.rand(2, 4, 20000, generator=_gen(23), dtype=torch.float64) * 300.0
    values = simplex_2d(pts[0], pts[1], perm)
    assert values.shape == (4, 20000)
    assert values.abs().max() <= 1.0
    assert values.abs().max() > 0.5
    assert abs(values.mean().item()) < 0.05


def test_raw_simplex_zero_at_lattice_vertices():
    perm = random_permutation_table(1, generator=_gen(24))
    i, j = torch.meshgrid(torch.arange(-5, 30), torch.arange(-5, 30), indexing="ij")
    i, j = i.double().reshape(1, -1), j.double().reshape(1, -1)
    x, y = i - (i + j) * G2, j - (i + j) * G2
    assert simplex_2d(x, y, perm).abs().max() < 1e-12
    assert simplex_2d(x.float(), y.float(), perm).abs().max() < 1e-4
    # but not zero in between
    assert simplex_2d(x + 0.2, y + 0.1, perm).abs().max() > 0.1


def test_raw_simplex_continuous():
    perm = random_permutation_table(3, generator=_gen(25))
    step = 1e-4
    t = torch.arange(0, 20.0, step, dtype=torch.float64)
    angles = torch.tensor([0.1, 0.8, 2.0], dtype=torch.float64).unsqueeze(1)
    x, y = 3.3 + t * torch.cos(angles), -1.7 + t * torch.sin(angles)
    values = simplex_2d(x, y, perm)
    # Lipschitz bound of the 3 kernels: 3 * 0.5**4 * scale; a discontinuity would give a slope ~ 1 / step
    slope = values.diff(dim=1).abs().max() / step
    assert slope < 3 * 0.0625 * _SCALE
    assert slope > 0.1


def test_raw_simplex_periodic_and_table_dependent():
    perm = random_permutation_table(2, generator=_gen(26))
    pts = torch.rand(2, 1, 500, generator=_gen(27), dtype=torch.float64) * 50.0
    x, y = pts[0].expand(2, -1), pts[1].expand(2, -1)
    base = simplex_2d(x, y, perm)
    # shifting by 256 lattice units along the skewed i axis leaves the noise unchanged
    shifted = simplex_2d(x + 256.0 * (1.0 - G2), y - 256.0 * G2, perm)
    assert torch.allclose(base, shifted, atol=1e-9)
    # different tables give different noise at the same points
    assert (base[0] - base[1]).abs().max() > 0.1
    with pytest.raises(ValueError):
        simplex_2d(x, y[:, :10], perm)
    with pytest.raises(ValueError):
        simplex_2d(x, y, perm[:, :256])


def test_raw_simplex_rounding_edge_case():
    """A skewed coordinate just below an integer can round to a fractional part of exactly 1 in float32."""
    import cddpm_bundle.scripts.simplex as simplex_module

    xs = torch.tensor([[-1e-10, 0.5 - 1e-10, 3.0]], dtype=torch.float32)
    ys = torch.tensor([[0.0, 0.5, 3.0 - 1e-9]], dtype=torch.float32)
    tables = simplex_module._Tables(random_permutation_table(1, generator=_gen(29)), torch.float32)
    ws = simplex_module._Workspace(1, 3, torch.device("cpu"), torch.float32)
    out = torch.zeros(1, 3)
    simplex_module._accumulate_skewed(xs.clone(), ys.clone(), tables, tables.bases(0, 1), out, _SCALE, ws)
    assert torch.isfinite(out).all()
    assert out[0, 0].abs() < 1e-4 and out[0, 2].abs() < 1e-4  # (skewed) lattice vertices


def test_permutation_table():
    perm = random_permutation_table(3, generator=_gen(28))
    assert perm.shape == (3, 512) and perm.dtype == torch.int64
    assert torch.equal(perm[:, :256], perm[:, 256:])
    assert torch.equal(perm[:, :256].sort(dim=1).values, torch.arange(256).expand(3, -1))
    assert not torch.equal(perm[0], perm[1])


# ------------------------------------------------------------------ callables


def test_simplex_noise_callable():
    like = torch.zeros(3, 2, 24, 40, dtype=torch.float64)
    fn = SimplexNoise(octaves=4, persistence=0.5, frequency=16)
    noise = fn(like, generator=_gen(30))
    assert noise.shape == like.shape and noise.dtype == like.dtype and noise.device == like.device
    expected = simplex_noise(
        like.shape, octaves=4, persistence=0.5, frequency=16.0, generator=_gen(30), dtype=like.dtype
    )
    assert torch.equal(noise, expected)
    assert torch.isfinite(fn(like)).all()
    assert "octaves=4" in repr(fn)
    with pytest.raises(ValueError):
        SimplexNoise(octaves=0)


def test_gaussian_noise_callable():
    like = torch.zeros(4, 1, 32, 32)
    fn = GaussianNoise()
    noise = fn(like, generator=_gen(31))
    assert noise.shape == like.shape and noise.dtype == like.dtype
    assert torch.equal(noise, fn(like, generator=_gen(31)))
    assert torch.equal(noise, torch.randn(like.shape, generator=_gen(31)))
    assert abs(noise.std().item() - 1.0) < 0.05
    assert abs(_lag1(noise)) < 0.05
    assert fn(like.half()).dtype == torch.float16


def test_noise_callables_are_interchangeable():
    like = torch.zeros(2, 1, 16, 16)
    for fn in (SimplexNoise(), GaussianNoise()):
        out = fn(like, generator=_gen(32))
        assert out.shape == like.shape and torch.isfinite(out).all()
