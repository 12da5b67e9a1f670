"""AutoDDPM test-time algorithm (mask, stitch, re-sample) and anomaly map, as one MONAI ``Inferer``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from .perceptual import SSIMDistance
from .uad.inference import brain_box, slice_volumes, stack_slices
from .uad.postprocessing import erode_mask_per_slice, median_filter_3d

__all__ = ["STAGE_KEYS", "AutoDDPMAnomalyInferer"]

logger = logging.getLogger(__name__)

# the stage outputs returned with ``return_intermediates=True`` (volumes shaped like the input)
STAGE_KEYS = ("reconstruction", "likelihood", "stitch_mask", "stitched", "inpainted")


def _brain_quantile(values: torch.Tensor, brain: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of each slice's values over its brain pixels, (N, 1, 1, 1); inf for a slice without brain."""
    return torch.stack(
        [torch.quantile(v[b], q) if b.any() else v.new_tensor(math.inf) for v, b in zip(values, brain, strict=True)]
    ).view(-1, 1, 1, 1)


class AutoDDPMAnomalyInferer(Inferer):
    """Mask, stitch and re-sample every brain slice with a noise-predicting DDPM, then the anomaly map.

    Notation: x in [0, 1] is a slice, x0 = 2x - 1 the same slice in the model range; "level L" means x noised to the
    L-th step of the forward process, i.e. MONAI timestep index L - 1, so a full chain from level L makes L steps.

    1. **mask**: noise x0 to level ``mask_noise_level`` and run the reverse chain to 0 -> x_hat (clamped, [0, 1]).
       Likelihood ``m = P(x, x_hat) * clip(|x - x_hat| / q(|x - x_hat|), 0, 1)`` inside the brain, with P the
       ``perceptual`` distance map and q the per-image ``residual_quantile`` over brain pixels; binary mask
       ``M = dilate(m > tau)`` with tau = ``mask_threshold``, or the per-image ``mask_quantile`` of m in the brain.
    2. **stitch**: ``x_s = M * x_hat + (1 - M) * x``.
    3. **re-sample**: noise x_s to level ``resample_noise_level`` and denoise to 0, RePaint-style: after every reverse
       step the unmasked region is replaced by x0 noised to the new level (q(x_t | x_0)) and the masked region comes
       from the model; each step is repeated ``resample_repeats`` times, renoising the result by one step
       (q(x_t | x_t-1)) in between and after the last repeat only when it is not the final one. The inpainted image
       is x outside M exactly.

    The anomaly map is ``|x - x_inpainted| * m``, times the brain mask eroded per slice, 3D median filtered, times the
    eroded mask again (``scripts.uad.postprocessing``).

    Samplers: with a ``DDPMScheduler`` the chains are the exact ancestral DDPM chains (one network pass per level:
    ``mask_noise_level + resample_noise_level * resample_repeats`` passes per slice, 200 + 50 * 5 = 450 with the paper's
    settings). With a ``DDIMScheduler`` the chains take ``mask_steps`` and ``resample_steps`` evenly strided steps
    (e.g. 10 and 5: 10 + 5 * 5 = 35 passes), the last one straight to x0. ``network_passes_per_slice`` says which.

    Called as ``inferer(inputs, network)`` (MONAI Label, Deploy) or ``inferer(inputs, network, mask=mask)``.

    Args:
        scheduler: ``DDPMScheduler`` or ``DDIMScheduler`` with the training noise schedule (noise prediction).
        perceptual: spatial distance ``P(x, y) -> (N, 1, H, W)`` for slices in [0, 1], with a ``name``
            (see ``scripts.perceptual``); default: ``SSIMDistance()`` (1 - SSIM, offline).
        mask_noise_level: noise level of the mask stage (paper: 200).
        resample_noise_level: noise level of the re-sample stage (paper: 50).
        mask_steps: reverse steps of the mask stage; None = one per level (required for DDPM).
        resample_steps: reverse steps of the re-sample stage; None = one per level (required for DDPM).
        resample_repeats: times every re-sample step is run (paper: r = 5).
        mask_threshold: tau on the likelihood map (paper: 0.13, for LPIPS).
        mask_quantile: if set, tau is this quantile of each slice's likelihood over its brain pixels instead.
        residual_quantile: quantile that normalises the residual in the likelihood map (paper: 0.95).
        dilation: edge of the square structuring element dilating the binary mask (odd; 1 = none).
        ddim_eta: DDIM stochasticity (1: fresh noise each step like the DDPM chains; 0: deterministic DDIM); ignored
            by DDPM.
        batch_size: slices per network call.
        erosion_iterations: iterations of the per-slice cross erosion of the brain mask.
        median_kernel: size of the 3D median filter (1 disables it).
        seed: seed of all noise, so repeated calls give the same map; None draws fresh noise.
        amp: run the network under autocast (fp16 on CUDA, bf16 on CPU).
        brain_box_multiple: run the stages on the brain's bounding box only (sides rounded up to this multiple), as
            networks trained on brain-box crops (``configs/brain_crop.json``) expect; None runs whole slices.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler | DDIMScheduler,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        mask_noise_level: int = 200,
        resample_noise_level: int = 50,
        mask_steps: int | None = None,
        resample_steps: int | None = None,
        resample_repeats: int = 5,
        mask_threshold: float = 0.13,
        mask_quantile: float | None = None,
        residual_quantile: float = 0.95,
        dilation: int = 3,
        ddim_eta: float = 1.0,
        batch_size: int = 50,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        seed: int | None = 0,
        amp: bool = False,
        brain_box_multiple: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, DDPMScheduler | DDIMScheduler):
            raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
        if scheduler.prediction_type != "epsilon":
            raise ValueError(
                f"AutoDDPM predicts the noise (prediction_type 'epsilon'), got {scheduler.prediction_type}"
            )
        if resample_repeats < 1 or dilation < 1 or dilation % 2 != 1:
            raise ValueError(f"need resample_repeats >= 1 and an odd dilation >= 1, got {resample_repeats}, {dilation}")
        if not 0 < residual_quantile <= 1 or (mask_quantile is not None and not 0 < mask_quantile < 1):
            raise ValueError(f"quantiles must lie in (0, 1], got {residual_quantile}, {mask_quantile}")
        self.scheduler = scheduler
        self.perceptual = SSIMDistance() if perceptual is None else perceptual
        self.mask_chain = self._chain(mask_noise_level, mask_steps)
        self.resample_chain = self._chain(resample_noise_level, resample_steps)
        self.resample_repeats = resample_repeats
        self.mask_threshold = mask_threshold
        self.mask_quantile = mask_quantile
        self.residual_quantile = residual_quantile
        self.dilation = dilation
        self.ddim_eta = ddim_eta
        self.batch_size = batch_size
        self.erosion_iterations = erosion_iterations
        self.median_kernel = median_kernel
        self.seed = seed
        self.amp = amp
        self.brain_box_multiple = brain_box_multiple
        logger.info(
            "AutoDDPM inferer: %s sampler, mask %d steps from level %d, re-sample %d steps x %d from level %d "
            "(%d network passes per slice), perceptual term %s",
            self.sampler,
            len(self.mask_chain),
            mask_noise_level,
            len(self.resample_chain),
            resample_repeats,
            resample_noise_level,
            self.network_passes_per_slice,
            self.perceptual_name,
        )

    # -------------------------------------------------------------------------------------------------------------
    # schedule helpers

    @property
    def sampler(self) -> str:
        return "ddpm" if isinstance(self.scheduler, DDPMScheduler) else "ddim"

    @property
    def perceptual_name(self) -> str:
        return str(getattr(self.perceptual, "name", type(self.perceptual).__name__))

    @property
    def network_passes_per_slice(self) -> int:
        """Network evaluations per slice: mask steps + re-sample steps x repeats."""
        return len(self.mask_chain) + len(self.resample_chain) * self.resample_repeats

    def _chain(self, level: int, steps: int | None) -> list[tuple[int, int]]:
        """The (t, t_prev) timestep pairs of a reverse chain from ``level`` to clean (t_prev = -1 means x0)."""
        total = self.scheduler.num_train_timesteps
        steps = level if steps is None else steps
        if not 0 < level <= total or not 0 < steps <= level or level % steps:
            raise ValueError(f"need 0 < steps <= level <= {total} with level divisible by steps, got {steps}/{level}")
        stride = level // steps
        if isinstance(self.scheduler, DDPMScheduler) and stride != 1:
            raise ValueError(
                f"DDPMScheduler steps one level at a time ({level} steps from level {level}), got {steps} steps: "
                "use a DDIMScheduler for fewer steps"
            )
        if isinstance(self.scheduler, DDIMScheduler) and total // (total // stride) != stride:
            raise ValueError(f"DDIMScheduler cannot take strides of {stride} timesteps out of {total}")
        return [(level - 1 - k * stride, level - 1 - (k + 1) * stride) for k in range(steps)]

    def _alpha_bar(self, t: int) -> float:
        """abar_t of the schedule; 1 for t = -1 (the clean image)."""
        return 1.0 if t < 0 else float(self.scheduler.alphas_cumprod[t])

    def _noise_to(self, x0: torch.Tensor, t: int, generator: torch.Generator | None) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I); x0 itself for t = -1."""
        if t < 0:
            return x0
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        steps = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        return self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=steps)

    def _renoise(self, x_prev: torch.Tensor, t_prev: int, t: int, generator: torch.Generator | None) -> torch.Tensor:
        """Sample q(x_t | x_t_prev) = N(sqrt(abar_t / abar_prev) x_prev, (1 - abar_t / abar_prev) I), one step up."""
        ratio = self._alpha_bar(t) / self._alpha_bar(t_prev)
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        return math.sqrt(ratio) * x_prev + math.sqrt(1.0 - ratio) * noise

    def _denoise_step(
        self, network: nn.Module, x_t: torch.Tensor, t: int, t_prev: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """One network pass and reverse step x_t -> x_t_prev (posterior sample for DDPM, DDIM update otherwise)."""
        steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        autocast_dtype = torch.float16 if x_t.device.type == "cuda" else torch.bfloat16
        with torch.autocast(x_t.device.type, dtype=autocast_dtype, enabled=self.amp):
            eps = network(x_t, timesteps=steps).float()  # the noise estimate eps_theta(x_t, t)
        if isinstance(self.scheduler, DDPMScheduler):
            return self.scheduler.step(eps, t, x_t, generator=generator)[0]
        total = self.scheduler.num_train_timesteps
        self.scheduler.num_inference_steps = total // (t - t_prev)  # DDIMScheduler.step strides by total // this
        return self.scheduler.step(eps, t, x_t, eta=self.ddim_eta, generator=generator)[0]

    # -------------------------------------------------------------------------------------------------------------
    # the three stages, on slice stacks (N, 1, H, W) in [0, 1]

    def reconstruct(self, x: torch.Tensor, network: nn.Module, generator: torch.Generator | None) -> torch.Tensor:
        """Stage 1 reconstruction: noise x to the mask level and run the reverse chain to 0; x_hat in [0, 1]."""
        x_t = self._noise_to(x * 2.0 - 1.0, self.mask_chain[0][0], generator)
        for t, t_prev in self.mask_chain:
            x_t = self._denoise_step(network, x_t, t, t_prev, generator)
        return (x_t.clamp(-1.0, 1.0) + 1.0) / 2.0

    def likelihood(self, x: torch.Tensor, x_hat: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """``m = P(x, x_hat) * clip(|x - x_hat| / q(|x - x_hat|), 0, 1)`` inside the brain, q per slice."""
        residual = (x - x_hat).abs()
        scale = _brain_quantile(residual, brain, self.residual_quantile)
        normalised = (residual / scale.clamp_min(1e-8)).clamp(0.0, 1.0)
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.to(x.device)  # e.g. LPIPS weights follow the data
        return self.perceptual(x, x_hat).float() * normalised * brain

    def binary_mask(self, likelihood: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """``M = dilate(m > tau)`` (float 0/1), tau fixed or the per-slice quantile of m over the brain."""
        if self.mask_quantile is None:
            tau = torch.full((likelihood.shape[0], 1, 1, 1), self.mask_threshold, device=likelihood.device)
        else:
            tau = _brain_quantile(likelihood, brain, self.mask_quantile)
        binary = (likelihood > tau).float()
        return F.max_pool2d(binary, self.dilation, stride=1, padding=self.dilation // 2)

    def mask(
        self, x: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1: returns the reconstruction x_hat, the likelihood map m and the binary mask M."""
        x_hat = self.reconstruct(x, network, generator)
        m = self.likelihood(x, x_hat, brain)
        return x_hat, m, self.binary_mask(m, brain)

    @staticmethod
    def stitch(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stage 2: ``x_s = M * x_hat + (1 - M) * x`` (exactly x where M = 0)."""
        return mask * x_hat + (1.0 - mask) * x

    def resample(
        self,
        x: torch.Tensor,
        stitched: torch.Tensor,
        mask: torch.Tensor,
        network: nn.Module,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Stage 3: RePaint-style inpainting of the masked region of ``stitched``; returns x_inpainted in [0, 1]."""
        x0 = x * 2.0 - 1.0
        x_t = self._noise_to(stitched * 2.0 - 1.0, self.resample_chain[0][0], generator)
        x_prev = x_t
        for t, t_prev in self.resample_chain:
            for repeat in range(self.resample_repeats):
                from_model = self._denoise_step(network, x_t, t, t_prev, generator)  # masked region: the model
                known = self._noise_to(x0, t_prev, generator)  # unmasked region: x0 at level t_prev, q(x_t_prev | x_0)
                x_prev = mask * from_model + (1.0 - mask) * known
                if repeat < self.resample_repeats - 1:
                    x_t = self._renoise(x_prev, t_prev, t, generator)  # back up one step, q(x_t | x_t_prev)
            x_t = x_prev
        return self.stitch(x, (x_t.clamp(-1.0, 1.0) + 1.0) / 2.0, mask)

    @torch.inference_mode()
    def run_slices(self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module) -> dict[str, torch.Tensor]:
        """All three stages on a slice stack (N, 1, H, W) in [0, 1] with brain masks, ``batch_size`` at a time.

        Returns:
            ``{"reconstruction", "likelihood", "stitch_mask", "stitched", "inpainted"}``, each (N, 1, H, W).
        """
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=slices.device).manual_seed(self.seed)
        outputs: dict[str, list[torch.Tensor]] = {k: [] for k in STAGE_KEYS}
        for start in range(0, slices.shape[0], self.batch_size):
            x, b = slices[start : start + self.batch_size], brain[start : start + self.batch_size]
            x_hat, m, mask = self.mask(x, b, network, generator)
            x_s = self.stitch(x, x_hat, mask)
            x_inp = self.resample(x, x_s, mask, network, generator)
            for key, value in zip(STAGE_KEYS, (x_hat, m, mask, x_s, x_inp), strict=True):
                outputs[key].append(value)
        return {k: torch.cat(v) for k, v in outputs.items()}

    def __call__(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args,
        mask: torch.Tensor | None = None,
        return_reconstruction: bool = False,
        return_intermediates: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        """
        Args:
            inputs: volumes (B, 1, H, W, D) in [0, 1] (axial slices along D), or a slice stack (N, 1, H, W).
            network: the denoiser ``network(x_t, timesteps=t) -> eps`` (e.g. ``DiffusionModelUNet``).
            mask: brain masks shaped like ``inputs``; without one, the foreground ``inputs > 0`` is used.
            return_reconstruction: also return the inpainted image (the pseudo-healthy reconstruction).
            return_intermediates: return a dict ``{"pred": map, **stage outputs}`` (keys ``STAGE_KEYS``).

        Returns:
            the anomaly map shaped like ``inputs`` (and the inpainted image), or the dict. Slices without brain (and,
            with ``brain_box_multiple``, pixels outside the brain box) are not run: their map, likelihood and mask are
            zero and their reconstructions equal the input.
        """
        volumes, brain, restore = slice_volumes(inputs, mask)
        slices, index = stack_slices(volumes, brain)
        slice_brain = brain.permute(0, 4, 1, 2, 3)[index]
        rows, cols = slice(None), slice(None)
        if self.brain_box_multiple:
            rows, cols = brain_box(slice_brain, self.brain_box_multiple)
        stages = self.run_slices(slices[..., rows, cols], slice_brain[..., rows, cols], network)
        full = {}
        for key, value in stages.items():
            zero_outside = key in ("likelihood", "stitch_mask")  # outside the box and brain: no anomaly, x itself
            slice_values = torch.zeros_like(slices) if zero_outside else slices.clone()
            slice_values[..., rows, cols] = value
            volume = torch.zeros_like(volumes) if zero_outside else volumes.clone()
            volume.permute(0, 4, 1, 2, 3)[index] = slice_values
            full[key] = volume
        eroded = erode_mask_per_slice(brain, self.erosion_iterations).float()
        residual = (volumes - full["inpainted"]).abs() * full["likelihood"] * eroded
        maps = median_filter_3d(residual, self.median_kernel) * eroded
        if return_intermediates:
            return {"pred": restore(maps), **{k: restore(v) for k, v in full.items()}}
        return (restore(maps), restore(full["inpainted"])) if return_reconstruction else restore(maps)
