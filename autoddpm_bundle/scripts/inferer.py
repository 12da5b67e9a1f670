"""AutoDDPM test-time algorithm (mask, stitch, re-sample) and anomaly map, as one MONAI ``Inferer``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from .perceptual import SSIMDistance
from .uad.inference import SliceAnomalyInferer, from_model_range, to_model_range

__all__ = ["STAGE_KEYS", "AutoDDPMAnomalyInferer"]

logger = logging.getLogger(__name__)

# the stage outputs returned with ``return_intermediates=True`` (volumes shaped like the input)
STAGE_KEYS = ("reconstruction", "likelihood", "stitch_mask", "stitched", "inpainted")


def _brain_quantile(values: torch.Tensor, brain: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of each slice's values over its brain pixels, (N, 1, 1, 1); inf for a slice without brain."""
    return torch.stack(
        [torch.quantile(v[b], q) if b.any() else v.new_tensor(math.inf) for v, b in zip(values, brain, strict=True)]
    ).view(-1, 1, 1, 1)


class AutoDDPMAnomalyInferer(SliceAnomalyInferer):
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
       is x outside M exactly, so a slice whose M is empty is x: the network does not run on it in this stage.

    The anomaly map is ``|x - x_inpainted| * m``, times the brain mask eroded per slice, 3D median filtered, times the
    eroded mask again (``SliceAnomalyInferer``). With ``return_intermediates=True`` the inferer returns
    ``{"pred": map, **stage outputs}`` (keys ``STAGE_KEYS``, volumes shaped like the input); slices without brain
    (and, with ``brain_box_multiple``, pixels outside the brain box) are not run: their map, likelihood and mask are
    zero and their reconstructions equal the input.

    Samplers: with a ``DDPMScheduler`` the chains are the exact ancestral DDPM chains (one network pass per level:
    ``mask_noise_level + resample_noise_level * resample_repeats`` passes per slice, 200 + 50 * 5 = 450 with the paper's
    settings; the ``ddim_*`` arguments are ignored). With a ``DDIMScheduler`` the chains take ``ddim_mask_steps`` and
    ``ddim_resample_steps`` evenly strided steps (e.g. 10 and 5: 10 + 5 * 5 = 35 passes), the last one straight to x0.
    ``mask_samples`` multiplies the mask stage's passes. ``network_passes_per_slice`` says how many.

    Args:
        scheduler: ``DDPMScheduler`` or ``DDIMScheduler`` with the training noise schedule (noise prediction).
        perceptual: spatial distance ``P(x, y) -> (N, 1, H, W)`` for slices in [0, 1], with a ``name``
            (see ``scripts.perceptual``); default: ``SSIMDistance()`` (1 - SSIM, offline).
        mask_noise_level: noise level of the mask stage (paper: 200).
        resample_noise_level: noise level of the re-sample stage (paper: 50).
        ddim_mask_steps: DDIM reverse steps of the mask stage; None = one per level; ignored by DDPM.
        ddim_resample_steps: DDIM reverse steps of the re-sample stage; None = one per level; ignored by DDPM.
        mask_samples: reverse chains of the mask stage, each from fresh noise, whose reconstructions are averaged
            into x_hat (paper: 1).
        resample_repeats: times every re-sample step is run (paper: r = 5).
        mask_threshold: tau on the likelihood map (paper: 0.13, for LPIPS).
        mask_quantile: if set, tau is this quantile of each slice's likelihood over its brain pixels instead.
        residual_quantile: quantile that normalises the residual in the likelihood map (paper: 0.95).
        dilation: edge of the square structuring element dilating the binary mask (odd; 1 = none).
        ddim_eta: DDIM stochasticity (1: fresh noise each step like the DDPM chains; 0: deterministic DDIM); ignored
            by DDPM.
        batch_size, erosion_iterations, median_kernel, smooth_sigma, seed, amp, brain_box_multiple: see
            ``SliceAnomalyInferer``.
    """

    output_keys = STAGE_KEYS
    reconstruction_key = "inpainted"
    weight_key = "likelihood"
    map_keys = ("likelihood", "stitch_mask")

    def __init__(
        self,
        scheduler: DDPMScheduler | DDIMScheduler,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        mask_noise_level: int = 200,
        resample_noise_level: int = 50,
        ddim_mask_steps: int | None = None,
        ddim_resample_steps: int | None = None,
        mask_samples: int = 1,
        resample_repeats: int = 5,
        mask_threshold: float = 0.13,
        mask_quantile: float | None = None,
        residual_quantile: float = 0.95,
        dilation: int = 3,
        ddim_eta: float = 1.0,
        batch_size: int = 50,
        erosion_iterations: int = 3,
        median_kernel: int = 5,
        smooth_sigma: float = 0.0,
        seed: int | None = 0,
        amp: bool = False,
        brain_box_multiple: int | None = None,
    ) -> None:
        super().__init__(batch_size, erosion_iterations, median_kernel, smooth_sigma, seed, amp, brain_box_multiple)
        if not isinstance(scheduler, DDPMScheduler | DDIMScheduler):
            raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
        if scheduler.prediction_type != "epsilon":
            raise ValueError(
                f"AutoDDPM predicts the noise (prediction_type 'epsilon'), got {scheduler.prediction_type}"
            )
        if mask_samples < 1 or resample_repeats < 1 or dilation < 1 or dilation % 2 != 1:
            raise ValueError(
                "need mask_samples >= 1, resample_repeats >= 1 and an odd dilation >= 1, "
                f"got {mask_samples}, {resample_repeats}, {dilation}"
            )
        if not 0 < residual_quantile <= 1 or (mask_quantile is not None and not 0 < mask_quantile < 1):
            raise ValueError(f"quantiles must lie in (0, 1], got {residual_quantile}, {mask_quantile}")
        self.scheduler = scheduler
        self.perceptual = SSIMDistance() if perceptual is None else perceptual
        self.mask_chain = self._chain(mask_noise_level, ddim_mask_steps)
        self.resample_chain = self._chain(resample_noise_level, ddim_resample_steps)
        self.mask_samples = mask_samples
        self.resample_repeats = resample_repeats
        self.mask_threshold = mask_threshold
        self.mask_quantile = mask_quantile
        self.residual_quantile = residual_quantile
        self.dilation = dilation
        self.ddim_eta = ddim_eta
        logger.info(
            "AutoDDPM inferer: %s sampler, mask %d x %d steps from level %d, re-sample %d steps x %d from level %d "
            "(%d network passes per slice), perceptual term %s",
            self.sampler,
            mask_samples,
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
        """Network evaluations per slice: mask samples x mask steps + re-sample steps x repeats (the mask stage's
        only for a slice whose binary mask is empty)."""
        return len(self.mask_chain) * self.mask_samples + len(self.resample_chain) * self.resample_repeats

    def _chain(self, level: int, steps: int | None) -> list[tuple[int, int]]:
        """The (t, t_prev) timestep pairs of a reverse chain from ``level`` to clean (t_prev = -1 means x0)."""
        total = self.scheduler.num_train_timesteps
        steps = level if steps is None or isinstance(self.scheduler, DDPMScheduler) else steps
        if not 0 < level <= total or not 0 < steps <= level or level % steps:
            raise ValueError(f"need 0 < steps <= level <= {total} with level divisible by steps, got {steps}/{level}")
        stride = level // steps
        if isinstance(self.scheduler, DDIMScheduler) and total // (total // stride) != stride:
            raise ValueError(f"DDIMScheduler cannot take strides of {stride} timesteps out of {total}")
        return [(level - 1 - k * stride, level - 1 - (k + 1) * stride) for k in range(steps)]

    def _set_stride(self, chain: list[tuple[int, int]]) -> None:
        """Set the scheduler to the stride of ``chain`` before running it: ``set_timesteps(total // stride)``, the
        number of steps over the whole schedule (DDIM steps by ``total // steps``; DDPM by one level regardless)."""
        t, t_prev = chain[0]
        self.scheduler.set_timesteps(self.scheduler.num_train_timesteps // (t - t_prev))

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
        self,
        network: nn.Module,
        x_t: torch.Tensor,
        t: int,
        generator: torch.Generator | None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One network pass and reverse step x_t -> x_t_prev (posterior sample for DDPM, DDIM update otherwise), one
        stride of the chain set by :meth:`_set_stride`. With ``active`` (N,) boolean, the network runs on those slices
        only and the others step with a zero noise estimate (their result is not used); the step's noise is drawn for
        all N slices either way, so the generator advances as without ``active``."""
        rows = slice(None) if active is None else active
        eps = torch.zeros_like(x_t)  # the noise estimate eps_theta(x_t, t)
        if active is None or active.any():
            inputs = x_t[rows]
            steps = torch.full((inputs.shape[0],), t, device=x_t.device, dtype=torch.long)
            with self.autocast(x_t.device):
                eps[rows] = network(inputs, timesteps=steps).float()
        if isinstance(self.scheduler, DDPMScheduler):
            return self.scheduler.step(eps, t, x_t, generator=generator)[0]
        return self.scheduler.step(eps, t, x_t, eta=self.ddim_eta, generator=generator)[0]

    # -------------------------------------------------------------------------------------------------------------
    # the three stages, on slice stacks (N, 1, H, W) in [0, 1]

    def reconstruct(self, x: torch.Tensor, network: nn.Module, generator: torch.Generator | None) -> torch.Tensor:
        """Stage 1 reconstruction: noise x to the mask level and run the reverse chain to 0, ``mask_samples`` times
        (one batch); x_hat in [0, 1] is the mean of the clamped results."""
        x0 = to_model_range(x).repeat(self.mask_samples, 1, 1, 1)  # (samples * N, 1, H, W)
        x_t = self._noise_to(x0, self.mask_chain[0][0], generator)
        self._set_stride(self.mask_chain)
        for t, _ in self.mask_chain:
            x_t = self._denoise_step(network, x_t, t, generator)
        return from_model_range(x_t).reshape(self.mask_samples, *x.shape).mean(0)

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
        x0 = to_model_range(x)
        x_t = self._noise_to(to_model_range(stitched), self.resample_chain[0][0], generator)
        x_prev = x_t
        masked = mask.flatten(1).amax(1) > 0  # a slice without a masked pixel comes out as x: no network passes
        active = None if masked.all() else masked
        self._set_stride(self.resample_chain)
        for t, t_prev in self.resample_chain:
            for repeat in range(self.resample_repeats):
                from_model = self._denoise_step(network, x_t, t, generator, active)  # masked region: the model
                known = self._noise_to(x0, t_prev, generator)  # unmasked region: x0 at level t_prev, q(x_t_prev | x_0)
                x_prev = mask * from_model + (1.0 - mask) * known
                if repeat < self.resample_repeats - 1:
                    x_t = self._renoise(x_prev, t_prev, t, generator)  # back up one step, q(x_t | x_t_prev)
            x_t = x_prev
        return self.stitch(x, from_model_range(x_t), mask)

    def reconstruct_slices(
        self, slices: torch.Tensor, brain: torch.Tensor, network: nn.Module, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """All three stages on slices (N, 1, H, W) in [0, 1] with brain masks; returns ``STAGE_KEYS``, each
        (N, 1, H, W)."""
        x_hat, m, mask = self.mask(slices, brain, network, generator)
        stitched = self.stitch(slices, x_hat, mask)
        inpainted = self.resample(slices, stitched, mask, network, generator)
        return dict(zip(STAGE_KEYS, (x_hat, m, mask, stitched, inpainted), strict=True))
