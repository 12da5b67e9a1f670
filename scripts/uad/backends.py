"""The trained network as the inferers run it: on its device, channels-last if asked, or on ONNX Runtime on a CPU."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "CPU_BACKENDS",
    "OnnxRuntimeNetwork",
    "example_inputs",
    "export_onnx",
    "graph_feeds",
    "inference_network",
    "tracing",
]

CPU_BACKENDS = ("torch", "onnxruntime")
INPUT_NAMES = ("x", "timesteps", "condition")

logger = logging.getLogger(__name__)


def example_inputs(batch: int, size: Sequence[int], condition: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random network inputs ``(x, timesteps[, condition])`` for tracing and export: (batch, 1, H, W) x_t in [-1, 1],
    (batch,) timesteps in [0, 1000), and with ``condition`` (batch, 1, H, W) clean slices in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 1, *size, generator=generator)
    x = torch.randn(batch, 1, *size, generator=generator).clamp(-1, 1)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return (x, t, clean) if condition else (x, t)


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """No gradients, and no TracerWarning for group_norm's batch-size check, traced as a constant although it
    depends on no dynamic dimension."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def graph_feeds(
    names: Sequence[str], x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """The inputs an exported graph declares (``names``; an unused condition is dropped at export), as arrays."""
    given = dict(zip(INPUT_NAMES, (x, timesteps, condition), strict=True))
    return {name: np.ascontiguousarray(given[name].detach().cpu().numpy()) for name in names}


def export_onnx(network: nn.Module, example: Sequence[torch.Tensor], path: str | Path) -> None:
    """Export ``network(*example)`` (inputs named ``x, timesteps[, condition]``) to ONNX at ``path``, with the batch and
    spatial dimensions dynamic (volumes differ in brain slices; brain-box crops in height and width)."""
    names = list(INPUT_NAMES[: len(example)])
    dynamic = {name: {0: "batch", 2: "height", 3: "width"} for name in [*names, "out"] if name != "timesteps"}
    with tracing():
        torch.onnx.export(
            network,
            tuple(example),
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_axes={**dynamic, "timesteps": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


class OnnxRuntimeNetwork(nn.Module):
    """An exported network run by ONNX Runtime (CPU, fp32), with the call ``network(x, timesteps[, condition])``.

    Args:
        path: the ONNX file (see ``export_onnx``).
        threads: intra-op threads; default: torch's.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]  # an unused input (condition) is dropped

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1, H, W) x_t, (N,) timesteps, optional (N, 1, H, W) condition -> (N, 1, H, W) network output."""
        feeds = graph_feeds(self.input_names, x, timesteps, condition)
        return torch.from_numpy(self.session.run(None, feeds)[0]).to(x.device)


def inference_network(
    network: nn.Module,
    device: torch.device | str,
    channels_last: bool = False,
    cpu_backend: str = "torch",
    amp: bool = False,
    example_size: Sequence[int] = (64, 64),
    condition: bool = False,
) -> nn.Module:
    """The trained ``network`` in eval mode, ready for the anomaly inferers.

    Args:
        network: the network with its trained weights.
        device: where it runs.
        channels_last: channels-last weights (torch).
        cpu_backend: ``"torch"``, or ``"onnxruntime"``: on a CPU without autocast, the network exported to ONNX and
            run by ONNX Runtime (same maps to ~1e-5, see the bundle docs for when it is faster); elsewhere torch.
        amp: whether the inferer autocasts (autocast runs in torch).
        example_size: (H, W) of the export's example slices (any size the network accepts).
        condition: whether the network takes the clean image as a third input (cDDPM).
    """
    if cpu_backend not in CPU_BACKENDS:
        raise ValueError(f"cpu_backend must be one of {', '.join(map(repr, CPU_BACKENDS))}; got {cpu_backend!r}")
    device = torch.device(device)
    network = network.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    if cpu_backend == "torch" or device.type != "cpu" or amp:
        return network
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise ImportError("cpu_backend 'onnxruntime' needs onnx and onnxruntime: pip install onnx onnxruntime")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        export_onnx(network.to(memory_format=torch.contiguous_format), example_inputs(2, example_size, condition), path)
        runtime = OnnxRuntimeNetwork(path)
    logger.info("network exported to ONNX, running on ONNX Runtime (CPU, fp32; %.1f s)", time.perf_counter() - start)
    return runtime.eval()
