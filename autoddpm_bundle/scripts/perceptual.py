"""Spatial perceptual distances P(x, x_hat) for the AutoDDPM likelihood map: 1 - SSIM (offline default) or LPIPS.

Every distance is a module ``distance(x, y) -> (N, 1, H, W)`` taking two slice stacks (N, 1, H, W) in [0, 1] and
returning a per-pixel dissimilarity (0 = identical), and has a ``name`` recorded in the outputs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from torch import nn

__all__ = ["LPIPS_BACKBONES", "LPIPSDistance", "SSIMDistance", "build_perceptual", "lpips_backbone_file"]

logger = logging.getLogger(__name__)

# LPIPS backbone -> torchvision weights enum whose ImageNet weights lpips loads through torch.hub
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class SSIMDistance(nn.Module):
    """Per-pixel structural dissimilarity ``clip(1 - SSIM(x, y), 0, 1)`` with a gaussian window; needs no weights.

    The SSIM map is MONAI's (``compute_ssim_and_cs``) on reflection-padded inputs, so it has the input's size.

    Args:
        kernel_size: edge length of the gaussian window (odd).
        kernel_sigma: standard deviation of the window in pixels.
        data_range: intensity range of the inputs.
        k1, k2: SSIM stability constants.
    """

    name = "1-ssim"

    def __init__(
        self,
        kernel_size: int = 11,
        kernel_sigma: float = 1.5,
        data_range: float = 1.0,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel_sigma = kernel_sigma
        self.data_range = data_range
        self.k1 = k1
        self.k2 = k2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, 1, H, W) in [0, 1] -> (N, 1, H, W) dissimilarity in [0, 1]."""
        r = self.kernel_size // 2
        mode = "reflect" if min(x.shape[-2:]) > r else "replicate"  # reflection needs more pixels than the pad
        x, y = (F.pad(v.float(), (r, r, r, r), mode=mode) for v in (x, y))
        ssim, _ = compute_ssim_and_cs(
            x,
            y,
            spatial_dims=2,
            kernel_size=[self.kernel_size] * 2,
            kernel_sigma=[self.kernel_sigma] * 2,
            data_range=self.data_range,
            k1=self.k1,
            k2=self.k2,
        )
        return (1.0 - ssim).clamp(0.0, 1.0)


def lpips_backbone_file(net: str) -> Path:
    """Where torch.hub keeps the ImageNet weights of an LPIPS backbone (``<TORCH_HOME>/hub/checkpoints/<file>``)."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(LPIPS_BACKBONES)}")
    models = importlib.import_module("torchvision.models")
    url = getattr(models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class LPIPSDistance(nn.Module):
    """Spatial LPIPS distance (Zhang et al. 2018) from the optional ``lpips`` package, as in the AutoDDPM paper.

    Nothing is ever downloaded: the ``lpips`` package (with its linear-layer weights) must be installed and the
    backbone's ImageNet weights must already be in the torch.hub cache, otherwise construction fails and says what is
    missing. Grey slices are repeated to three channels and mapped to [-1, 1], as LPIPS expects.

    Args:
        net: backbone, ``"alex"`` (the paper's choice), ``"vgg"`` or ``"squeeze"``.
    """

    name = "lpips"

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(LPIPS_BACKBONES)}")
        try:
            lpips = importlib.import_module("lpips")
        except ImportError as e:
            raise ImportError(
                "perceptual='lpips' needs the optional `lpips` package (and torchvision): `pip install lpips`, then "
                f"put the {net} ImageNet backbone weights into the torch.hub cache (see docs/README.md); or use the "
                "offline default perceptual='ssim'."
            ) from e
        linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        backbone = lpips_backbone_file(net)
        missing = [str(p) for p in (linear, backbone) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"perceptual='lpips' ({net}) needs weights that are not on this machine and will not be downloaded: "
                f"{', '.join(missing)}. Copy the torchvision file {backbone.name} into {backbone.parent} (set "
                "TORCH_HOME to use another cache folder), or use the offline default perceptual='ssim'."
            )
        self.net = net
        self.name = f"lpips-{net}"
        self.model = lpips.LPIPS(net=net, spatial=True, pretrained=True, verbose=False).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, 1, H, W) in [0, 1] -> (N, 1, H, W) LPIPS distance map."""
        to_rgb = lambda v: (v.float() * 2.0 - 1.0).expand(-1, 3, -1, -1)  # noqa: E731
        return self.model(to_rgb(x), to_rgb(y)).clamp_min(0.0)


_DISTANCES = {"ssim": SSIMDistance, "lpips": LPIPSDistance}


def build_perceptual(name: str = "ssim", options: Mapping[str, Mapping[str, Any]] | None = None) -> nn.Module:
    """The perceptual distance ``name`` (``"ssim"`` or ``"lpips"``), built with ``options[name]`` as keyword args."""
    if name not in _DISTANCES:
        raise ValueError(f"unknown perceptual distance {name!r}; expected one of {sorted(_DISTANCES)}")
    distance = _DISTANCES[name](**dict((options or {}).get(name, {})))
    logger.info("AutoDDPM likelihood map: perceptual term %s", distance.name)
    return distance
