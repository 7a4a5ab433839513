"""The port benchmarks must not rot either: run each at its smallest (one short round) and check
that every path it measures printed a latency and a rate. Needs root, like the benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root

ROW = re.compile(
    r"^\| (?P<name>[^|]+?) \| (?P<median>[0-9.]+) ms \| (?P<p90>[0-9.]+) ms \| (?P<rps>[0-9]+) \|$"
)


@pytest.mark.parametrize(
    ("script", "paths"),
    [
        (
            "ports_overhead.py",
            ["direct", "tunnel", "handed socket", "gateway", "tcp proxy", "ws direct",
             "ws gateway", "agent /health", "agent gateway /health"],
        ),
        (
            "ports_h2.py",
            ["h1 → h1 port", "h2 → h1 port", "h1 → h2 port", "h2 → h2 port",
             "h1 → /v1/health", "h2 → /v1/health"],
        ),
    ],
)  # fmt: skip
def test_port_benchmark_quick(script: str, paths: list[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("crun"):
        pytest.skip("the port benchmarks need root and crun (CI has both)")
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m["name"]: m for line in run.stdout.splitlines() if (m := ROW.match(line))}
    assert sorted(rows) == sorted(paths), run.stdout
    for name, row in rows.items():
        assert float(row["median"]) > 0 and int(row["rps"]) > 0, (name, row.groupdict())
