"""
Fractal 2D simplex noise in pure PyTorch, used as the diffusion noise of AnoDDPM / cDDPM instead of Gaussian noise.

Conventions of :func:`simplex_noise`:

* octave ``o`` (``o = 0 .. octaves - 1``) evaluates simplex noise at
  ``(col * 2**o / frequency + ox[o], row * 2**o / frequency + oy[o])`` where ``row``/``col`` are integer pixel
  indices and ``ox``/``oy`` are random offsets in ``[0, 256)`` drawn per (sample, channel, octave). ``frequency`` is
  therefore the *period of the first octave in pixels* (one simplex lattice unit spans ``frequency`` pixels; with
  the default 64 the coarsest blobs are about 64 pixels wide), each further octave doubles the spatial frequency.
* octave ``o`` is weighted by ``persistence**o``.
* every (sample, channel) slice has its own random gradient permutation table and its own offsets, so slices are
  independent; the draw is reproducible with a seeded ``torch.Generator``.
* the sum over octaves is standardised per (sample, channel) over the spatial dims to zero mean and unit
  (population) variance, as diffusion training/sampling assumes unit-variance noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["simplex_2d", "random_permutation_table", "simplex_noise", "SimplexNoise", "GaussianNoise"]

# skew / unskew factors of the 2D simplex grid
_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_G2 = (3.0 - math.sqrt(3.0)) / 6.0
# radius^2 of a vertex's kernel support
_R2 = 0.5
# max over the plane of sum_k max(0, 0.5 - r_k^2)^4 * r_k is ~0.0100802, so this scale bounds |simplex_2d| by 1
_SCALE = 99.0
# size of the hashed lattice (noise is periodic with this period in skewed lattice coordinates)
_TABLE = 256
# max number of (sample, pixel) elements processed at once: bounds the workspace memory and, on CPU, keeps the ~14
# work buffers cache-resident (measured fastest around 2**16-2**17); accelerators prefer fewer, larger kernels
_CHUNK_ELEMENTS = 2**17
_CHUNK_ELEMENTS_ACCELERATOR = 2**22


def random_permutation_table(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """
    Draw ``n`` independent random permutations of ``0 .. 255``, each repeated twice (so indices up to 511 are valid).

    Args:
        n: number of tables.
        generator: optional generator; random numbers are drawn on its device then moved to ``device``.
        device: device of the returned table.

    Returns:
        int64 tensor of shape (n, 512).
    """
    draw_device = generator.device if generator is not None else device
    perm = torch.rand(n, _TABLE, generator=generator, device=draw_device).argsort(dim=1)
    return torch.cat([perm, perm], dim=1).to(device=device)


class _Tables:
    """Flattened per-slice lookup tables for :func:`_accumulate_skewed` (all of shape (n * 512,))."""

    def __init__(self, perm: torch.Tensor, dtype: torch.dtype) -> None:
        n = perm.shape[0]
        perm = perm.to(torch.int32)
        angles = perm.to(dtype) * (2.0 * math.pi / _TABLE)
        # the gradient of lattice vertex (i, j) is the unit vector at angle 2 pi perm[i + perm[j]] / 256, so the
        # gradient tables are indexed by i + perm[j]; "_s1" tables are shifted by one entry, i.e. absorb a +1 in i and j
        # start of each slice's table in the flattened tables, shape (n, 1)
        self.base = (torch.arange(n, device=perm.device, dtype=torch.int32) * (2 * _TABLE)).unsqueeze(1)
        # the flat permutation tables hold perm[j] + base so that i + perm[j] directly indexes the flat gradient tables
        self.perm = (perm + self.base).reshape(-1)
        self.perm_s1 = (perm.roll(-1, dims=1) + self.base).reshape(-1)
        angles_s1 = angles.roll(-1, dims=1)
        self.gx = torch.cos(angles).reshape(-1)
        self.gy = torch.sin(angles).reshape(-1)
        self.gx_s1 = torch.cos(angles_s1).reshape(-1)
        self.gy_s1 = torch.sin(angles_s1).reshape(-1)
        self.r2 = torch.tensor(_R2, device=perm.device, dtype=dtype)

    def bases(self, start: int, stop: int) -> torch.Tensor:
        """Table starts of slices ``start .. stop - 1``, shape (stop - start, 1)."""
        return self.base[start:stop]


class _Workspace:
    """Preallocated (n, m) buffers, reused across octaves to avoid allocations in the hot loop."""

    def __init__(self, n: int, m: int, device: torch.device, dtype: torch.dtype) -> None:
        self.f = [torch.empty(n, m, device=device, dtype=dtype) for _ in range(6)]
        self.i = [torch.empty(n, m, device=device, dtype=torch.int32) for _ in range(5)]

    def head(self, k: int) -> _Workspace:
        """Workspace made of the first ``k`` rows of these buffers."""
        ws = _Workspace.__new__(_Workspace)
        ws.f = [b[:k] for b in self.f]
        ws.i = [b[:k] for b in self.i]
        return ws


def _corner(
    dx: torch.Tensor,
    dy: torch.Tensor,
    idx: torch.Tensor,
    gx_table: torch.Tensor,
    gy_table: torch.Tensor,
    r2: torch.Tensor,
    out: torch.Tensor,
    amp: float,
    ws: _Workspace,
) -> None:
    """Add ``amp * max(0, 0.5 - |d|^2)^4 * <g, d>`` of one simplex vertex to ``out`` (all (n, m))."""
    gx = torch.index_select(gx_table, 0, idx.view(-1), out=ws.f[4].view(-1)).view_as(dx)
    gy = torch.index_select(gy_table, 0, idx.view(-1), out=ws.f[5].view(-1)).view_as(dx)
    w = torch.addcmul(r2, dx, dx, value=-1.0, out=ws.f[3]).addcmul_(dy, dy, value=-1.0).clamp_min_(0.0)
    w.mul_(w)
    w.mul_(w)
    dot = gx.mul_(dx).addcmul_(gy, dy)
    out.addcmul_(w, dot, value=amp)


def _accumulate_skewed(
    xs: torch.Tensor,
    ys: torch.Tensor,
    tables: _Tables,
    base: torch.Tensor,
    out: torch.Tensor,
    amp: float,
    ws: _Workspace,
) -> None:
    """
    Add ``amp`` times raw simplex noise to ``out``.

    Args:
        xs: skewed x coordinates ``x + (x + y) * F2``, shape (n, m); overwritten.
        ys: skewed y coordinates ``y + (x + y) * F2``, shape (n, m); overwritten.
        tables: lookup tables.
        base: start of each row's table in ``tables``, int32 of shape (n, 1), see :meth:`_Tables.bases`.
        out: accumulator of shape (n, m).
        amp: weight (including the normalisation to [-1, 1]).
        ws: workspace whose buffers are distinct from ``xs``, ``ys`` and ``out``.
    """
    f, i = ws.f, ws.i
    fi = torch.floor(xs, out=f[0])
    fj = torch.floor(ys, out=f[1])
    # lattice cell indices wrapped to the table size (j also offset to each slice's table)
    ii = i[0].copy_(fi).bitwise_and_(_TABLE - 1)
    jj = i[1].copy_(fj).bitwise_and_(_TABLE - 1).add_(base)
    fx = xs.sub_(fi)  # fractional position in the skewed cell, in [0, 1)
    fy = ys.sub_(fj)
    # middle vertex: (1, 0) when fx >= fy else (0, 1); floor(fx - fy + 1) is that indicator since |fx - fy| < 1
    # (clamped as rounding may give fx == 1; misclassifying fx ~ fy is harmless: the kernel of the other triangle's
    # vertex vanishes on the shared edge)
    upper = torch.sub(fx, fy, out=f[2]).add_(1.0).floor_().clamp_max_(1.0)
    upper_i = i[2].copy_(upper)
    t = torch.add(fx, fy, out=f[0]).mul_(_G2)
    x0 = fx.sub_(t)  # unskewed displacement from the cell origin
    y0 = fy.sub_(t)

    # vertex (0, 0): gradient index i + perm[j]
    idx = torch.index_select(tables.perm, 0, jj.view(-1), out=i[3].view(-1)).view_as(jj).add_(ii)
    _corner(x0, y0, idx, tables.gx, tables.gy, tables.r2, out, amp, ws)
    # vertex (1, 1): index (i + 1) + perm[j + 1] via the shifted tables
    idx = torch.index_select(tables.perm_s1, 0, jj.view(-1), out=i[3].view(-1)).view_as(jj).add_(ii)
    dx = torch.add(x0, 2.0 * _G2 - 1.0, out=f[1])
    dy = torch.add(y0, 2.0 * _G2 - 1.0, out=f[0])
    _corner(dx, dy, idx, tables.gx_s1, tables.gy_s1, tables.r2, out, amp, ws)
    # middle vertex (i1, 1 - i1): index (i + i1) + perm[j + 1 - i1]
    jidx = torch.sub(jj, upper_i, out=i[4]).add_(1)
    idx = torch.index_select(tables.perm, 0, jidx.view(-1), out=i[3].view(-1)).view_as(jj).add_(ii).add_(upper_i)
    dx = torch.sub(x0, upper, out=f[1]).add_(_G2)
    dy = torch.add(y0, upper, out=f[0]).add_(_G2 - 1.0)
    _corner(dx, dy, idx, tables.gx, tables.gy, tables.r2, out, amp, ws)


def simplex_2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """
    Raw (single octave, unstandardised) 2D simplex noise.

    The kernel of each lattice vertex is ``max(0, 0.5 - r^2)^4 * <g, d>`` (``d``: displacement from the vertex) with a
    unit gradient ``g`` at angle ``2 pi h / 256``, ``h = perm[i + perm[j]]`` for the skewed vertex indices ``(i, j)``
    wrapped to ``[0, 256)``. The result is continuous (C^2), bounded by 1 in absolute value and exactly 0 at lattice
    vertices (unskewed ``(i, j) - (i + j) * (3 - sqrt(3)) / 6``). It is periodic with period 256 in skewed lattice
    coordinates.

    Args:
        x: coordinates of shape (N, *spatial), floating point.
        y: coordinates of the same shape as ``x``.
        perm: permutation tables of shape (N, 512) (one per leading index) or (512,) (shared), e.g. from
            :func:`random_permutation_table`.

    Returns:
        noise of shape (N, *spatial) with the dtype of ``x``, in ``[-1, 1]``.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.ndim < 1 or not x.is_floating_point():
        raise ValueError("x and y must be floating point with a leading (table) dimension.")
    out_shape = x.shape
    n = out_shape[0]
    perm = perm.to(device=x.device)
    if perm.ndim == 1:
        perm = perm.unsqueeze(0).expand(n, -1)
    if perm.shape != (n, 2 * _TABLE):
        raise ValueError(f"perm must have shape ({n}, {2 * _TABLE}) or ({2 * _TABLE},), got {tuple(perm.shape)}.")
    x = x.reshape(n, -1)
    y = y.reshape(n, -1)
    s = (x + y) * _F2
    xs = x + s
    ys = y + s
    out = torch.zeros_like(xs)
    tables = _Tables(perm, x.dtype)
    ws = _Workspace(n, xs.shape[1], x.device, x.dtype)
    _accumulate_skewed(xs, ys, tables, tables.bases(0, n), out, _SCALE, ws)
    return out.reshape(out_shape)


def simplex_noise(
    shape: Sequence[int],
    *,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """
    Fractal 2D simplex noise, standardised per (sample, channel) to zero mean and unit variance.

    Octave ``o`` samples :func:`simplex_2d` at ``(col, row) * 2**o / frequency + offset`` (random offset in
    ``[0, 256)^2`` per sample, channel and octave) with amplitude ``persistence**o``; see the module docstring.

    Args:
        shape: (B, C, H, W).
        octaves: number of octaves (>= 1).
        persistence: amplitude ratio between consecutive octaves.
        frequency: period of the first octave in pixels (> 0).
        generator: optional seeded generator for reproducibility. When its device differs from ``device`` the random
            tables are drawn on the generator's device and moved.
        device: device of the output (default: the current default device).
        dtype: floating dtype of the output. The noise is computed in float64 if ``dtype`` is float64, else in
            float32, then cast.

    Returns:
        tensor of shape (B, C, H, W); each (b, c) slice has mean 0 and population std 1 (all zeros if H * W == 1).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {shape}.")
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}.")
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0, got {frequency}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}.")
    b, c, h, w = shape
    n, m = b * c, h * w
    device = torch.device(device) if device is not None else torch.empty(0).device
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if n == 0 or m == 0:
        return torch.zeros(shape, device=device, dtype=dtype)

    draw_device = generator.device if generator is not None else device
    perm = random_permutation_table(n, generator=generator, device=device)
    offsets = torch.rand(octaves, 2, n, generator=generator, device=draw_device, dtype=work_dtype)
    offsets = offsets.to(device) * _TABLE
    # skewed offsets: (u, v) = (x, y) + (x + y) * F2
    skewed = offsets + offsets.sum(dim=1, keepdim=True) * _F2

    rows = torch.arange(h, device=device, dtype=work_dtype).view(1, h, 1)
    cols = torch.arange(w, device=device, dtype=work_dtype).view(1, 1, w)
    total = torch.zeros(n, m, device=device, dtype=work_dtype)
    tables = _Tables(perm, work_dtype)
    chunk_elements = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    chunk = min(n, max(1, chunk_elements // m))
    full_ws = _Workspace(chunk, m, device, work_dtype)
    full_xs = torch.empty(chunk, m, device=device, dtype=work_dtype)
    full_ys = torch.empty_like(full_xs)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        k = stop - start
        base = tables.bases(start, stop)
        ws = full_ws.head(k)
        xs = full_xs[:k]
        ys = full_ys[:k]
        for o in range(octaves):
            sc = 2.0**o / frequency
            # skewed pixel coordinates, built from separable row/column terms
            u = skewed[o, 0, start:stop].view(k, 1, 1)
            v = skewed[o, 1, start:stop].view(k, 1, 1)
            torch.add(cols * (sc * (1.0 + _F2)) + u, rows * (sc * _F2), out=xs.view(k, h, w))
            torch.add(cols * (sc * _F2) + v, rows * (sc * (1.0 + _F2)), out=ys.view(k, h, w))
            _accumulate_skewed(xs, ys, tables, base, total[start:stop], _SCALE * persistence**o, ws)

    total -= total.mean(dim=1, keepdim=True)
    std = total.pow(2).mean(dim=1, keepdim=True).sqrt_()
    total /= std.clamp_min_(torch.finfo(work_dtype).tiny)
    return total.reshape(shape).to(dtype)


class SimplexNoise:
    """
    Callable drawing standardised fractal simplex noise shaped, typed and placed like a (B, C, H, W) tensor.

    Args:
        octaves: number of octaves.
        persistence: amplitude ratio between consecutive octaves.
        frequency: period of the first octave in pixels.

    Example::

        noise_fn = SimplexNoise(octaves=6, persistence=0.8, frequency=64)
        noise = noise_fn(images, generator=torch.Generator().manual_seed(0))  # same shape/dtype/device as images
    """

    def __init__(self, octaves: int = 6, persistence: float = 0.8, frequency: float = 64.0) -> None:
        if octaves < 1:
            raise ValueError(f"octaves must be >= 1, got {octaves}.")
        if frequency <= 0:
            raise ValueError(f"frequency must be > 0, got {frequency}.")
        self.octaves = int(octaves)
        self.persistence = float(persistence)
        self.frequency = float(frequency)

    def __call__(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return noise of ``like.shape`` (B, C, H, W) on ``like.device`` with ``like.dtype``."""
        return simplex_noise(
            like.shape,
            octaves=self.octaves,
            persistence=self.persistence,
            frequency=self.frequency,
            generator=generator,
            device=like.device,
            dtype=like.dtype,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(octaves={self.octaves}, persistence={self.persistence}, frequency={self.frequency})"
        )


class GaussianNoise:
    """Callable drawing standard Gaussian noise like a tensor; same interface as :class:`SimplexNoise`."""

    def __call__(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return N(0, 1) noise of ``like.shape`` on ``like.device`` with ``like.dtype``."""
        if generator is None:
            return torch.randn_like(like)
        noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return noise.to(like.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
