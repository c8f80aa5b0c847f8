"""The conditions every figure is reported with: the CPU, a process's memory, the commit measured. One reader each.

    >>> from allinone_gguf.measure.machine import cpu_info, rss_mb
    >>> sorted(cpu_info()) == ["cpu", "logical_cpus", "physical_cores"] and rss_mb() > 0
    True
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from ..paths import ROOT


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
