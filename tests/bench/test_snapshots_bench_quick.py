"""The snapshot benchmark must not rot: one snapshot per size, and every figure measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def test_snapshot_benchmark_quick(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("crun"):
        pytest.skip("the benchmark needs root and crun")
    out = tmp_path / "snapshots.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.snapshots", "--runs", "1", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for size in ("1MB", "100MB"):
        for figure in ("snapshot_ms", "spawn_echo_ms", "cold_echo_ms"):
            assert results[size][figure]["median"] > 0, results
        assert results[size]["spawn_over_cold"] > 0
