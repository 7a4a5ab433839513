"""Every example in examples/ runs against a real server and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "hello.py": "Hello from Koyeb Sandbox!",
    "hello_async.py": "Hello from Koyeb Sandbox!",
    "exec_stream.py": "Command finished",
    "filesystem.py": "downloaded 256 bytes",
    "background_process.py": "still running: 0",
    "cancel.py": "cancelled:",
    "snapshots.py": "template says: hello world",
}

pytestmark = pytest.mark.root


def test_every_example_is_listed() -> None:
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(api_url: str, name: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SANDLOT_URL": api_url},
    )
    assert out.returncode == 0, out.stderr
    assert EXPECTED[name] in out.stdout + out.stderr
