"""Memory under load: one ``inference.json`` run over many demo volumes, its peak memory and throughput as it goes.

The bundle's inference runs as users start it (``python -m monai.bundle run`` in a subprocess, ``configs/demo.json``
with the shipped demo model) on a datalist of ``--cases`` entries (the demo cohort's volumes, each listed under several
names). While it runs, the script counts the anomaly maps written and reads the process's peak resident memory
(``VmHWM``) and that of its whole process tree (DataLoader workers included), and reports both at each mark
(``--marks``, e.g. after 20 and after 200 cases) with the cases per minute between the first and the last mark.
Memory is flat when the peak at the last mark is within 10 % of the peak at the first.

    python scripts/benchmark_load.py --bundle cddpm --cases 200 --marks 20 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib import demo_cohort
from lib.benchmarking import BUNDLES, header, markdown_table, process_tree, write_report
from lib.commands import bundle_command
from uad.files import atomic_write_text


def case_datalist(cohort: Path, n: int, folder: Path) -> Path:
    """A datalist of ``n`` test entries in ``folder``: the cohort's T2 volumes with their brain masks, cycled, each
    under its own name (links)."""
    pairs = []
    for image in sorted(cohort.glob("*/*/t2/*.nii.gz")) + sorted(cohort.glob("*/*/*/t2/*.nii.gz")):
        mask = image.parent.parent / "mask" / image.name.replace("_t2", "_mask")
        if mask.is_file():
            pairs.append((image, mask))
    if not pairs:
        raise FileNotFoundError(f"no T2 volumes with brain masks under {cohort}")
    entries = []
    for i in range(n):
        image, mask = pairs[i % len(pairs)]
        link = folder / f"case{i:04d}_t2.nii.gz"
        link.unlink(missing_ok=True)
        link.symlink_to(image)
        entries.append({"image": str(link), "mask": str(mask)})
    return atomic_write_text(folder / "datalist.json", json.dumps({"test": entries}))


def _status_kb(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/<pid>/status`` in kB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def monitor(cmd: Sequence[str], cwd: Path, out_dir: Path, marks: Sequence[int], poll: float = 0.5) -> dict[str, Any]:
    """Run ``cmd``; at each mark (number of maps written) record elapsed seconds, the main process's peak resident
    memory and the peak sampled memory of its process tree (MB)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = tempfile.TemporaryFile(mode="w+")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    rows, tree_peak, hwm, todo = [], 0, 0, sorted(marks)
    while todo:
        done = len(list(out_dir.glob("*_anomaly_map.nii.gz"))) if out_dir.is_dir() else 0
        hwm = max(hwm, _status_kb(proc.pid, "VmHWM"))
        tree_peak = max(tree_peak, sum(_status_kb(p, "VmRSS") for p in process_tree(proc.pid)))
        while todo and done >= todo[0]:
            rows.append({"cases": todo.pop(0), "seconds": time.monotonic() - start, "peak_rss_mb": hwm / 1024})
            rows[-1]["peak_tree_rss_mb"] = tree_peak / 1024
        if proc.poll() is not None:
            break
        time.sleep(poll)
    code = proc.wait()
    log.seek(0)
    if code != 0 or todo:
        raise RuntimeError(f"{' '.join(cmd)} ended with {code} before marks {todo}:\n{log.read()[-4000:]}")
    return {"marks": rows, "log_tail": log.read()[-2000:]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", choices=list(BUNDLES), default="cddpm")
    parser.add_argument("--cases", type=int, default=200, help="entries in the one inference run")
    parser.add_argument("--marks", type=int, nargs="+", default=[20, 200], help="case counts to report memory at")
    parser.add_argument("--cohort", type=Path, help="a demo cohort (default: the tiny one, generated)")
    parser.add_argument("--work", type=Path, help="folder for the datalist and outputs (default: a temporary one)")
    parser.add_argument("--override", default="{}", help="JSON of more config overrides (e.g. a smaller grid)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="report folder")
    args = parser.parse_args(argv)
    if max(args.marks) > args.cases:
        parser.error("a mark beyond --cases")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cohort = args.cohort
        if cohort is None:
            cohort = work / "cohort"
            demo_cohort.build_cohort(cohort, seed=0, size="tiny", progress=False, figure=False)
        datalist = case_datalist(cohort, args.cases, work)
        out_dir = work / "maps"
        overrides = {"datalist": str(datalist), "output_dir": str(out_dir), **json.loads(args.override)}
        cmd = bundle_command(["configs/inference.json", "configs/demo.json"], overrides)
        result = monitor(cmd, BUNDLES[args.bundle], out_dir, args.marks)
    first, last = result["marks"][0], result["marks"][-1]
    result["cases_per_minute"] = 60 * (last["cases"] - first["cases"]) / max(last["seconds"] - first["seconds"], 1e-9)
    result["peak_growth"] = last["peak_rss_mb"] / first["peak_rss_mb"] - 1
    result["tree_peak_growth"] = last["peak_tree_rss_mb"] / first["peak_tree_rss_mb"] - 1
    columns = [("cases", "cases written"), ("seconds", "elapsed s"), ("peak_rss_mb", "peak RSS MB")]
    table = markdown_table(result["marks"], [*columns, ("peak_tree_rss_mb", "peak RSS of the process tree MB")])
    markdown = (
        f"{header(f'{args.bundle} inference under load: {args.cases} demo volumes in one run')}\n{table}\n\n"
        f"Between {first['cases']} and {last['cases']} cases: {result['cases_per_minute']:.1f} cases/min; peak RSS "
        f"{100 * result['peak_growth']:+.1f} % (process tree {100 * result['tree_peak_growth']:+.1f} %)."
    )
    print(markdown)
    write_report(args.out, f"load_{args.bundle}", markdown, {k: v for k, v in result.items() if k != "log_tail"})
    return result


if __name__ == "__main__":
    main()
