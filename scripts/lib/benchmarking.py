"""Shared pieces of the benchmark scripts: the machine and command header, timers, peak memory, report writing."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from uad.files import atomic_write_text
from uad.precision import cpu_bf16_native, cpu_description

from .commands import REPO

BUNDLES = {"cddpm": REPO / "cddpm_bundle", "autoddpm": REPO / "autoddpm_bundle"}


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, torch build, threads, GPU."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_bf16_native(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def command() -> str:
    """The command line that produced the report, as a user retypes it."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def header(title: str) -> str:
    """Markdown header: title, exact command, machine."""
    m = machine()
    device = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    return (
        f"# {title}\n\n`{command()}`\n\n"
        f"Machine: {m['cpu']} ({cpu_description()}), {m['cores']} cores, {device}; "
        f"torch {m['torch']}, Python {m['python']}.\n"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: int = 1) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a Markdown table; ``columns`` are (key, heading); floats get 3 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.json`` (with the command and machine) atomically; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    atomic_write_text(md_path, markdown + "\n")
    report = {"command": command(), "machine": machine(), **data}
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    return md_path, json_path


@contextlib.contextmanager
def bundle_context(bundle: str) -> Iterator[Path]:
    """Make ``scripts`` resolve to the bundle's own package while its configs are parsed and run."""
    root = BUNDLES[bundle]

    def forget() -> None:
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    forget()
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        forget()


def load_config(root: Path, names: list[str], overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / f"{n}.json") for n in names])
    parser.update(overrides)
    return parser


POOLED = {"dice": "dice@best_dice_val", "auprc": "auprc", "auroc": "auroc"}  # voxels of all test cases pooled


def quality_row(metrics: dict[str, Any], summary_keys: Sequence[str]) -> dict[str, Any]:
    """An evaluation's ``metrics.json`` as one flat row: the means over test cases of ``summary_keys``, the pooled test
    figures (``pooled_dice``, ``pooled_auprc``, ``pooled_auroc``), the labelled validation figures (``val_best_dice``,
    ``val_auprc``) and the false-positive voxels per lesion-free test case (``healthy_fp_px``)."""
    summary = metrics["summary"]
    return {
        **{k: summary[k]["mean"] for k in summary_keys if k in summary},
        "healthy_fp_px": metrics.get("healthy_test", {}).get("fp_voxels@best_dice_val", {}).get("mean"),
        **{f"pooled_{k}": metrics["pooled_test"].get(m) for k, m in POOLED.items()},
        **{f"val_{k}": v for k, v in metrics.get("validation_labelled", {}).items()},
    }


def chance_auprc(summary: dict) -> float:
    """The AUPRC of a random map: the lesion prevalence inside the brain (means over the test volumes)."""
    return summary["n_lesion_voxels"]["mean"] / summary["n_brain_voxels"]["mean"]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").is_dir() else []:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids
