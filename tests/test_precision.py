"""The autocast decision: fp16 with CUDA, bf16 only on CPUs with native bf16, fp32 elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import bundle_parser
from lib.commands import command_configs
from uad import precision


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize(
    "capability, avx512_bf16, amx, native",
    [
        ("AVX2", False, False, False),
        ("DEFAULT", False, False, False),
        ("AVX512", False, False, False),  # AVX-512 without its bf16 extension (e.g. Skylake-X)
        ("AVX512", True, False, True),
        ("AVX512", False, True, True),  # AMX tiles (Sapphire Rapids and later)
        ("AVX2", True, False, False),  # torch capped at AVX2 (ATEN_CPU_CAPABILITY=avx2) on a bf16 CPU
    ],
)
def test_auto_autocasts_on_a_cpu_only_with_native_bf16(monkeypatch, capability, avx512_bf16, amx, native):
    fake_cpu(monkeypatch, capability, avx512_bf16, amx)
    assert precision.cpu_bf16_native() is native
    assert precision.resolve_amp("auto", torch.device("cpu")) is native
    assert precision.resolve_amp("auto", "cpu") is native  # the device as users type it
    assert precision.resolve_amp(False, "cpu") is False
    assert f"{capability}, {'native' if native else 'no native'} bf16" in precision.cpu_description()


def test_onednn_isa_cap_below_bf16_counts_as_no_native_bf16(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_bf16_native()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert precision.cpu_bf16_native()


def test_cuda_autocasts_unless_switched_off(monkeypatch):
    fake_cpu(monkeypatch, "AVX2")
    assert precision.resolve_amp("auto", "cuda:0") and precision.resolve_amp(True, torch.device("cuda"))
    assert not precision.resolve_amp(False, "cuda")


def test_engines_never_autocast_on_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert not precision.resolve_amp("auto", "cpu", cpu_autocast=False)
    assert not precision.resolve_amp(True, "cpu", cpu_autocast=False)
    assert precision.resolve_amp("auto", "cuda", cpu_autocast=False)


def test_explicit_amp_on_a_cpu_without_bf16_runs_with_a_warning(monkeypatch, caplog):
    fake_cpu(monkeypatch, "AVX2")
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert precision.resolve_amp(True, "cpu") is True
    assert "20-40x slower than fp32" in caplog.text and "AVX2, no native bf16" in caplog.text
    caplog.clear()
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert precision.resolve_amp(True, "cpu") is True
    assert not caplog.text


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("AUTO", "auto"), ("True", True), ("false", False)])
def test_amp_values_as_typed(text, value):
    assert precision.parse_amp(text) == value and precision.parse_amp(value) == value


@pytest.mark.parametrize("bad", ["yes", "bf16", 1, None])
def test_unsupported_amp_value_lists_the_accepted_ones(bad):
    with pytest.raises(ValueError, match=r"amp must be one of 'auto', True, False; got"):
        precision.resolve_amp(bad, "cpu")


@pytest.mark.parametrize("bundle", ["cddpm_bundle", "autoddpm_bundle"])
@pytest.mark.parametrize("command", ["inference", "evaluate", "train"])
def test_every_config_defaults_to_auto(monkeypatch, bundle_imports, bundle, command):
    fake_cpu(monkeypatch, "AVX2")
    bundle_imports(bundle)
    parser = bundle_parser(bundle, *(Path(c).name for c in command_configs(command, "demo")))
    assert parser["amp"] == "auto"
    parser["device"] = "$torch.device('cpu')"
    if command == "train":
        assert parser.get_parsed_content("train#trainer#amp") is False
        return
    assert parser.get_parsed_content("inferer").amp is False
    parser["amp"] = "bf16"
    with pytest.raises(RuntimeError) as failure:  # MONAI's "Failed to evaluate", caused by the project's message
        parser.get_parsed_content("inferer", lazy=False)
    assert str(failure.value.__cause__) == "amp must be one of 'auto', True, False; got 'bf16'"
