"""Where the benchmark writes: a quick run must leave the committed results and docs alone
(it once overwrote ``bench/results/latest.json`` and ``docs/benchmarks.md`` with its small
samples); only a full run, or explicit ``--json``/``--docs``, writes them."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import suite  # noqa: E402

COMMITTED = (suite.DEFAULT_JSON, suite.DEFAULT_DOCS / "benchmarks.md")


def _paths(*argv: str) -> tuple[Path, Path]:
    return suite.output_paths(suite.parse_args(list(argv)))


def test_quick_runs_write_outside_the_committed_files() -> None:
    for flag in ("--quick", "--tiny"):
        json_path, docs = _paths(flag)
        assert json_path.parent == suite.QUICK_DIR
        assert docs == suite.QUICK_DIR
        assert json_path != suite.DEFAULT_JSON and docs != suite.DEFAULT_DOCS


def test_full_run_and_render_only_write_the_committed_files() -> None:
    assert _paths() == (suite.DEFAULT_JSON, suite.DEFAULT_DOCS)
    assert _paths("--render-only") == (suite.DEFAULT_JSON, suite.DEFAULT_DOCS)
    assert _paths("--quick", "--render-only") == (suite.DEFAULT_JSON, suite.DEFAULT_DOCS)


def test_explicit_paths_win(tmp_path: Path) -> None:
    j, d = tmp_path / "r.json", tmp_path / "docs"
    assert _paths("--quick", "--json", str(j), "--docs", str(d)) == (j, d)
    assert _paths("--json", str(j)) == (j, suite.DEFAULT_DOCS)


def test_the_quick_directory_is_ignored_by_git() -> None:
    ignore = (REPO / ".gitignore").read_text().splitlines()
    assert "bench/results/quick/" in ignore


@pytest.mark.root
def test_a_quick_run_leaves_committed_files_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``main(["--quick"])`` (measuring nothing, so it takes a second) writes its JSON
    and report to the quick directory, and not a byte of the committed files changes."""
    if os.geteuid() != 0:
        pytest.skip("the benchmark needs root")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in COMMITTED}
    monkeypatch.setattr(suite, "QUICK_DIR", tmp_path)
    old_handler = signal.getsignal(signal.SIGTERM)
    try:
        suite.main(["--quick", "--parts", ""])  # 1: nothing measured, as expected here
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert (tmp_path / "latest.json").is_file()
    assert (tmp_path / "benchmarks.md").is_file()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in COMMITTED} == before
