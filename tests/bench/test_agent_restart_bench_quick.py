"""The agent-restart benchmark must not rot: run it at its smallest (a few deaths, one idle
sandbox) and check that it measured every figure. Needs root, like the benchmarks."""

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


def test_agent_restart_benchmark_quick(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("crun"):
        pytest.skip("the benchmark needs root and crun")
    out = tmp_path / "agent_restart.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.agent_restart", "--kills", "3", "--idle", "1",
         "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for figure in ("death_to_exec_ms", "death_to_health_ms", "idle_sandbox_mib"):
        assert results[figure]["n"] >= 1 and results[figure]["median"] > 0, results
    assert results["idle_pid1"]["private_dirty_mib"] < 1, results  # pid 1 stays small
