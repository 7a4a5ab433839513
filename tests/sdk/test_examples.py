"""Every example in examples/ runs against a real server and does what it says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.runtimes import RUNSC_MISSING

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "hello.py": "Hello from Koyeb Sandbox!",
    "hello_async.py": "Hello from Koyeb Sandbox!",
    "hello_gvisor.py": "Hello from Koyeb Sandbox!\nkernel: 4.19.0-gvisor",
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
    if name == "hello_gvisor.py" and shutil.which("runsc") is None:
        pytest.skip(RUNSC_MISSING)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SANDLOT_URL": api_url},
    )
    assert out.returncode == 0, out.stderr
    assert EXPECTED[name] in out.stdout + out.stderr
