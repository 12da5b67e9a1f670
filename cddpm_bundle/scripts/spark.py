"""SparK-style masked image modelling to pretrain the cDDPM conditioning encoder (a 2D ``monai.networks.nets.ResNet``).

The image is cut into a grid of square patches and a fixed share of them is masked per sample. The encoder only sees
the visible patches: masked positions are zeroed in the input and again after every encoder stage, which emulates a
sparse convolution (nothing computed from, or at, a masked position reaches a later stage). Before decoding, learned
mask tokens fill the masked positions of each stage's features; a light UNet-style decoder reconstructs the image and
the loss is the squared error on the masked patches only. The encoder's ``state_dict`` then initialises E in cDDPM.

Pieces, each usable on its own:

- :func:`random_patch_mask` draws the masks, :class:`SparKPrepareBatch` does it for Ignite engines (seeded for
  validation);
- :class:`SparKModel` ``(images, patch_mask) -> (reconstruction, patch_mask)``;
- :class:`MaskedMSELoss` ``((reconstruction, patch_mask), images) -> loss``;
- :class:`SparKFigureHandler` writes a PNG of masked inputs, reconstructions and targets when training ends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from monai.engines.utils import PrepareBatch  # noqa: E402
from monai.networks.nets.basic_unet import TwoConv, UpCat  # noqa: E402
from torch import nn  # noqa: E402

from .uad.files import atomic_write_figure  # noqa: E402
from .uad.inference import brain_slices  # noqa: E402
from .uad.training import EpochSeeded  # noqa: E402

__all__ = [
    "MaskedMSELoss",
    "SparKFigureHandler",
    "SparKModel",
    "SparKPrepareBatch",
    "denormalise_patches",
    "normalise_patches",
    "patch_grid",
    "pixel_mask",
    "random_patch_mask",
    "save_spark_figure",
]

logger = logging.getLogger(__name__)

_ENCODER_PARTS = ("conv1", "bn1", "act", "layer1", "layer2", "layer3", "layer4")


# ---------------------------------------------------------------------------------------------------------------
# masks


def patch_grid(spatial_shape: Sequence[int], patch_size: int) -> tuple[int, int]:
    """Number of patches (rows, columns) of an (H, W) image; H and W must be multiples of ``patch_size``."""
    h, w = (int(s) for s in spatial_shape[-2:])
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the mask patch size {patch_size}")
    return h // patch_size, w // patch_size


def random_patch_mask(
    batch_size: int,
    grid: Sequence[int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per sample, mask exactly ``round(mask_ratio * n)`` of the ``n = grid[0] * grid[1]`` patches, at random.

    Args:
        batch_size: number of masks B.
        grid: patches per image (rows, columns).
        mask_ratio: share of masked patches; at least one patch must stay visible and one be masked.
        generator: random generator (on ``device``) for reproducible masks.
        device: device of the result.

    Returns:
        boolean patch masks (B, 1, rows, columns), True = masked.
    """
    rows, cols = (int(g) for g in grid)
    n = rows * cols
    n_masked = round(mask_ratio * n)
    if not 0 < n_masked < n:
        raise ValueError(
            f"mask_ratio {mask_ratio} masks {n_masked} of {n} patches ({rows}x{cols} grid): "
            "at least one patch must be masked and one visible"
        )
    device = generator.device if generator is not None else device
    scores = torch.rand(batch_size, n, generator=generator, device=device)
    masked = scores.argsort(dim=1)[:, :n_masked]  # a uniformly random subset of n_masked patches per sample
    mask = torch.zeros(batch_size, n, dtype=torch.bool, device=device)
    mask.scatter_(1, masked, True)
    return mask.view(batch_size, 1, rows, cols)


def pixel_mask(patch_mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Patch masks (B, 1, rows, columns) spread to a (h, w) map (nearest); ``size`` must be a multiple of the grid."""
    rows, cols = patch_mask.shape[-2:]
    h, w = (int(s) for s in size)
    if h % rows or w % cols:
        raise ValueError(
            f"a {h}x{w} map does not split into the {rows}x{cols} mask grid: patches would not align "
            f"(use an image size that is a multiple of grid x the encoder's total stride)"
        )
    return F.interpolate(patch_mask.float(), size=(h, w), mode="nearest") > 0.5


def _patches(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, rows, columns, pixels per patch)."""
    b, c, h, w = x.shape
    rows, cols = grid
    p, q = h // rows, w // cols
    return x.reshape(b, c, rows, p, cols, q).permute(0, 1, 2, 4, 3, 5).reshape(b, c, rows, cols, p * q)


def _patch_statistics(x: torch.Tensor, grid: Sequence[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and standard deviation ``sqrt(var + eps)`` spread back to pixels, each (B, C, H, W)."""
    patches = _patches(x, grid)
    mean = patches.mean(dim=-1)
    std = (patches.var(dim=-1, unbiased=False) + eps).sqrt()
    size = x.shape[-2:]
    return F.interpolate(mean, size=size, mode="nearest"), F.interpolate(std, size=size, mode="nearest")


def normalise_patches(target: torch.Tensor, grid: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """Standardise every patch of ``target`` (B, C, H, W) to zero mean and unit variance (SparK's optional target)."""
    mean, std = _patch_statistics(target, grid, eps)
    return (target - mean) / std


def denormalise_patches(
    prediction: torch.Tensor, target: torch.Tensor, grid: Sequence[int], eps: float = 1e-6
) -> torch.Tensor:
    """Map a prediction of per-patch normalised targets back to intensities with the statistics of ``target``."""
    mean, std = _patch_statistics(target, grid, eps)
    return prediction * std + mean


# ---------------------------------------------------------------------------------------------------------------
# batches


class SparKPrepareBatch(EpochSeeded, PrepareBatch):
    """Draw patch masks for a batch: returns ``(images, images, (), {"patch_mask": mask})``.

    With ``SupervisedTrainer``/``SupervisedEvaluator`` and ``SimpleInferer`` the network is called as
    ``network(images, patch_mask=mask)`` and the loss as ``loss((reconstruction, mask), images)``.

    Args:
        patch_size: side of the square patches in pixels; the grid is (H / patch_size, W / patch_size).
        mask_ratio: share of patches masked per sample (exactly ``round(mask_ratio * n)`` of ``n``).
        image_key: key of the images in [0, 1]: slices (B, 1, H, W), or volumes (B, 1, H, W, D) whose slices with
            brain (``mask_key``, else foreground) are stacked into one batch (validation on whole volumes).
        mask_key: key of the brain masks, used for volumes only.
        seed: if set, masks come from a generator reset to this seed at every epoch start of the engine this object
            is attached to (``attach``), so validation losses are comparable across epochs.
    """

    def __init__(
        self,
        patch_size: int = 32,
        mask_ratio: float = 0.65,
        image_key: str = "image",
        mask_key: str = "mask",
        seed: int | None = None,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.patch_size = int(patch_size)
        self.mask_ratio = float(mask_ratio)
        self.image_key = image_key
        self.mask_key = mask_key
        self.seed = seed

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        images = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        images = brain_slices(images, batchdata.get(self.mask_key))
        grid = patch_grid(images.shape, self.patch_size)
        patch_mask = random_patch_mask(
            images.shape[0], grid, self.mask_ratio, self.seeded_generator(images.device), images.device
        )
        return images, images, (), {"patch_mask": patch_mask}


# ---------------------------------------------------------------------------------------------------------------
# model and loss


def _out_channels(stage: nn.Module) -> int:
    """Output width of a ResNet stage: the last convolution of its last block."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError(f"cannot find the output width of encoder stage {type(stage).__name__}")
    return convs[-1].out_channels


class SparKModel(nn.Module):
    """Masked-image-modelling network around a 2D ResNet encoder (SparK-style).

    The encoder runs its stem (``conv1``, ``bn1``, ``act``, ``maxpool``) and ``layer1`` .. ``layer4`` on the visible
    patches only: the input and the output of every stage are multiplied by the visible-patch mask resized (nearest)
    to that stage's resolution. Its ``avgpool`` and ``fc`` are not used, but stay part of ``encoder`` so that
    ``encoder.state_dict()`` loads strictly into cDDPM's encoder.

    The decoder fills the masked positions of the four stage outputs with learned mask tokens (one vector per stage),
    projects the deepest one to ``decoder_channels[0]`` (1x1 convolution), then repeatedly upsamples x2 (bilinear),
    concatenates the next shallower stage and applies two 3x3 conv-norm-act blocks (``monai``'s ``UpCat``); a last
    upsampling to the input size, two more conv blocks and a 1x1 convolution give the reconstruction.

    Every stage's feature map must split evenly into the patch grid, i.e. the patch size must be a multiple of the
    encoder's total stride (16 for ``monai``'s default ResNet: ``maxpool`` and three strided stages).

    Unlike SparK's sparse batch norm, the encoder's BatchNorm layers are used as they are: in training mode their
    batch statistics include the zeroed masked positions. This never carries the content of masked patches (those
    values do not depend on it) but shifts the statistics; cDDPM training re-estimates them on full images.

    Args:
        encoder: the cDDPM encoder, a 2D ``monai.networks.nets.ResNet`` (or a module with the same stages).
        decoder_channels: decoder widths (4 values) at the resolutions of ``layer4``, ``layer3``, ``layer2`` and
            ``layer1``; the full-resolution blocks use the last one.
        act, norm: activation and normalisation of the decoder blocks (MONAI layer names).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_channels: Sequence[int] = (512, 256, 128, 64),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        expected = "the encoder must be a 2D monai.networks.nets.ResNet (stages conv1, bn1, act, maxpool, layer1..4)"
        missing = [name for name in _ENCODER_PARTS if not hasattr(encoder, name)]
        if missing:
            raise TypeError(f"{expected}; {type(encoder).__name__} has no {missing}")
        if not isinstance(encoder.conv1, nn.Conv2d):
            raise TypeError(f"{expected}; its conv1 is a {type(encoder.conv1).__name__} (use spatial_dims=2)")
        if len(decoder_channels) != 4:
            raise ValueError(f"decoder_channels needs 4 widths (layer4..layer1 resolutions), got {decoder_channels}")
        self.encoder = encoder
        widths = [_out_channels(getattr(encoder, f"layer{i}")) for i in range(1, 5)]
        self.stage_channels = tuple(widths)
        # one learned token per decoder input scale (layer1 .. layer4), filling the masked positions
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in widths])
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        d = [int(c) for c in decoder_channels]
        self.project = nn.Conv2d(widths[3], d[0], kernel_size=1)
        up = {
            "act": act,
            "norm": norm,
            "bias": True,
            "upsample": "nontrainable",  # bilinear x2, no parameters
            "pre_conv": None,
            "interp_mode": "bilinear",
            "align_corners": False,
        }
        self.up = nn.ModuleList(
            [
                UpCat(2, d[0], widths[2], d[1], **up),  # to layer3 resolution, with layer3 as skip
                UpCat(2, d[1], widths[1], d[2], **up),  # to layer2 resolution
                UpCat(2, d[2], widths[0], d[3], **up),  # to layer1 resolution
            ]
        )
        self.refine = TwoConv(2, d[3], d[3], act, norm, True)
        self.head = nn.Conv2d(d[3], encoder.conv1.in_channels, kernel_size=1)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.act(enc.bn1(enc.conv1(x)))
        return x if getattr(enc, "no_max_pool", False) else enc.maxpool(x)

    def encode(self, images: torch.Tensor, patch_mask: torch.Tensor) -> list[torch.Tensor]:
        """Sparse encoder features of the visible patches.

        Args:
            images: (B, C, H, W).
            patch_mask: boolean (B, 1, rows, columns), True = masked.

        Returns:
            the outputs of ``layer1`` .. ``layer4``, (B, C_i, H_i, W_i), zero at masked positions.
        """
        if patch_mask.shape[0] != images.shape[0] or patch_mask.shape[1] != 1 or patch_mask.ndim != 4:
            raise ValueError(f"patch_mask must be (B, 1, rows, columns), got {tuple(patch_mask.shape)}")

        def visible(x: torch.Tensor) -> torch.Tensor:
            return x * ~pixel_mask(patch_mask, x.shape[-2:])

        x = visible(self._stem(visible(images)))
        features = []
        for stage in (self.encoder.layer1, self.encoder.layer2, self.encoder.layer3, self.encoder.layer4):
            x = visible(stage(x))
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor], patch_mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Reconstruct the image from sparse features: mask tokens fill masked positions, then a UNet-style decoder.

        Args:
            features: outputs of :meth:`encode`.
            patch_mask: boolean (B, 1, rows, columns), True = masked.
            size: output (H, W).

        Returns:
            the reconstruction (B, C, H, W).
        """
        filled = []
        for f, token in zip(features, self.mask_tokens, strict=True):
            masked = pixel_mask(patch_mask, f.shape[-2:])
            filled.append(torch.where(masked, token.to(f.dtype), f))
        x = self.project(filled[3])
        for block, skip in zip(self.up, (filled[2], filled[1], filled[0]), strict=True):
            x = block(x, skip)
        x = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
        return self.head(self.refine(x))

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (B, C, H, W) in [0, 1].
            patch_mask: boolean (B, 1, rows, columns), True = masked (see :func:`random_patch_mask`).

        Returns:
            the reconstruction (B, C, H, W) and ``patch_mask`` (passed on for the loss).
        """
        features = self.encode(images, patch_mask)
        return self.decode(features, patch_mask, images.shape[-2:]), patch_mask


class MaskedMSELoss(nn.Module):
    """Mean squared error over the pixels of masked patches only (SparK's loss).

    Called as ``loss((reconstruction, patch_mask), target)``, the output of :class:`SparKModel`; visible pixels do
    not contribute, whatever the reconstruction there.

    Args:
        normalise_targets: compare with per-patch standardised targets (zero mean, unit variance per patch) instead
            of the intensities.
        eps: added to the patch variance before standardising.
    """

    def __init__(self, normalise_targets: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.normalise_targets = normalise_targets
        self.eps = eps

    def forward(self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            output: the reconstruction (B, C, H, W) and the boolean patch mask (B, 1, rows, columns).
            target: the images (B, C, H, W).

        Returns:
            the mean squared error over masked pixels (a scalar).
        """
        reconstruction, patch_mask = output
        if reconstruction.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} vs target {tuple(target.shape)}")
        if self.normalise_targets:
            target = normalise_patches(target, patch_mask.shape[-2:], self.eps)
        weight = pixel_mask(patch_mask, target.shape[-2:]).to(reconstruction.dtype)
        squared = (reconstruction - target.to(reconstruction.dtype)) ** 2 * weight
        return squared.sum() / (weight.sum() * target.shape[1]).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------
# figure


def save_spark_figure(
    path: str | os.PathLike,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    patch_mask: torch.Tensor,
    title: str | None = None,
) -> None:
    """Save a PNG with one row per slice: masked input | reconstruction | visible + reconstructed | target.

    Slices are drawn like the evaluation overlays (transposed, origin at the lower left). The squared error over the
    masked patches is printed above each reconstruction.

    Args:
        path: output PNG, written atomically.
        images: targets (N, 1, H, W) in [0, 1].
        reconstructions: model outputs in intensity units (N, 1, H, W).
        patch_mask: boolean (N, 1, rows, columns), True = masked.
        title: figure title.
    """
    masked = pixel_mask(patch_mask, images.shape[-2:]).cpu()
    images, reconstructions = images.detach().float().cpu(), reconstructions.detach().float().cpu()
    composite = torch.where(masked, reconstructions, images)
    rows, cols = patch_mask.shape[-2:]
    h, w = images.shape[-2:]
    columns = ("masked input (encoder sees)", "reconstruction", "visible + reconstructed", "target")
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.6 * len(columns), 2.6 * len(images)), squeeze=False)
    for i, row in enumerate(axes):
        mse = float(((reconstructions[i] - images[i]) ** 2)[masked[i]].mean())
        hidden = torch.where(masked[i], torch.full_like(images[i], float("nan")), images[i])
        cells = (hidden, reconstructions[i], composite[i], images[i])
        for ax, cell in zip(row, cells, strict=True):
            cmap = matplotlib.colormaps["gray"].with_extremes(bad="#3060a0")  # masked patches in blue
            ax.imshow(cell[0].numpy().T, origin="lower", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for k in range(1, rows):  # patch borders (rows run along the first axis, drawn horizontally)
                ax.axvline(k * h / rows - 0.5, color="#ffcc00", linewidth=0.5, alpha=0.6)
            for k in range(1, cols):
                ax.axhline(k * w / cols - 0.5, color="#ffcc00", linewidth=0.5, alpha=0.6)
        row[1].set_xlabel(f"masked MSE {mse:.4f}", fontsize=8)
    for ax, name in zip(axes[0], columns, strict=True):
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)


class SparKFigureHandler:
    """Ignite handler: when the engine completes, save :func:`save_spark_figure` for a few validation slices.

    Args:
        network: the :class:`SparKModel`.
        data_loader: data to draw the slices from (e.g. the validation loader); batches are read until
            ``n_slices`` slices are available, and ``n_slices`` evenly spaced ones are shown.
        prepare_batch: a seeded :class:`SparKPrepareBatch` (reset before use, so the figure is reproducible).
        output_file: the PNG to write.
        n_slices: rows of the figure.
        normalised_targets: the network predicts per-patch normalised targets (``MaskedMSELoss(True)``); its output
            is mapped back to intensities with the target patches' statistics for display.
    """

    def __init__(
        self,
        network: nn.Module,
        data_loader: Iterable,
        prepare_batch: SparKPrepareBatch,
        output_file: str | os.PathLike,
        n_slices: int = 4,
        normalised_targets: bool = False,
    ) -> None:
        self.network = network
        self.data_loader = data_loader
        self.prepare_batch = prepare_batch
        self.output_file = output_file
        self.n_slices = n_slices
        self.normalised_targets = normalised_targets

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        device = next(self.network.parameters()).device
        self.prepare_batch.reset()
        images, masks = [], []
        for batch in self.data_loader:
            x, _, _, kwargs = self.prepare_batch(batch, device)
            images.append(x)
            masks.append(kwargs["patch_mask"])
            if sum(len(i) for i in images) >= self.n_slices:
                break
        if not images:
            logger.warning("no data for the SparK figure: %s not written", self.output_file)
            return
        x, patch_mask = torch.cat(images), torch.cat(masks)
        pick = torch.linspace(0, len(x) - 1, min(self.n_slices, len(x))).round().long().unique()
        x, patch_mask = x[pick.to(x.device)], patch_mask[pick.to(x.device)]
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                reconstruction, _ = self.network(x, patch_mask=patch_mask)
        finally:
            self.network.train(was_training)
        if self.normalised_targets:
            reconstruction = denormalise_patches(reconstruction, x, patch_mask.shape[-2:])
        epoch = f" after epoch {engine.state.epoch}" if engine is not None else ""
        save_spark_figure(self.output_file, x, reconstruction, patch_mask, title=f"SparK reconstructions{epoch}")
        logger.info("SparK figure written to %s", self.output_file)
