"""The benchmark suite must not rot: run it at its smallest (raw crun included, docker and
podman left out) and check that the JSON has every figure -- a measured value or an explicit
skip with its reason -- and that the docs and plots are rendered. Needs root, like the bench."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.suite import FIGURES  # noqa: E402

pytestmark = pytest.mark.root

#: Figures sandlot must measure even in the smallest run (the rest say why they are skipped).
MEASURED = [
    "tti_cold_ms",
    "exec_rtt_ms",
    "exec_rtt_agent_ms",
    "exec_throughput_per_s",
    "stream_latency_ms",
    "file_write_mb_s",
    "file_read_mb_s",
    "idle_sandbox_mib",
    "create_delete_per_s",
    "sdk_peak_rss_mib",
    "server_peak_rss_mib",
]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the benchmark needs root (CI runs as root)"
    if not shutil.which("crun"):
        return "needs crun (apt-get install crun)"
    return None


def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    out, docs = tmp_path / "latest.json", tmp_path / "docs"
    # The bench's own temporary directories go here (short: agent sockets live below it), so
    # what it leaves behind can be told apart from another bench running at the same time.
    bench_tmp = Path(tempfile.mkdtemp(prefix="slbt-", dir="/tmp"))
    bench_tmp.chmod(0o711)  # gVisor sandboxes: runsc's gofer searches it as the sandbox's uid
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "--quick",
                "--tiny",
                "--no-docker",
                "--no-podman",
                "--json",
                str(out),
                "--docs",
                str(docs),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=170,
            check=False,
            env={**os.environ, "SANDLOT_BENCH_TMP": str(bench_tmp)},
        )
        left_mounts = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if f" {bench_tmp}/" in line
        ]
        left_files = sorted(p.name for p in bench_tmp.iterdir())
    finally:
        shutil.rmtree(bench_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())

    meta = results["meta"]
    assert meta["commit"] and meta["date"]
    assert {"cores", "memory_gib", "kernel"} <= set(meta["machine"])
    assert set(results["figures"]) == set(FIGURES)
    for name, fig in results["figures"].items():
        assert fig["cases"], f"{name}: nothing recorded"
        for case, backends in fig["cases"].items():
            assert "sandlot" in backends, f"{name} {case}: no sandlot entry"
            for backend, res in backends.items():
                if "skipped" in res:
                    assert res["skipped"].strip(), f"{name} {case} {backend}: empty reason"
                    assert not res["skipped"].startswith("failed"), (name, backend, res)
                elif "value" not in res:
                    assert {"median", "p95", "n"} <= set(res), (name, case, backend, res)
                    assert res["n"] >= 1 and res["median"] >= 0
    for name in MEASURED:
        for case, backends in results["figures"][name]["cases"].items():
            assert "median" in backends["sandlot"], (name, case, backends["sandlot"])
    # raw crun ran and has ratios
    assert "median" in results["figures"]["tti_cold_ms"]["cases"]["-"]["crun"]
    assert results["figures"]["tti_cold_ms"]["ratios"]["-"]["crun"] > 0
    for name in ("docker", "podman"):
        assert "skipped" in results["figures"]["tti_cold_ms"]["cases"]["-"][name]
    assert not results["errors"], results["errors"]

    page = (docs / "benchmarks.md").read_text()
    assert "## Side by side" in page and "tti_cold_ms" in page
    pngs = list((docs / "img").glob("*.png"))
    assert len(pngs) >= 5, pngs
    # nothing left behind: no mounts, no temporary directories
    assert not left_mounts, left_mounts
    assert not left_files, left_files
