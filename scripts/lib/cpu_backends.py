"""CPU execution backends for a bundle network, measured side by side by ``benchmark_speed.py``.

Each backend returns a module with the bundle network's call signature ``network(x, timesteps=t[, condition=c])``,
so the bundles' anomaly inferers run it unchanged:

- ``eager``: the network itself; ``channels-last``: with channels-last weights (the bundles' CPU default);
- ``compile``: ``torch.compile`` (inductor, C++ kernels on the CPU) of the channels-last network;
- ``int8-linear``: dynamic int8 quantisation of the linear layers (attention projections, time embedding);
- ``onnxruntime`` / ``openvino``: the network exported to ONNX (``uad.backends.export_onnx``) and run by that runtime
  in fp32 (``onnxruntime`` is also the bundles' ``cpu_backend`` option; ``pip install openvino`` for the other);
- ``int8-static``: the ONNX export with its convolutions statically quantised by ONNX Runtime (``quantize_static``:
  QDQ, int8 weights per output channel, uint8 activations with ranges calibrated on example inputs, 7-bit
  ``reduce_range`` so AVX2 kernels without VNNI cannot saturate), run by ONNX Runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from uad.backends import OnnxRuntimeNetwork, export_onnx, graph_feeds

__all__ = ["BACKENDS", "RecordingNetwork", "backend_available", "build_backend", "quantize_convolutions"]

BACKENDS = ("eager", "channels-last", "compile", "int8-linear", "onnxruntime", "int8-static", "openvino")
_PACKAGES = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "int8-static": ("onnx", "onnxruntime"),
    "openvino": ("onnx", "openvino"),
}


def backend_available(name: str) -> bool:
    """Whether the packages ``name`` needs are installed."""
    return all(importlib.util.find_spec(p) is not None for p in _PACKAGES.get(name, ()))


class _OpenVinoNetwork(nn.Module):
    """An ONNX file compiled by OpenVINO (CPU, fp32), with the bundle network's call signature."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import openvino

        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None):
        out = self.compiled(graph_feeds(self.input_names, x, timesteps, condition))[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


class RecordingNetwork(nn.Module):
    """``network`` unchanged, keeping a copy of the inputs of every call: calibration data for ``int8-static``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.inputs: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(tuple(t.detach().cpu().clone() for t in (x, timesteps, condition) if t is not None))
        return self.network(x, timesteps=timesteps, **({} if condition is None else {"condition": condition}))


def quantize_convolutions(path: Path, out: Path, calibration: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """ONNX Runtime static int8 quantisation of the convolutions of the ONNX file ``path`` into ``out`` (see
    ``int8-static``), activation ranges calibrated (min-max) on ``calibration``, inputs ``(x, timesteps[, condition])``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = OnnxRuntimeNetwork(path).input_names  # the inputs the export kept

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = (graph_feeds(names, *inputs, *(None,) * (3 - len(inputs))) for inputs in calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared = out.with_name(f"{out.stem}_prepared.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)  # the dynamic spatial sizes defeat it
    quantize_static(
        str(prepared),
        str(out),
        Feeds(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def build_backend(
    name: str,
    network: nn.Module,
    example: tuple[torch.Tensor, ...],
    calibration: Sequence[tuple[torch.Tensor, ...]] | None = None,
) -> nn.Module:
    """The fp32 ``network`` (eval mode, on the CPU) prepared for backend ``name``.

    Args:
        name: one of ``BACKENDS``.
        network: the bundle network.
        example: example inputs ``(x, timesteps[, condition])`` for export and compilation, e.g. two slices.
        calibration: ``int8-static`` only: the inputs its activation ranges are calibrated on (e.g. those a
            ``RecordingNetwork`` saw); default: ``[example]``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown CPU backend {name!r}; choose from {', '.join(BACKENDS)}")
    if not backend_available(name):
        raise ImportError(
            f"backend {name!r} needs {' and '.join(_PACKAGES[name])}: pip install {' '.join(_PACKAGES[name])}"
        )
    network = copy.deepcopy(network).eval()
    if name == "eager":
        return network
    if name == "channels-last":
        return network.to(memory_format=torch.channels_last)
    if name == "compile":
        return torch.compile(network.to(memory_format=torch.channels_last), dynamic=True)
    if name == "int8-linear":
        return torch.ao.quantization.quantize_dynamic(network, {nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        export_onnx(network, example, path)
        if name == "int8-static":
            quantize_convolutions(path, path.with_name("int8.onnx"), calibration or [example])
            return OnnxRuntimeNetwork(path.with_name("int8.onnx"))
        return OnnxRuntimeNetwork(path) if name == "onnxruntime" else _OpenVinoNetwork(path)
