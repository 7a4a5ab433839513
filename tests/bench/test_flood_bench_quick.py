"""The rapid-reset flood benchmark must not rot: run it at its smallest and check it printed a
row per target with latencies for both phases, nothing failed, and the flood was refused."""

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

ROW = re.compile(r"^\| (?P<name>[^|]+?) \| (?P<cells>.*) \| (?P<failed>\d+) \|$")


def test_flood_benchmark_quick() -> None:
    if os.geteuid() != 0 or not shutil.which("crun"):
        pytest.skip("the benchmark needs root and crun (CI has both)")
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ports_h2_flood.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m["name"]: m for line in run.stdout.splitlines() if (m := ROW.match(line))}
    assert sorted(rows) == ["/v1/health", "other sandbox's port"], run.stdout
    for name, row in rows.items():
        assert row["failed"] == "0", (name, row.groupdict())
        assert row["cells"].count(" ms") == 5, (name, row.groupdict())
    assert "ended by GOAWAY ENHANCE_YOUR_CALM" in run.stdout
