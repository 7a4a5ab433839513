"""What every run records: the machine (cores, memory, kernel), the commit and the date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _cgroup_layout() -> str:
    try:
        from sandlot.engines.local import cgroups

        return str(cgroups.detect_layout().value)
    except Exception as exc:  # only a label; never fail a run over it
        return f"unknown ({exc})"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, argv in {
        "crun": ["crun", "--version"],
        "runc": ["runc", "--version"],
        "docker": ["/usr/sbin/dockerd", "--version"],
        "podman": ["podman", "--version"],
    }.items():
        if shutil.which(argv[0]):
            out[name] = _run(argv).splitlines()[0] if _run(argv) else "?"
    return out


def describe() -> dict[str, Any]:
    commit = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = bool(_run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit or "unknown",
        "worktree_dirty": dirty,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "memory_gib": _mem_total_gib(),
            "kernel": platform.release(),
            "os": _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]) or platform.system(),
            "cgroups": _cgroup_layout(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": _versions(),
    }


def make_tmp_parent() -> Path:
    """Where :func:`make_tmp` makes its directories: ``$SANDLOT_BENCH_TMP`` (default ``/tmp``)."""
    return Path(os.environ.get("SANDLOT_BENCH_TMP", "/tmp"))


def make_tmp(prefix: str) -> Path:
    """A temporary directory for the bench, under :func:`make_tmp_parent`: short, because
    agent sockets live below it and Unix socket paths are limited to 107 bytes."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=make_tmp_parent()))
