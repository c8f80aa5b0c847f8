"""The conditions every figure is reported with: the CPU, a process's memory, the commit measured. One reader each,
and the one writer of every bench's result files: bench/results/<kind>-<date>-<model>.json (and .md).

    >>> from allinone_gguf.measure.machine import cpu_info, result_stem, rss_mb
    >>> sorted(cpu_info()) == ["cpu", "logical_cpus", "physical_cores"] and rss_mb() > 0
    True
    >>> result_stem("serving", "models/m/qwen2.5-0.5b-Q4_K_M.gguf", "2026-11-30")
    'serving-2026-11-30-qwen2.5-0.5b-Q4_K_M'
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from ..paths import RESULTS_DIR, ROOT


def cpu_info() -> dict:
    """CPU model name, logical CPUs and physical cores, from /proc/cpuinfo where there is one."""
    model, cores = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    phys = None
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name":
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return {"cpu": model, "logical_cpus": os.cpu_count(), "physical_cores": len(cores) or None}


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size (VmRSS) of a process, in MiB (Linux; NaN elsewhere or when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def git_commit() -> str | None:
    """The commit measured, with "+changes" when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if dirty else "")) or None


def result_stem(kind: str, model: str | Path, date: str | None = None) -> str:
    """<kind>-<date>-<model>: what the bench measured, the day (YYYY-MM-DD, today by default), and the model
    file's (or checkout's) name without .gguf. Path.stem would cut "qwen2.5-0.5b" at its first dot."""
    return f"{kind}-{date or datetime.date.today().isoformat()}-{Path(model).name.removesuffix('.gguf')}"


def write_result(kind: str, model: str | Path, report: dict, markdown: str | None = None,
                 out: Path = RESULTS_DIR) -> Path:
    """Write `report` to <out>/<kind>-<date>-<model>.json and `markdown`, when given, beside it as .md; returns
    the .json path. Every bench in measure/ names its results this way (a rerun the same day replaces them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (result_stem(kind, model) + ".json")
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
    return path
