"""Mixed precision where it helps: fp16 autocast with CUDA, bf16 on CPUs that compute bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["cpu_bf16_native", "cpu_description", "parse_amp", "resolve_amp"]

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include bf16 instructions
_BF16_ONEDNN_ISAS = {"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512"}
_BF16_ONEDNN_ISAS |= {"AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"}

logger = logging.getLogger(__name__)


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 in hardware (AVX512-BF16 or AMX) at the instruction set torch and oneDNN use.

    ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` caps below AVX-512 count as no native bf16, as they make
    bf16 kernels fall back to slow emulation.
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if onednn_cap not in _BF16_ONEDNN_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_description() -> str:
    """The CPU facts every CPU speed figure is named with, e.g. ``"AVX2, no native bf16, 2 threads"``."""
    bf16 = "native bf16" if cpu_bf16_native() else "no native bf16"
    return f"{torch.backends.cpu.get_cpu_capability()}, {bf16}, {torch.get_num_threads()} threads"


def parse_amp(amp: bool | str) -> bool | str:
    """``amp`` as ``"auto"``, ``True`` or ``False``, from a bool or its text as typed (any case).

    Raises:
        ValueError: any other value, listing the accepted ones.
    """
    text = str(amp).lower()
    if isinstance(amp, (bool, str)) and text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ValueError(f"amp must be one of 'auto', True, False; got {amp!r}")


def resolve_amp(amp: bool | str, device: torch.device | str, cpu_autocast: bool = True) -> bool:
    """Whether to run under autocast on ``device``.

    Args:
        amp: ``"auto"`` (on with CUDA; on a CPU only with native bf16), ``True`` or ``False``.
        device: the device the network runs on.
        cpu_autocast: whether the caller autocasts on a CPU at all (the anomaly inferers do; MONAI's engines
            autocast on CUDA only, so for them a CPU always gives False).

    Raises:
        ValueError: ``amp`` is not one of ``"auto"``, ``True``, ``False``.
    """
    amp = parse_amp(amp)
    if torch.device(device).type == "cuda":
        return amp is not False
    if not cpu_autocast:
        return False
    native = cpu_bf16_native()
    if amp is True and not native:
        # measured on 2 AVX2 cores: the demo-sized UNet took 142 s for 32 slices under bf16 autocast, 3.7 s in fp32
        logger.warning(
            "amp=True on a CPU without native bf16 (%s): bf16 autocast runs 20-40x slower than fp32 here; "
            "amp 'auto' runs fp32 on this CPU",
            cpu_description(),
        )
    return native if amp == "auto" else amp
